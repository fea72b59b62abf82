"""``Idempotency-Key``: a money-moving request that is safe to retry.

Use ``answer_once`` around the work of a request whose retry must not repeat
it (a transfer), with the client's key from ``IdempotencyKeyHeader``. What
goes wrong without it: an answer lost on the way back (a timeout, a dropped
connection) leaves the client unable to tell whether the money moved, and
its retry moves it a second time. Here a retry with the same key and body
gets the first answer, and the work runs once.
"""

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from ..db import is_unique_violation, run_in_transaction
from ..models import IdempotencyKey

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (a UUID): a retry with the same key and body gets "
        "the first answer and moves no money again.",
    ),
]


async def answer_once(
    session: AsyncSession,
    key: str,
    request_hash: str,
    work: Callable[[AsyncSession], Awaitable[tuple[int, dict[str, Any]]]],
) -> tuple[int, dict[str, Any]]:
    """Run ``work`` at most once per idempotency ``key``; return its (status, body).

    The key is claimed by an INSERT in the same transaction as the work, and
    the answer stored with it, so the key exists exactly when the work was
    committed. A concurrent request with the same key waits on that row and
    then gets the stored answer. A key reused for another request is a 422.
    """

    async def claim_and_work(tx: AsyncSession) -> IdempotencyKey:
        record = await tx.get(IdempotencyKey, key)
        if record is None:
            record = IdempotencyKey(key=key, request=request_hash, status_code=0, response="")
            tx.add(record)
            await tx.flush()  # the claim: a racing twin waits here, then fails
            status_code, body = await work(tx)
            record.status_code, record.response = status_code, json.dumps(body)
            await tx.flush()
        return record

    try:
        record = await run_in_transaction(session, claim_and_work)
    except IntegrityError as exc:
        if not is_unique_violation(exc, IdempotencyKey.__table__.c.key):
            raise
        # A twin committed first: its answer is ours. A new transaction sees it.
        record = await session.get(IdempotencyKey, key, populate_existing=True)
        if record is None:
            raise
    if record.request != request_hash:  # answered like any invalid input, with its place
        message = "Idempotency-Key already used for a different request"
        error = {"type": "idempotency_key_reused", "loc": ("header", "Idempotency-Key")}
        raise RequestValidationError([{**error, "msg": message, "input": key}])
    return record.status_code, json.loads(record.response)
