"""A request cut off by the server's shutdown is a 503, not a 500.

Use ``CancelledAs503`` as the app's outermost middleware (``create_app`` adds
it). What goes wrong without it: after SIGTERM, uvicorn lets the requests in
flight finish for ``timeout_graceful_shutdown`` seconds (``serve
--graceful-timeout``), then cancels the rest. A cancelled request that has not
begun its answer escapes the app as ``CancelledError``, and uvicorn answers it
"500 Internal Server Error", with a traceback in the log. Nothing of it was
committed (SQLAlchemy closes a connection cancelled mid-statement, and the
database rolls its transaction back), so the true answer is a 503: not done,
safe to retry, on another worker or after the restart. That holds for ``async
def`` endpoints (all of the kit's): a ``def`` endpoint runs in a thread that a
cancellation cannot stop, so its work may still complete after the 503 -- make
such an endpoint idempotent (``Idempotency-Key``) or keep it short.

uvicorn does not wait for the requests it cancelled: it runs the lifespan's
shutdown and closes the event loop, cancelling them a second time, mid-cleanup.
On SQLite that second cancel can strand aiosqlite's connection thread (its
close is queued behind the statement still waiting for the write lock) and the
process never exits. So the lifespan waits for them first
(``wait_for_requests``), then closes the pools.
"""

import asyncio
from typing import Any

from fastapi import status
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import logger

SHUTTING_DOWN = "Server shutting down: the request was not completed; retry it"
# Seconds the lifespan's shutdown waits for cancelled requests to end: a statement
# waiting for a lock gives up within the lock timeout (5 s), and only then can its
# connection close.
CANCELLED_REQUESTS_WAIT = 6.0
# What uvicorn cancels a request with once ``timeout_graceful_shutdown`` is over.
UVICORN_GRACE_EXCEEDED = "timeout graceful shutdown exceeded"


class CancelledAs503:
    """ASGI middleware: a request cancelled before its answer began gets a 503 with
    Retry-After. A cancellation by uvicorn's shutdown ends there; any other (a
    caller's timeout around an in-process request) goes on, after the 503."""

    def __init__(self, app: ASGIApp, in_flight: set[asyncio.Task[Any]] | None = None) -> None:
        self.app = app
        # The tasks of the requests being answered, for ``wait_for_requests``.
        self.in_flight = set() if in_flight is None else in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            await self._answer(scope, receive, send)
        finally:
            self.in_flight.discard(task)  # type: ignore[arg-type]

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError as exc:
            if started:  # half an answer is out: only closing the connection can tell
                raise
            logger.warning(
                "%s %s: cancelled before its answer: 503", scope["method"], scope["path"]
            )
            response = JSONResponse(
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                content={"detail": SHUTTING_DOWN},
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            task = asyncio.current_task()
            if task is None or not any(UVICORN_GRACE_EXCEEDED in str(a) for a in exc.args):
                raise  # someone else's cancellation (a caller's timeout): theirs to finish
            # The server ends the request past its grace period: it has ended, answered.
            # (Re-raised, uvicorn would log it as an error in the app, with a traceback.)
            task.uncancel()


async def wait_for_requests(
    in_flight: set[asyncio.Task[Any]], patience: float = CANCELLED_REQUESTS_WAIT
) -> None:
    """Wait up to ``patience`` seconds for the requests in ``in_flight`` to end (at
    shutdown, after the server cancelled those past its grace period)."""
    pending = {task for task in in_flight if not task.done()}
    if not pending:
        return
    logger.warning("waiting for %d cancelled request(s) to roll back", len(pending))
    _, still = await asyncio.wait(pending, timeout=patience)
    if still:
        logger.error("%d request(s) still running at shutdown", len(still))
