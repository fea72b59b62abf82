"""The API's one map from error to status: overload is a 503, bad input a 4xx,
a bug a logged 500 with an id.

Use it by registering the handlers and the middleware on the app, as
``create_app`` does, and ``_errors`` to document each endpoint's answers.
What goes wrong without it:

* A database that cannot be reached, an exhausted pool, a row locked too
  long or a statement stopped at its time limit is a traceback and a 500;
  here it is a 503 with a reason and ``Retry-After`` (the details, with the
  masked URL, go to the log only).
* Starlette's last-resort handler answers a bug, then re-raises: uvicorn
  closes the keep-alive connection, and the client's next request fails too.
* A 422 that echoes NaN or a lone surrogate from the input cannot be encoded
  as JSON, and turns into a 500.
"""

import logging
import math
import uuid
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..db import is_connection_lost, is_lock_timeout, is_statement_timeout
from .schemas import ErrorMessage

# One logger for the whole API, by the name it always had: configure it (or
# silence it) as "asyncpatterns.api", whichever module logs.
logger = logging.getLogger("asyncpatterns.api")


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
    """A lost connection, a lock wait that timed out or a statement stopped at its
    time limit is overload (503); any other database error is a bug, answered
    like every unexpected error."""
    if is_connection_lost(exc):
        logger.error("%s %s: connection lost: %s", request.method, request.url.path, exc)
        return _unavailable("the connection to the database was lost", 5)
    if is_lock_timeout(exc):
        logger.warning("%s %s: lock timeout: %s", request.method, request.url.path, exc)
        return _unavailable("the rows are busy, try again", 1)
    if is_statement_timeout(exc):  # the transaction is rolled back, the connection kept
        logger.warning("%s %s: statement timeout: %s", request.method, request.url.path, exc)
        return _unavailable("a statement ran past its time limit and was stopped", 5)
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
