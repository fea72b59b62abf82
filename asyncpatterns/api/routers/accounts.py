"""The ``/accounts/`` and ``/transfers/`` endpoints: exact money, moved all or nothing.

Use this router for writes that must happen once and completely. What goes
wrong without it: a refused transfer (no such account, not enough money)
that is not undone leaves half a transfer in the transaction, and a retried
POST whose answer was lost moves the money twice. Here a refusal undoes only
its own savepoint and is a 404 or 409, and an ``Idempotency-Key`` makes a
retry safe (``idempotency.py``). The guarded UPDATEs that make concurrent
transfers safe are ``transactions.move_money``'s.
"""

import hashlib
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.encoders import jsonable_encoder
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from ...db import run_in_transaction
from ...models import Account
from ...transactions import (
    AccountNotFoundError,
    InsufficientFundsError,
    move_money,
    open_account,
)
from ..dependencies import ReadSessionDep, SessionDep
from ..errors import _errors
from ..idempotency import IdempotencyKeyHeader, KeyExpiryDep, answer_once
from ..schemas import AccountCreate, AccountId, AccountRead, TransferCreate, TransferRead

router = APIRouter()


@router.post("/accounts/", status_code=201, responses=_errors(400), tags=["accounts"])
async def create_account_endpoint(account: AccountCreate, session: SessionDep) -> AccountRead:
    created = await open_account(session, account.owner, account.balance)
    return AccountRead.model_validate(created)


@router.get("/accounts/{account_id}", responses=_errors(404), tags=["accounts"])
async def read_account_endpoint(account_id: AccountId, session: ReadSessionDep) -> AccountRead:
    account = await session.get(Account, account_id)
    if account is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Account not found")
    return AccountRead.model_validate(account)


@router.post("/transfers/", responses=_errors(400, 404, 409), tags=["accounts"])
async def transfer_endpoint(
    transfer: TransferCreate,
    session: SessionDep,
    expiry: KeyExpiryDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> TransferRead:
    """Move money between two accounts: all or nothing, safe under concurrency,
    and safe to retry with an ``Idempotency-Key`` (a lost answer is not a lost
    transfer: retry with the same key, within the key's lifetime of 24 hours by
    default, and the money moves once)."""

    async def work(tx: AsyncSession) -> tuple[int, dict[str, Any]]:
        try:
            async with tx.begin_nested():  # a refused transfer undoes only its own UPDATEs
                await move_money(tx, transfer.from_id, transfer.to_id, transfer.amount)
        except AccountNotFoundError as exc:
            return 404, {"detail": str(exc)}
        except InsufficientFundsError as exc:
            return 409, {"detail": str(exc)}
        # Read the new balances in the same transaction: nothing is left to do
        # after the commit, so an answer lost after it is the only failure left.
        statement = select(Account).where(col(Account.id).in_([transfer.from_id, transfer.to_id]))
        accounts = {
            a.id: AccountRead.model_validate(a)
            for a in (await tx.exec(statement.execution_options(populate_existing=True))).all()
        }
        body = TransferRead(
            from_account=accounts[transfer.from_id], to_account=accounts[transfer.to_id]
        )
        return 200, jsonable_encoder(body)

    if idempotency_key is None:
        status_code, body = await run_in_transaction(session, work)
    else:
        request_hash = hashlib.sha256(transfer.model_dump_json().encode()).hexdigest()
        status_code, body = await answer_once(
            session, idempotency_key, request_hash, work, ttl=expiry.ttl, clock=expiry.clock
        )
    if status_code != 200:
        raise HTTPException(status_code, body["detail"])
    return TransferRead.model_validate(body)
