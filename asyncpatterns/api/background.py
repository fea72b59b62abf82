"""Work after the response: a background task runs its own unit of work, from ids.

Use ``after: AfterResponseDep`` in an endpoint and ``after.run(work, user.id)``
(or ``run_after_response(background_tasks, session_maker, work, ...)``): after
the response is sent, ``work(session, ...)`` runs in a session of its own from
the app's session maker, in ``run_in_transaction`` (committed, a deadlock
retried), and its failure is logged to ``"asyncpatterns.api"``, never raised.
Pass ids, not ORM objects: an ORM object belongs to the request's session.

What goes wrong when the task uses the request's session (``SessionDep``):

* FastAPI 0.118 and later (the request's dependencies exit after the response
  *and* its background tasks): the session is still open, so the task runs in
  the request's session, transaction and pooled connection, held for as long
  as the task takes. What the task writes without committing is rolled back
  when the session closes, silently; a commit there also commits whatever the
  request left uncommitted.
* FastAPI 0.106 to 0.117, and ``Depends(get_session, scope="function")``
  (0.121 and later): the session is closed before the task runs. That is no
  error: a closed ``AsyncSession`` begins a new transaction on a new
  connection at the next query, and nobody ends it. The connection stays
  checked out after the task, and what it wrote is never committed.
* An ORM object handed to the task is attached to the request's session (the
  task's own session refuses it: "is already attached to session") or, once
  that session is closed, detached: what it had not loaded cannot load, and
  its values are the request's, possibly stale.
* A task that raises does so after the answer is out: the error escapes the
  app, uvicorn logs "Exception in ASGI application" and closes the client's
  keep-alive connection (in-process, httpx's ``ASGITransport`` raises it from
  the request), and the tasks queued after it never run.

On FastAPI 0.118 and later the request's connection goes back to the pool only
after its tasks: on a pool of one connection (in-memory SQLite) the task's own
session waits for it until ``pool_timeout``. A request that only read can end
its read first (``await session.commit()``).
"""

import logging
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Concatenate, ParamSpec

import anyio
from fastapi import BackgroundTasks, Depends, Request
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import InstanceState
from sqlmodel.ext.asyncio.session import AsyncSession

from ..db import run_in_transaction

logger = logging.getLogger("asyncpatterns.api")  # the API's one logger (see errors.py)

P = ParamSpec("P")
Work = Callable[Concatenate[AsyncSession, P], Awaitable[object]]


async def run_unit_of_work(
    session_maker: async_sessionmaker[AsyncSession],
    work: Work[P],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> bool:
    """Run ``work(session, *args, **kwargs)`` in a new session, in its own
    transaction (``run_in_transaction``: committed; a deadlock retried), and
    close the session, also when cancelled. ``work`` writes and does not commit.

    Returns ``True`` once committed. A failure is logged once, at ERROR: the
    task's name, the line of it that failed and the error's type; never its
    arguments nor the error's text. It is answered ``False``, never raised: nothing
    reaches the server after the answer is sent. A cancellation (server shutdown)
    goes on, after the close.
    """
    try:
        session = session_maker()
        try:
            await run_in_transaction(session, lambda session: work(session, *args, **kwargs))
        finally:
            with anyio.CancelScope(shield=True):  # the connection goes back to the pool
                await session.close()
    except Exception as exc:
        logger.error("background task %s failed: %s", _where(work, exc), type(exc).__name__)
        return False
    return True


def _where(work: Callable[..., object], exc: BaseException) -> str:
    """The task's name and the line of its own code that failed. Not the error's
    text: a database's message can quote the row ("Duplicate entry 'ada@...'")."""
    name = getattr(work, "__qualname__", type(work).__qualname__)
    code = getattr(work, "__code__", None)
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(exc.__traceback__)
        if code is not None and frame.filename == code.co_filename
    ]
    return f"{name} (line {lines[-1]})" if lines else name


def run_after_response(
    background_tasks: BackgroundTasks,
    session_maker: async_sessionmaker[AsyncSession],
    work: Work[P],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> None:
    """After the response, ``run_unit_of_work(session_maker, work, *args, **kwargs)``.

    ``TypeError`` at once (in the request, not later in the task) if an argument
    is an ORM object: pass its id, and let ``work`` load it in its own session.
    """
    _refuse_orm_objects([*args, *kwargs.values()])
    background_tasks.add_task(run_unit_of_work, session_maker, work, *args, **kwargs)


class AfterResponse:
    """An endpoint parameter (``after: AfterResponseDep``): ``after.run(work, *ids)``
    runs ``work`` after the response, on the app's session maker
    (``app.state.session_maker``, as ``create_app`` sets it)."""

    def __init__(self, request: Request, background_tasks: BackgroundTasks) -> None:
        self.session_maker: async_sessionmaker[AsyncSession] = request.app.state.session_maker
        self.background_tasks = background_tasks

    def run(self, work: Work[P], /, *args: P.args, **kwargs: P.kwargs) -> None:
        run_after_response(self.background_tasks, self.session_maker, work, *args, **kwargs)


AfterResponseDep = Annotated[AfterResponse, Depends()]


def _refuse_orm_objects(values: Iterable[Any]) -> None:
    for value in values:
        items = value if isinstance(value, list | tuple | set | frozenset) else (value,)
        for item in items:
            if isinstance(sa_inspect(item, raiseerr=False), InstanceState):
                raise TypeError(
                    f"a background task got a {type(item).__name__} object: pass its id "
                    "instead. The object belongs to the request's session (attached to it, "
                    "or detached once it closes); the task loads it in its own session."
                )
