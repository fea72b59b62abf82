"""Alembic's environment for the kit's models: the async pattern.

Alembic is synchronous and the kit's engines are async. ``AsyncConnection.run_sync``
bridges the two: Alembic gets a plain ``Connection`` whose statements are awaited on
the async driver underneath (asyncpg, aiomysql, aiosqlite). No second, synchronous
driver to install, and the same engine settings as the app (``make_engine``).

The connection comes from ``asyncpatterns.migrations`` (``config.attributes``), or is
opened here for the URL given with ``--url`` or ``-x url=...``, else ``$DATABASE_URL``,
else the embedded SQLite file.
"""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from asyncpatterns.migrations import (
    MIGRATION_LOCK_WAIT,
    context_options,
    migration_engine,
    migration_transaction,
    refuse_unmanaged,
)

config = context.config
if config.config_file_name is not None:  # plain `alembic`: logging set up by alembic.ini
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str | None:
    """The URL given to this run, if any (``make_engine`` falls back to the environment)."""
    return config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")


def running(command: str) -> bool:
    """Whether this run is Alembic's ``command`` (from the kit's API or a command line)."""
    if config.attributes.get("command") == command:
        return True
    cmd = getattr(config.cmd_opts, "cmd", None)
    return bool(cmd) and getattr(cmd[0], "__name__", None) == command


def run_migrations_offline() -> None:
    """``--sql``: print the SQL for the URL's backend instead of running it."""
    engine = migration_engine(database_url())  # only its dialect: nothing is connected
    context.configure(dialect_name=engine.dialect.name, literal_binds=True, **context_options())
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on a sync ``Connection``, holding the migration lock."""
    lock_wait = config.attributes.get("lock_wait", MIGRATION_LOCK_WAIT)
    with migration_transaction(connection, lock_wait):
        if running("upgrade"):
            refuse_unmanaged(connection)  # tables create_all made, no revision: say what to do
        context.configure(connection=connection, **context_options(config.attributes.get("steps")))
        context.run_migrations()


async def run_async_migrations() -> None:
    """Open an async connection and run the migrations through ``run_sync``."""
    engine = migration_engine(database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` or `python -m asyncpatterns.migrations`
        asyncio.run(run_async_migrations())
    else:  # called from running async code, already inside run_sync
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
