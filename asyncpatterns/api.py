"""A FastAPI app on async SQLModel where bad input is a 4xx, never a 500.

Use ``create_app(url)`` to build the app: its lifespan creates the tables and
disposes the engine, the engine and session maker live on ``app.state``, and
``get_session`` hands each request its own session. ``uvicorn
asyncpatterns.api:app`` serves the module-level ``app`` (``$DATABASE_URL``).

What the common pattern's app got wrong, and this fixes:

* httpx's ``ASGITransport`` does not run the lifespan, so a test that does
  not start it meets "no such table" on the first request.
* Check-then-insert let concurrent POSTs store one email several times; here
  the unique constraint decides and the loser gets 400.
* ``{"name": null}``, another user's email, ``?limit=-1`` or a huge page were
  500s or silent dumps; here they are 422, 400 and 422.
* A database that cannot be reached is a 503 with a reason, not a traceback.
"""

import hashlib
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from typing import Annotated, Any

import anyio
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Strict, field_validator, model_validator
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import selectinload
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import crud, locking, streaming
from .config import DatabaseUnavailableError
from .db import (
    LOCK_TIMEOUT,
    create_db_and_tables,
    is_connection_lost,
    is_lock_timeout,
    is_unique_violation,
    make_engine,
    make_session_maker,
    run_in_transaction,
)
from .models import (
    CENT,
    MAX_ID,
    TEXT_PATTERN,
    Account,
    IdempotencyKey,
    Team,
    User,
    UserCreate,
    UserRead,
    UserUpdate,
    checked_name,
)
from .relationships import TeamNameTakenError, create_team, get_team_with_members
from .transactions import (
    AccountNotFoundError,
    InsufficientFundsError,
    move_money,
    open_account,
)
from .upserts import get_or_create_team

logger = logging.getLogger(__name__)

# Seconds a request waits for a free pooled connection before it is answered 503.
POOL_TIMEOUT = 3.0


# -- Schemas the endpoints add to the models' ---------------------------------


class ErrorMessage(BaseModel):
    detail: str


class Deleted(BaseModel):
    ok: bool


class TeamCreate(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, name: str) -> str:
        return checked_name(name)


class TeamRead(SQLModel):
    id: int
    name: str
    members: list[UserRead]


class AccountCreate(SQLModel):
    # Not strict: JSON has no decimal type, so 12.5 and "12.50" are both accepted.
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})
    balance: Decimal = Field(ge=0, max_digits=15, decimal_places=2)

    @field_validator("owner")
    @classmethod
    def _canonical_owner(cls, owner: str) -> str:
        return checked_name(owner)

    @field_validator("balance")
    @classmethod
    def _whole_cents(cls, balance: Decimal) -> Decimal:
        # 0.1 -> 0.10, as it will be stored; and -0 is 0 (the database has one zero)
        return balance.quantize(CENT) or Decimal("0.00")


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


