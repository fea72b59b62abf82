"""Engine and session setup that is correct on SQLite, PostgreSQL and MySQL/MariaDB.

Use ``make_engine`` once per process (per event loop), ``make_session_maker``
to get sessions from it, and ``session_scope`` for a unit of work in scripts
and notebooks. What goes wrong without these defaults:

* SQLite ignores foreign keys unless every connection turns them on, and its
  driver opens transactions late, which breaks savepoints: we take over BEGIN.
* A pooled connection the server has closed (restart, ``wait_timeout``) fails
  the next query unless the pool pre-pings it.
* ``expire_on_commit=True`` (SQLAlchemy's default) makes every attribute access
  after ``commit()`` a lazy load, which async sessions cannot do implicitly.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.config import (
    ConfigurationError,
    DatabaseUnavailableError,
    mask_password,
    resolve_url,
)

# Server backends: keep a few connections, test each before use, and replace
# them before MySQL's wait_timeout (8 h by default) or a proxy's idle cut-off.
SERVER_POOL_DEFAULTS: dict[str, Any] = {
    "pool_size": 5,
    "max_overflow": 10,
    "pool_timeout": 30,
    "pool_recycle": 1800,
    "pool_pre_ping": True,
}

# The options above that every pool class accepts (the others size a QueuePool).
_ANY_POOL_OPTIONS = ("pool_recycle", "pool_pre_ping")

_INSTALL_HINT = "pip install sqlmodel aiosqlite asyncpg aiomysql"


def make_engine(url: str | URL | None = None, **options: Any) -> AsyncEngine:
    """Create an async engine with the kit's per-backend defaults.

    ``url`` falls back to ``$DATABASE_URL``, then to an embedded SQLite file.
    ``options`` go to ``create_async_engine`` and override the defaults.
    """
    resolved = resolve_url(url)
    backend = resolved.get_backend_name()
    if backend == "mysql" and "charset" not in resolved.query:
        resolved = resolved.update_query_dict({"charset": "utf8mb4"})
    defaults = {} if backend == "sqlite" else dict(SERVER_POOL_DEFAULTS)
    if not issubclass(options.get("poolclass", QueuePool), QueuePool):
        # NullPool, StaticPool...: no pool to size; keep pre-ping and recycle.
        defaults = {k: v for k, v in defaults.items() if k in _ANY_POOL_OPTIONS}
    try:
        engine = create_async_engine(resolved, **{**defaults, **options})
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise ConfigurationError(
            f"The driver for {mask_password(resolved)} is not installed ({exc}); "
            f"use one of sqlite+aiosqlite, postgresql+asyncpg, mysql+aiomysql "
            f"({_INSTALL_HINT})"
        ) from None
    if backend == "sqlite":
        _configure_sqlite(engine)
    _report_unreachable_server(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    """Foreign keys on, a busy timeout, WAL for files, and BEGIN emitted by us."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def _report_unreachable_server(engine: AsyncEngine) -> None:
    """Turn a failure to connect into one line: masked URL, reason, what to do."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except (OSError, asyncio.TimeoutError, dialect.loaded_dbapi.Error) as exc:
            reason = str(exc).splitlines()[0] or type(exc).__name__
            if engine.url.password:
                reason = reason.replace(engine.url.password, "***")
            raise DatabaseUnavailableError(
                f"Cannot connect to {mask_password(engine.url)}: {reason}. Start the "
                "server (see compose.yaml) or set DATABASE_URL to a reachable database."
            ) from exc


def make_session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no implicit lazy reload)."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def create_db_and_tables(engine: AsyncEngine) -> None:
    """Create the tables of every imported SQLModel (``table=True``) that are missing."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)


async def drop_db_and_tables(engine: AsyncEngine) -> None:
    """Drop the tables of every imported SQLModel (``table=True``)."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.drop_all)


@asynccontextmanager
async def session_scope(
    session_maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit if the block succeeds, roll back if it raises.

    Same as ``async with session_maker.begin() as session``, spelled out.
    """
    async with session_maker() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


@asynccontextmanager
async def throwaway_database(
    url: str | URL, prefix: str = "asyncpatterns_scratch"
) -> AsyncIterator[URL]:
    """A uniquely named, empty database beside ``url``, dropped afterwards.

    On a server: ``CREATE DATABASE`` on the same server (the user needs that
    privilege). On SQLite: a file in a temporary folder next to ``url``'s file.
    Tests, benchmarks and demos use it so they never touch anyone's data.
    """
    resolved = resolve_url(url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    if resolved.get_backend_name() == "sqlite":
        database = resolved.database
        folder = None if database in (None, "", ":memory:") else Path(database).parent
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-", dir=folder) as scratch:
            yield resolved.set(database=str(Path(scratch) / f"{name}.db"))
        return
    admin = make_engine(resolved, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            try:
                await conn.execute(text(f"CREATE DATABASE {name}"))
            except DBAPIError as exc:
                raise ConfigurationError(
                    f"Could not create a scratch database on {mask_password(resolved)} "
                    f"({str(exc.orig).splitlines()[0]}); use a user allowed to CREATE DATABASE"
                ) from None
        try:
            yield resolved.set(database=name)
        finally:
            force = " WITH (FORCE)" if resolved.get_backend_name() == "postgresql" else ""
            async with admin.connect() as conn:
                await conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
    finally:
        await admin.dispose()
