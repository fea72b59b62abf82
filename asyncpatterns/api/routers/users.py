"""The ``/users/`` endpoints: create, read, list, export as CSV, update, delete.

Use this router as the shape of a resource's endpoints: the database, not a
prior SELECT, decides a duplicate, and a write names the version it changes.
What goes wrong without it, in the common pattern's app:

* Check-then-insert let concurrent POSTs store one email several times; here
  the unique constraint decides and the loser gets 400.
* A PATCH with another user's email was a 500; here it is a 400.
* Two clients that read the same user and both PATCH it: the second silently
  undoes the first. Here ``If-Match`` makes the second a 412.

Routes match in the order they are registered: ``/users/export.csv`` comes
before ``/users/{user_id}``, which would otherwise take it (and answer 422).
"""

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import Receive, Scope, Send

from ... import crud, exports, locking, outbox, pagination
from ...db import run_in_transaction
from ...models import Outbox, User, UserCreate, UserRead, UserUpdate
from ..dependencies import ReadSessionDep, SessionDep
from ..errors import _errors
from ..schemas import Cursor, Deleted, Limit, Skip, UserId, UserSort

logger = logging.getLogger("asyncpatterns.api")  # the API's one logger (see errors.py)

router = APIRouter()

USER_NOT_FOUND = "User not found"
EMAIL_TAKEN = "Email already registered"


@router.post("/users/", status_code=201, responses=_errors(400, 404), tags=["users"])
async def create_user_endpoint(user: UserCreate, session: SessionDep) -> UserRead:
    """Register a user. The unique constraint, not a prior SELECT, rejects a taken email.
    A ``user.created`` event (``outbox.py``) commits with the user, and only then."""

    async def create_and_announce(tx: AsyncSession) -> User:
        created = await crud.create_user(tx, User.model_validate(user))
        # Ids, not the email or name: an event is kept and copied (the broker, its
        # consumers' logs); consumers read the user's current data by id.
        announced = {"id": created.id, "team_id": created.team_id}
        await outbox.emit(tx, Outbox, "user.created", announced, key=str(created.id))
        return created

    try:
        created = await run_in_transaction(session, create_and_announce)
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
    chunks = exports.export_users_csv(session)
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
async def read_user_endpoint(
    user_id: UserId, session: ReadSessionDep, response: Response
) -> UserRead:
    """The user, with its version as a strong ``ETag``: send it back in ``If-Match``."""
    user = await crud.get_user(session, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, USER_NOT_FOUND)
    response.headers["ETag"] = locking.etag(user)
    return UserRead.model_validate(user)


@router.get("/users/", responses=_errors(400), tags=["users"])
async def read_users_endpoint(
    request: Request,
    response: Response,
    session: ReadSessionDep,
    limit: Limit = crud.MAX_PAGE_SIZE,
    sort: UserSort = "id",
    cursor: Cursor = None,
    skip: Skip = 0,
) -> list[UserRead]:
    """One page of users in ``sort`` order (ties by id), at most ``limit``. The pages
    before and after are in the ``Link`` header (``rel="next"``, ``rel="prev"``):
    follow them; a cursor is opaque. ``skip`` (an offset, in id order) is the old
    way: slow deep down, and it skips or repeats rows while others write."""
    if skip:
        if cursor is not None or sort != "id":
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, "skip pages in id order only, without cursor"
            )
        users = await crud.get_users(session, skip=skip, limit=limit)
        return [UserRead.model_validate(user) for user in users]
    order = User.name if sort == "name" else None
    try:
        page = await pagination.keyset_page(
            session, User, order_by=order, cursor=cursor, limit=limit
        )
    except pagination.InvalidCursorError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"Invalid cursor: {exc}") from None
    links = []  # relative references: right behind any proxy
    for rel, place in (("next", page.next), ("prev", page.previous)):
        if place is not None:
            url = request.url.include_query_params(cursor=place)
            links.append(f'<{url.path}?{url.query}>; rel="{rel}"')
    if links:
        response.headers["Link"] = ", ".join(links)
    return [UserRead.model_validate(user) for user in page.items]


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