def create_app(
    url: str | URL | None = None,
    *,
    pool_timeout: float = POOL_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    require_if_match: bool = False,
) -> FastAPI:
    """The app on ``url`` (default: ``$DATABASE_URL``, then the embedded SQLite file).

    Overload is a 503 + Retry-After, not a long wait then a 500:
    ``pool_timeout`` is how long a request waits for a pooled connection,
    ``lock_timeout`` how long a statement waits for a locked row (seconds).
    ``require_if_match``: a PATCH without If-Match is 428, not last-write-wins.
    """
    # FastAPIOffline: FastAPI, with /docs and /redoc served from the installed
    # package instead of a CDN, so the docs work without internet access.
    app = FastAPIOffline(
        title="asyncpatterns",
        summary="Users, teams and accounts on async SQLModel.",
        lifespan=lifespan,
        responses={503: {"model": ErrorMessage, "description": "Database unavailable or busy"}},
    )
    app.state.engine = make_engine(url, pool_timeout=pool_timeout, lock_timeout=lock_timeout)
    app.state.session_maker = make_session_maker(app.state.engine)
    app.state.require_if_match = require_if_match
    app.add_exception_handler(DatabaseUnavailableError, database_unavailable)
    app.add_exception_handler(PoolTimeoutError, database_unavailable)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(RequestValidationError, request_validation_failed)
    app.add_middleware(UnexpectedErrorsAsJSON)
    app.include_router(router)
    return app


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, from the app's session maker; closed afterwards.

    FastAPI closes it after the response is sent. Closing rolls back what was
    not committed; if the connection died meanwhile there is nothing left to
    roll back, and the answer is already out. So a failure here is logged, not
    raised: raising would make the server drop the client's keep-alive
    connection, and the client's next request with it.
    """
    session = request.app.state.session_maker()
    try:
        yield session
    finally:
        try:
            await session.close()
        except Exception as exc:
            lost = is_connection_lost(exc)
            logger.log(
                logging.WARNING if lost else logging.ERROR,
                "%s %s: closing the session failed: %s",
                request.method,
                request.url.path,
                exc,
                exc_info=None if lost else exc,
            )


SessionDep = Annotated[AsyncSession, Depends(get_session)]


# -- Errors: overload is a 503, bad input a 4xx, a bug a logged 500 with an id ----------


def _unavailable(reason: str, retry_after: int) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": f"Database unavailable: {reason}"},
        headers={"Retry-After": str(retry_after)},
    )


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with a reason: the database cannot be reached, or no pooled
    connection came free in time. The details (masked URL) go to the log only."""
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, PoolTimeoutError):
        return _unavailable("too many requests at once, no connection free", 1)
    return _unavailable("cannot connect to the database", 5)


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """A lost connection or a lock wait that timed out is overload (503); any
    other database error is a bug, answered like every unexpected error."""
    if is_connection_lost(exc):
        logger.error("%s %s: connection lost: %s", request.method, request.url.path, exc)
        return _unavailable("the connection to the database was lost", 5)
    if is_lock_timeout(exc):
        logger.warning("%s %s: lock timeout: %s", request.method, request.url.path, exc)
        return _unavailable("the rows are busy, try again", 1)
    return _internal_error(request.method, request.url.path, exc)


def _internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    logger.error("%s %s: unexpected error %s", method, path, error_id, exc_info=exc)
    content = {
        "detail": "Internal error; quote this error id when reporting it",
        "error_id": error_id,
    }
    return JSONResponse(status_code=500, content=content)


class UnexpectedErrorsAsJSON:
    """ASGI middleware: an error no handler took is a JSON 500 with a logged error id.

    Starlette's own last-resort handler re-raises after answering, and uvicorn
    then closes the keep-alive connection: the client's *next* request fails
    too. Here the error is answered and the connection stays open.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if started:  # half an answer is out: only closing the connection can tell
                raise
            response = _internal_error(scope["method"], scope["path"], exc)
            await response(scope, receive, send)


async def request_validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, safe for any input it echoes: NaN and Infinity (Python's
    JSON parser accepts them) and lone surrogates ("\\ud800") cannot be encoded
    as JSON text, so echoing them as they are would turn the 422 into a 500."""
    encoders = {float: _finite_or_text, str: _valid_text, bytes: _bytes_as_text}
    return JSONResponse(
        status_code=422, content={"detail": jsonable_encoder(exc.errors(), custom_encoder=encoders)}
    )


def _finite_or_text(number: float) -> float | str:
    return number if math.isfinite(number) else str(number)


def _bytes_as_text(raw: bytes) -> str:
    # A body that was not UTF-8 (and not declared JSON) is echoed as the text it spells.
    return raw.decode("utf-8", "replace")


