"""A FastAPI app on async SQLModel where bad input is a 4xx, never a 500.

Use ``create_app(url)`` to build the app: its lifespan creates the tables and
disposes the engine, the engine and session maker live on ``app.state``, and
``get_session`` hands each request its own session. ``uvicorn
asyncpatterns.api:app`` serves the module-level ``app`` (``$DATABASE_URL``).

What the pattern sheet's app got wrong, and this fixes:

* httpx's ``ASGITransport`` does not run the lifespan, so a test that does
  not start it meets "no such table" on the first request.
* Check-then-insert let concurrent POSTs store one email several times; here
  the unique constraint decides and the loser gets 400.
* ``{"name": null}``, another user's email, ``?limit=-1`` or a huge page were
  500s or silent dumps; here they are 422, 400 and 422.
* A database that cannot be reached is a 503 with a reason, not a traceback.
"""

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Strict, field_validator, model_validator
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns import crud
from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import create_db_and_tables, make_engine, make_session_maker
from asyncpatterns.models import (
    CENT,
    MAX_ID,
    TEXT_PATTERN,
    Account,
    Team,
    User,
    UserCreate,
    UserRead,
    UserUpdate,
)
from asyncpatterns.relationships import get_team_with_members
from asyncpatterns.transactions import (
    AccountNotFoundError,
    InsufficientFundsError,
    transfer_funds,
)

logger = logging.getLogger(__name__)


# -- Schemas the endpoints add to the models' ---------------------------------


class ErrorMessage(BaseModel):
    detail: str


class Deleted(BaseModel):
    ok: bool


class TeamCreate(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})


class TeamRead(SQLModel):
    id: int
    name: str
    members: list[UserRead]


class AccountCreate(SQLModel):
    # Not strict: JSON has no decimal type, so 12.5 and "12.50" are both accepted.
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})
    balance: Decimal = Field(ge=0, max_digits=15, decimal_places=2)

    @field_validator("balance")
    @classmethod
    def _whole_cents(cls, balance: Decimal) -> Decimal:
        return balance.quantize(CENT)  # 0.1 -> 0.10, as it will be stored


class AccountRead(SQLModel):
    id: int
    owner: str
    balance: Decimal


class TransferCreate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # not strict, for the amount (see above)

    from_id: Annotated[int, Strict()] = Field(ge=1, le=MAX_ID)
    to_id: Annotated[int, Strict()] = Field(ge=1, le=MAX_ID)
    amount: Decimal = Field(gt=0, max_digits=15, decimal_places=2)

    @model_validator(mode="after")
    def _two_accounts(self) -> "TransferCreate":
        if self.from_id == self.to_id:
            raise ValueError("from_id and to_id must be different accounts")
        return self


class TransferRead(SQLModel):
    from_account: AccountRead
    to_account: AccountRead


# -- App factory ---------------------------------------------------------------


router = APIRouter()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the tables before the first request; close the pool at shutdown."""
    await create_db_and_tables(app.state.engine)
    try:
        yield
    finally:
        await app.state.engine.dispose()


def create_app(url: str | URL | None = None) -> FastAPI:
    """The app on ``url`` (default: ``$DATABASE_URL``, then the embedded SQLite file)."""
    app = FastAPI(
        title="asyncpatterns",
        summary="Users, teams and accounts on async SQLModel.",
        lifespan=lifespan,
        responses={503: {"model": ErrorMessage, "description": "Database unavailable"}},
    )
    app.state.engine = make_engine(url)
    app.state.session_maker = make_session_maker(app.state.engine)
    app.add_exception_handler(DatabaseUnavailableError, database_unavailable)
    app.add_exception_handler(RequestValidationError, request_validation_failed)
    app.include_router(router)
    return app


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, from the app's session maker; closed afterwards."""
    async with request.app.state.session_maker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with a reason; the full message (masked URL) goes to the log only."""
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "Database unavailable: cannot connect to the database"},
        headers={"Retry-After": "5"},
    )


async def request_validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, safe for NaN and Infinity (Python's JSON parser accepts them,
    and echoing them back in the error would fail to render: a 500)."""
    errors = jsonable_encoder(exc.errors(), custom_encoder={float: _finite_or_text})
    return JSONResponse(status_code=422, content={"detail": errors})


