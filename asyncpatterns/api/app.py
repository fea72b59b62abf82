"""The app factory: a FastAPI app on async SQLModel where bad input is a 4xx, never a 500.

Use ``create_app(url)`` to build the app: its lifespan creates the tables and
disposes the engine, the engine and session maker live on ``app.state``, and
``get_session`` (``dependencies.py``) hands each request its own session.
``uvicorn asyncpatterns.api:app`` serves the module-level ``app``
(``$DATABASE_URL``).

What goes wrong without the lifespan: httpx's ``ASGITransport`` does not run
it, so a test that does not start it (``app.router.lifespan_context(app)``)
meets "no such table" on the first request. Without the handlers and the
middleware registered here, the failures ``errors.py`` lists are back:
tracebacks as 500s, and dropped keep-alive connections.
"""

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..config import DatabaseUnavailableError
from ..db import (
    LOCK_TIMEOUT,
    create_db_and_tables,
    in_memory_sqlite,
    make_engine,
    make_read_engine,
    make_session_maker,
)
from ..pooling import pool_settings_for_workers
from .errors import (
    UnexpectedErrorsAsJSON,
    database_error,
    database_unavailable,
    request_validation_failed,
)
from .idempotency import IDEMPOTENCY_TTL, KeyExpiry, purging_expired_keys
from .routers import accounts, teams, users
from .schemas import ErrorMessage
from .shutdown import CancelledAs503, wait_for_requests

# Seconds a request waits for a free pooled connection before it is answered 503.
POOL_TIMEOUT = 3.0
# Each app has two pools (its engine and its read engine): a worker's share of a
# connection budget is divided between them. serve --connection-budget sets these.
POOLS_PER_WORKER = 2
BUDGET_VARIABLE, WORKERS_VARIABLE = "ASYNCPATTERNS_CONNECTION_BUDGET", "ASYNCPATTERNS_WORKERS"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Before the first request, create the tables (``schema="create_all"``: tests,
    notebooks, the tour) or refuse a database not migrated to head
    (``schema="require_head"``: what ``serve`` runs). While the app serves, purge
    expired idempotency keys in the background (``idempotency.py``); at shutdown,
    stop the purge, let requests the server cancelled roll back (``shutdown.py``),
    then close the pools."""
    if app.state.schema == "require_head":
        from .. import migrations  # Alembic: only for apps that check their schema

        await migrations.require_head(app.state.engine.url)
    else:
        await create_db_and_tables(app.state.engine)
    try:
        async with purging_expired_keys(app.state.session_maker, app.state.idempotency):
            yield
    finally:
        await wait_for_requests(app.state.requests)  # those the server cancelled, if any
        await app.state.engine.dispose()  # and the read engine with it


def create_app(
    url: str | URL | None = None,
    *,
    pool_timeout: float = POOL_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    require_if_match: bool = False,
    schema: Literal["create_all", "require_head"] = "create_all",
    pool_options: Mapping[str, Any] | None = None,
    idempotency_ttl: timedelta = IDEMPOTENCY_TTL,
) -> FastAPI:
    """The app on ``url`` (default: ``$DATABASE_URL``, then the embedded SQLite file).

    Overload is a 503 + Retry-After, not a long wait then a 500:
    ``pool_timeout`` is how long a request waits for a pooled connection,
    ``lock_timeout`` how long a statement waits for a locked row (seconds).
    ``require_if_match``: a PATCH without If-Match is 428, not last-write-wins.
    ``schema``: ``"create_all"`` creates missing tables at start-up; ``"require_head"``
    (production: migrate first, ``python -m asyncpatterns migrate upgrade head``)
    refuses to start unless the database is at the newest migration.
    ``pool_options`` (``pool_size``, ``max_overflow``) size both of the app's pools.
    ``idempotency_ttl``: how long a retry with the same Idempotency-Key gets the first
    answer (24 h); older keys are new again, and purged (``app.state.idempotency``).
    """
    if schema not in ("create_all", "require_head"):
        raise ValueError(f"schema must be 'create_all' or 'require_head', got {schema!r}")
    # FastAPIOffline: FastAPI, with /docs and /redoc served from the installed
    # package instead of a CDN, so the docs work without internet access.
    app = FastAPIOffline(
        title="asyncpatterns",
        summary="Users, teams and accounts on async SQLModel.",
        lifespan=lifespan,
        responses={503: {"model": ErrorMessage, "description": "Database unavailable or busy"}},
    )
    pool = dict(pool_options or {})
    app.state.engine = make_engine(
        url, pool_timeout=pool_timeout, lock_timeout=lock_timeout, **pool
    )
    app.state.session_maker = make_session_maker(app.state.engine)
    # Endpoints of one SELECT read on an autocommit engine: one round trip, not three.
    app.state.read_engine = app.state.engine
    if not in_memory_sqlite(app.state.engine.url):
        reads = make_read_engine(app.state.engine.url, pool_timeout=pool_timeout, **pool)
        # Closing the app's engine closes its read engine too (both are the app's pools).
        event.listen(
            app.state.engine.sync_engine, "engine_disposed", lambda _: reads.sync_engine.dispose()
        )
        app.state.read_engine = reads
    app.state.read_session_maker = make_session_maker(app.state.read_engine)
    app.state.require_if_match = require_if_match
    app.state.schema = schema
    app.state.idempotency = KeyExpiry(ttl=idempotency_ttl)
    app.add_exception_handler(DatabaseUnavailableError, database_unavailable)
    app.add_exception_handler(PoolTimeoutError, database_unavailable)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(RequestValidationError, request_validation_failed)
    app.add_middleware(UnexpectedErrorsAsJSON)
    app.state.requests = set()  # the requests in flight (CancelledAs503 keeps it)
    # Outermost: a request cut off by the server's shutdown is a 503, not a 500.
    app.add_middleware(CancelledAs503, in_flight=app.state.requests)
    app.include_router(users.router)
    app.include_router(teams.router)
    app.include_router(accounts.router)
    return app


app = create_app()


def migrated_app() -> FastAPI:
    """The app ``serve`` runs (``uvicorn --factory``, once per worker): on
    ``$DATABASE_URL``, refusing a database that is not at the newest migration.
    With ``$ASYNCPATTERNS_CONNECTION_BUDGET`` (``serve --connection-budget N``) its
    pools get this worker's share of N (``budget_pool_options``)."""
    return create_app(schema="require_head", pool_options=budget_pool_options())


def budget_pool_options() -> dict[str, int] | None:
    """Pool sizes for one worker's share of ``$ASYNCPATTERNS_CONNECTION_BUDGET``
    connections, divided by ``$ASYNCPATTERNS_WORKERS`` (else ``$WEB_CONCURRENCY``,
    uvicorn's own default for ``--workers``; else 1). ``None`` when no budget is set:
    then each pool keeps the defaults (5 + 10, two pools per worker)."""
    budget = os.environ.get(BUDGET_VARIABLE)
    if not budget:
        return None
    workers = os.environ.get(WORKERS_VARIABLE) or os.environ.get("WEB_CONCURRENCY") or "1"
    return pool_settings_for_workers(int(budget), int(workers), pools_per_worker=POOLS_PER_WORKER)