def _valid_text(text: str) -> str:
    # Lone surrogates become U+FFFD, the replacement character.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation for the error answers of one endpoint."""
    descriptions = {
        400: "Conflicts with stored data (e.g. email already registered), a non-UTF-8 body,"
        " or a malformed If-Match",
        404: "Not found",
        409: "Refused by a business rule (e.g. insufficient funds)",
        412: "If-Match names no current version: someone else changed it; GET it again",
        428: "This server requires If-Match on writes: send the ETag you read",
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
    except LookupError as exc:  # the team_id has no team
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return UserRead.model_validate(created)


# -- Export: the user table as CSV, streamed (before /users/{user_id}, which would take it)


class StreamingWithCleanup(StreamingResponse):
    """A ``StreamingResponse`` that closes its body iterator however the answer ends.

    Starlette stops iterating when the client goes away, but leaves the generator
    suspended: its ``finally`` (closing the cursor and the session) would wait for
    the garbage collector, and the pooled connection with it.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)  # an async generator's
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


@router.get(
    "/users/export.csv",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "Every user, in id order: id,name,email,is_active,team_id",
        }
    },
    tags=["users"],
)
async def export_users_endpoint(request: Request) -> StreamingResponse:
    """Every user as CSV (RFC 4180, UTF-8), streamed 1,000 rows at a time: constant memory
    however large the table. Cells a spreadsheet would run as a formula get a leading
    ``'``. An export that fails midway is cut off without HTTP's end of message, which
    clients report as an error: never a shorter CSV that looks complete."""
    # Its own session, not SessionDep: FastAPI 0.106 to 0.117 closes a yield dependency
    # before the body is sent. The query runs before the answer starts, so an unreachable
    # database or a full pool is still a 503.
    session = request.app.state.session_maker()
    chunks = streaming.export_users_csv(session)
    try:
        first = await anext(chunks)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
            await session.close()
        raise
    return StreamingWithCleanup(
        _export_body(request, session, first, chunks),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="users.csv"'},
    )


class ExportCutOff(RuntimeError):
    """An export failed after its answer had started: the server drops the connection
    (no handler may turn it into an answer: the status is already sent)."""


async def _export_body(
    request: Request, session: AsyncSession, first: str, chunks: AsyncIterator[str]
) -> AsyncIterator[str]:
    where = f"{request.method} {request.url.path}"
    try:
        yield first
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # the status is sent: only cutting the body off can tell
        error_id = uuid.uuid4().hex[:12]
        logger.error("%s: export cut off, error %s", where, error_id, exc_info=exc)
        raise ExportCutOff(f"export cut off after the answer started, error {error_id}") from exc
    finally:
        with anyio.CancelScope(shield=True):  # also when the client went away
            await chunks.aclose()  # type: ignore[attr-defined]
            try:
                await session.close()
            except Exception as exc:
                logger.warning("%s: closing the session failed: %s", where, exc)


@router.get("/users/{user_id}", responses=_errors(404), tags=["users"])
async def read_user_endpoint(user_id: UserId, session: SessionDep, response: Response) -> UserRead:
    """The user, with its version as a strong ``ETag``: send it back in ``If-Match``."""
    user = await crud.get_user(session, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    response.headers["ETag"] = locking.etag(user)
    return UserRead.model_validate(user)


@router.get("/users/", tags=["users"])
async def read_users_endpoint(
    session: SessionDep, skip: Skip = 0, limit: Limit = crud.MAX_PAGE_SIZE
) -> list[UserRead]:
    """One page of users in id order; ``limit`` is at most 100."""
    users = await crud.get_users(session, skip=skip, limit=limit)
    return [UserRead.model_validate(user) for user in users]


IfMatchHeader = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='The ETag of GET /users/{user_id}, e.g. "user-5-v3" (quotes included), or *: '
        "the change is made only if nobody changed the user since (else 412).",
    ),
]


def _if_match(request: Request, if_match: str | None) -> str | None:
    """The whole If-Match field: several lines of it are one list (RFC 9110, 5.3)."""
    return None if if_match is None else ", ".join(request.headers.getlist("if-match"))


@contextmanager
def _precondition_refusals() -> Iterator[None]:
    """``locking``'s refusals of a conditional write, as HTTP answers them."""
    try:
        yield
    except locking.InvalidIfMatchError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except locking.PreconditionRequiredError as exc:
        raise HTTPException(status.HTTP_428_PRECONDITION_REQUIRED, str(exc)) from None
    except crud.VersionConflictError as exc:
        raise HTTPException(status.HTTP_412_PRECONDITION_FAILED, str(exc)) from None


@router.patch("/users/{user_id}", responses=_errors(400, 404, 412, 428), tags=["users"])
async def update_user_endpoint(
    user_id: UserId,
    changes: UserUpdate,
    session: SessionDep,
    request: Request,
    response: Response,
    if_match: IfMatchHeader = None,
) -> UserRead:
    """Change the fields sent; omitted fields stay. ``null`` is only allowed for team_id.

    With ``If-Match`` (optimistic locking): only over the version it names, else
    412 and nothing changes. Without: the last write wins (428 if the app
    requires If-Match). The answer's ``ETag`` names the new version.
    """
    try:
        with _precondition_refusals():
            user = await locking.update_user_if_match(
                session,
                user_id,
                changes,
                _if_match(request, if_match),
                required=request.app.state.require_if_match,
            )
    except crud.DuplicateEmailError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, EMAIL_TAKEN) from None
    except LookupError as exc:  # the team_id has no team
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    response.headers["ETag"] = locking.etag(user)
    return UserRead.model_validate(user)