def _finite_or_text(number: float) -> float | str:
    return number if math.isfinite(number) else str(number)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation for the error answers of one endpoint."""
    descriptions = {
        400: "Conflicts with stored data (e.g. email already registered), or a non-UTF-8 body",
        404: "Not found",
        409: "Refused by a business rule (e.g. insufficient funds)",
    }
    return {code: {"model": ErrorMessage, "description": descriptions[code]} for code in codes}


# -- Parameters: ids fit the 32-bit INTEGER columns, pages are bounded ---------

UserId = Annotated[int, Path(ge=1, le=MAX_ID)]
TeamId = Annotated[int, Path(ge=1, le=MAX_ID)]
AccountId = Annotated[int, Path(ge=1, le=MAX_ID)]
Skip = Annotated[int, Query(ge=0, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=crud.MAX_PAGE_SIZE)]

USER_NOT_FOUND = "User not found"
EMAIL_TAKEN = "Email already registered"


# -- Users ----------------------------------------------------------------------


@router.post("/users/", status_code=201, responses=_errors(400, 404), tags=["users"])
async def create_user_endpoint(user: UserCreate, session: SessionDep) -> UserRead:
    """Register a user. The unique constraint, not a prior SELECT, rejects a taken email."""
    try:
        created = await crud.create_user(session, User.model_validate(user))
    except crud.DuplicateEmailError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, EMAIL_TAKEN) from None
    except IntegrityError:
        await _raise_if_team_missing(session, user.team_id)
        raise
    return UserRead.model_validate(created)


@router.get("/users/{user_id}", responses=_errors(404), tags=["users"])
async def read_user_endpoint(user_id: UserId, session: SessionDep) -> UserRead:
    user = await crud.get_user(session, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    return UserRead.model_validate(user)


@router.get("/users/", tags=["users"])
async def read_users_endpoint(
    session: SessionDep, skip: Skip = 0, limit: Limit = crud.MAX_PAGE_SIZE
) -> list[UserRead]:
    """One page of users in id order; ``limit`` is at most 100."""
    users = await crud.get_users(session, skip=skip, limit=limit)
    return [UserRead.model_validate(user) for user in users]


@router.patch("/users/{user_id}", responses=_errors(400, 404), tags=["users"])
async def update_user_endpoint(
    user_id: UserId, changes: UserUpdate, session: SessionDep
) -> UserRead:
    """Change the fields sent; omitted fields stay. ``null`` is only allowed for team_id."""
    try:
        user = await crud.update_user(session, user_id, changes)
    except crud.DuplicateEmailError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, EMAIL_TAKEN) from None
    except IntegrityError:
        await _raise_if_team_missing(session, changes.team_id)
        raise
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    return UserRead.model_validate(user)


@router.delete("/users/{user_id}", responses=_errors(404), tags=["users"])
async def delete_user_endpoint(user_id: UserId, session: SessionDep) -> Deleted:
    if not await crud.delete_user(session, user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    return Deleted(ok=True)


async def _raise_if_team_missing(session: AsyncSession, team_id: int | None) -> None:
    # After a foreign-key violation: say which reference was wrong.
    if team_id is not None and await session.get(Team, team_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Team {team_id} not found") from None


# -- Teams, with their members eager-loaded --------------------------------------------


@router.post("/teams/", status_code=201, responses=_errors(400), tags=["teams"])
async def create_team_endpoint(team: TeamCreate, session: SessionDep) -> TeamRead:
    """Create an empty team; add members with POST or PATCH on /users/."""
    created = Team.model_validate(team)
    try:
        async with session.begin_nested():
            session.add(created)
    except IntegrityError:  # the only constraint a new team can break: its unique name
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Team name already taken") from None
    await session.commit()
    return TeamRead(id=created.id, name=created.name, members=[])


@router.get("/teams/{team_id}", responses=_errors(404), tags=["teams"])
async def read_team_endpoint(team_id: TeamId, session: SessionDep) -> TeamRead:
    team = await get_team_with_members(session, team_id)
    if team is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Team not found")
    return TeamRead.model_validate(team)


@router.get("/teams/", tags=["teams"])
async def read_teams_endpoint(
    session: SessionDep, skip: Skip = 0, limit: Limit = crud.MAX_PAGE_SIZE
) -> list[TeamRead]:
    """A page of teams with their members: two statements, however many teams."""
    statement = (
        select(Team)
        .order_by(col(Team.id))
        .offset(skip)
        .limit(limit)
        .options(selectinload(Team.members))
    )
    return [TeamRead.model_validate(team) for team in (await session.exec(statement)).all()]


# -- Accounts and transfers -------------------------------------------------------------


@router.post("/accounts/", status_code=201, responses=_errors(400), tags=["accounts"])
async def create_account_endpoint(account: AccountCreate, session: SessionDep) -> AccountRead:
    created = Account.model_validate(account)
    session.add(created)
    await session.commit()
    return AccountRead.model_validate(created)


@router.get("/accounts/{account_id}", responses=_errors(404), tags=["accounts"])
async def read_account_endpoint(account_id: AccountId, session: SessionDep) -> AccountRead:
    account = await session.get(Account, account_id)
    if account is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Account not found")
    return AccountRead.model_validate(account)


@router.post("/transfers/", responses=_errors(400, 404, 409), tags=["accounts"])
async def transfer_endpoint(transfer: TransferCreate, session: SessionDep) -> TransferRead:
    """Move money between two accounts: all or nothing, safe under concurrency."""
    try:
        await transfer_funds(session, transfer.from_id, transfer.to_id, transfer.amount)
    except AccountNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except InsufficientFundsError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    # The balances changed in the database: reload them, whatever the session held.
    accounts = [
        await session.get(Account, account_id, populate_existing=True)
        for account_id in (transfer.from_id, transfer.to_id)
    ]
    from_account, to_account = (AccountRead.model_validate(a) for a in accounts)
    return TransferRead(from_account=from_account, to_account=to_account)


app = create_app()