@router.delete("/users/{user_id}", responses=_errors(400, 404, 412, 428), tags=["users"])
async def delete_user_endpoint(
    user_id: UserId, session: SessionDep, request: Request, if_match: IfMatchHeader = None
) -> Deleted:
    """Delete the user. With ``If-Match``, only the version it names, else 412 and
    the user stays (428 without it, if the app requires If-Match)."""
    with _precondition_refusals():
        deleted = await locking.delete_user_if_match(
            session,
            user_id,
            _if_match(request, if_match),
            required=request.app.state.require_if_match,
        )
    if not deleted:
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    return Deleted(ok=True)


# -- Teams, with their members eager-loaded --------------------------------------------


@router.post("/teams/", status_code=201, responses=_errors(400), tags=["teams"])
async def create_team_endpoint(team: TeamCreate, session: SessionDep) -> TeamRead:
    """Create an empty team; add members with POST or PATCH on /users/."""
    try:
        created = await create_team(session, team.name)
    except TeamNameTakenError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Team name already taken") from None
    return TeamRead(id=created.id, name=created.name, members=[])


@router.post("/teams/get-or-create", responses=_errors(400), tags=["teams"])
async def get_or_create_team_endpoint(team: TeamCreate, session: SessionDep) -> TeamRead:
    """The team with this name, created if there is none: 200 either way, and the
    same team for every request, however many race (``upserts.get_or_create_team``)."""
    got = await get_or_create_team(session, team.name)
    loaded = await get_team_with_members(session, got.id)
    if loaded is None:  # deleted since: it was there, with no members we can list
        return TeamRead(id=got.id, name=got.name, members=[])
    return TeamRead.model_validate(loaded)


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
    created = await open_account(session, account.owner, account.balance)
    return AccountRead.model_validate(created)


@router.get("/accounts/{account_id}", responses=_errors(404), tags=["accounts"])
async def read_account_endpoint(account_id: AccountId, session: SessionDep) -> AccountRead:
    account = await session.get(Account, account_id)
    if account is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Account not found")
    return AccountRead.model_validate(account)


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


@router.post("/transfers/", responses=_errors(400, 404, 409), tags=["accounts"])
async def transfer_endpoint(
    transfer: TransferCreate, session: SessionDep, idempotency_key: IdempotencyKeyHeader = None
) -> TransferRead:
    """Move money between two accounts: all or nothing, safe under concurrency,
    and safe to retry with an ``Idempotency-Key`` (a lost answer is not a lost
    transfer: retry with the same key and the money moves once)."""

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
        status_code, body = await answer_once(session, idempotency_key, request_hash, work)
    if status_code != 200:
        raise HTTPException(status_code, body["detail"])
    return TransferRead.model_validate(body)


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


app = create_app()
