"""Schema migrations with Alembic, run on the kit's async engines, on every backend.

Use it instead of ``create_all`` once a database holds data you keep. ``create_all``
creates the tables that are missing and never alters one that exists: add a field to a
model, and the column is simply not there; the first INSERT then fails. Migrations are
the versioned, reviewed steps that take every database from the schema it has to the
one the models describe, and back.

``await upgrade(url)`` brings a database to the newest revision (``head``),
``await downgrade(url, "base")`` removes the kit's tables, ``await check(url)`` lists
what differs between a database and the models (``[]``: they agree), ``await
current(url)`` is the revision a database is at, and ``await require_head(url)``, at an
app's start-up instead of ``create_all``, refuses a database that is not at ``head``.
The environment lives in the package, so an installed kit migrates without a checkout.
From a shell::

    python -m asyncpatterns.migrations upgrade head          # or: --url URL upgrade head
    python -m asyncpatterns.migrations revision --autogenerate -m "what changed"

or plain ``alembic upgrade head`` in the project folder (``alembic.ini``). The URL is
found as everywhere in the kit: the argument (``--url``, ``-x url=...``), then
``$DATABASE_URL``, then the embedded SQLite file; it is never printed with its password.

The environment (``env.py``) is the ``alembic init -t async`` one, plus what a copy of
that lacks, in three rooms beside this one: ``locking.py`` (two migrations take turns, a
DDL statement waits briefly for a busy table, SQLite copies tables without losing rows
or ids), ``compare.py`` (the options ``env.py`` configures Alembic with: the kit's
column types written into a migration as what they store) and ``adopt.py`` (a database
``create_all`` made: ``upgrade`` names the revision it has, ``stamp`` checks it first).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import CommandLine, Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from .. import models  # noqa: F401  (registers the kit's tables on SQLModel.metadata)
from ..config import ConfigurationError, DatabaseUnavailableError, backend_name, resolve_url
from ..db import LOCK_TIMEOUT, make_engine
from .adopt import (  # noqa: F401  (env.py and the tests import them from here)
    SchemaMismatchError,
    UnmanagedDatabaseError,
    explain_unmanaged,
    matching_revision,
    refuse_unmanaged,
    stamp,
)
from .compare import (  # noqa: F401  (env.py, the tests and notebooks import them from here)
    compare_server_default,
    context_options,
    render_item,
)
from .locking import (  # noqa: F401  (env.py, the tests and notebooks import them from here)
    MIGRATION_LOCK_WAIT,
    MigrationLockTimeout,
    migration_transaction,
)

T = TypeVar("T")

FOLDER = Path(__file__).parent


class SchemaOutOfDateError(RuntimeError):
    """The database is not at the revision the code needs."""


# -- The API: upgrade, downgrade, check, current -------------------------------------


async def upgrade(
    url: str | URL | None = None, revision: str = "head", *, lock_wait: float = MIGRATION_LOCK_WAIT
) -> list[str]:
    """Migrate the database up to ``revision``; return the revisions applied, in order.

    Safe to run from several processes at once: one migrates, the others wait for it
    (up to ``lock_wait`` seconds), then find nothing left to do and return ``[]``.
    A database with the kit's tables and no revision (``create_all`` made it) is
    refused with ``UnmanagedDatabaseError``, which names the ``stamp`` that adopts it.
    """
    try:
        return await _run(url, lock_wait, command.upgrade, revision)
    except UnmanagedDatabaseError as exc:
        try:
            explained = await explain_unmanaged(resolve_url(url), exc.tables)
        except ConfigurationError:  # no scratch database (no CREATE DATABASE): say less
            raise exc from None
        raise explained from None


async def downgrade(
    url: str | URL | None, revision: str, *, lock_wait: float = MIGRATION_LOCK_WAIT
) -> list[str]:
    """Migrate the database down to ``revision`` (``"base"``: no kit table left);
    return the revisions undone, newest first."""
    return await _run(url, lock_wait, command.downgrade, revision)


async def current(url: str | URL | None = None) -> str | None:
    """The revision the database is at; ``None`` for a database never migrated."""
    return await _on_connection(url, MIGRATION_LOCK_WAIT, _current_revision)


async def require_head(url: str | URL | None = None) -> None:
    """Raise ``SchemaOutOfDateError`` unless the database is at the newest revision.

    For an app's start-up (the FastAPI lifespan): refuse to serve on a schema the code
    does not match, and say what to run, instead of failing on the first INSERT.
    """
    found, wanted = await current(url), head()
    if found != wanted:
        at = f"revision {found}" if found else "no revision"
        raise SchemaOutOfDateError(
            f"the database is at {at}, the code needs revision {wanted}: "
            "run `python -m asyncpatterns.migrations upgrade head` first"
        )


def head() -> str:
    """The newest revision: what ``upgrade()`` migrates to."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise ConfigurationError(f"expected one head revision, found {heads}: merge them")
    return heads[0]


async def check(url: str | URL | None = None) -> list[Any]:
    """What autogenerate finds different between the database and the models.

    ``[]`` means they agree, as far as autogenerate can see: it does not compare
    collations (a ``TypeDecorator`` is compared by its ``impl`` only), CHECK
    constraints or table options (charset, SQLite's AUTOINCREMENT).
    ``tests/test_migrations.py`` checks those directly.
    """
    return await _on_connection(url, MIGRATION_LOCK_WAIT, _differences)


async def _stamp_unchecked(url: str | URL | None, revision: str) -> None:
    """Alembic's stamp: ``adopt.stamp`` calls it once the schema is checked."""
    await _run(url, MIGRATION_LOCK_WAIT, command.stamp, revision)


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _differences(connection: Connection) -> list[Any]:
    options = {k: v for k, v in context_options().items() if k.startswith("compare_")}
    context = MigrationContext.configure(connection, opts=options)
    return compare_metadata(context, SQLModel.metadata)


async def _run(
    url: str | URL | None, lock_wait: float, alembic_command: Callable[..., None], revision: str
) -> list[str]:
    def run(connection: Connection) -> list[str]:
        config = alembic_config()
        config.attributes.update(
            connection=connection, lock_wait=lock_wait, steps=[], command=alembic_command.__name__
        )
        alembic_command(config, revision)
        return config.attributes["steps"]

    # Alembic keeps the running migration in module globals (``op``, ``context``): two
    # at once in one process would mix them up. Here they take turns; processes take
    # turns on the database's migration lock.
    async with _process_lock():
        return await _on_connection(url, lock_wait, run)


_PROCESS_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _process_lock() -> asyncio.Lock:
    return _PROCESS_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


async def _on_connection(
    url: str | URL | None, lock_wait: float, work: Callable[[Connection], T]
) -> T:
    """Run sync ``work`` on a connection of a one-off engine (the async pattern:
    ``run_sync`` hands Alembic a plain ``Connection`` over the async driver)."""
    engine = migration_engine(url, lock_wait)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(work)
    finally:
        await engine.dispose()


def migration_engine(url: str | URL | None, lock_wait: float = MIGRATION_LOCK_WAIT) -> AsyncEngine:
    """The kit's engine for a migration: no pool to keep, and on SQLite (where the only
    lock is the database's) a wait for the write lock as long as the migration lock's."""
    lock_timeout = lock_wait if backend_name(url) == "sqlite" else LOCK_TIMEOUT
    return make_engine(url, poolclass=NullPool, lock_timeout=lock_timeout)


def alembic_config(url: str | URL | None = None) -> Config:
    """Alembic's configuration for the kit's migrations, without an ``alembic.ini``
    (so an installed kit can migrate). ``url`` is used when no connection is given."""
    config = Config()
    config.set_main_option("script_location", str(FOLDER))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.attributes["url"] = url
    if shutil.which("ruff"):  # new revisions come out formatted and lint-clean
        config.set_section_option("post_write_hooks", "hooks", "ruff_format, ruff_fix")
        for hook, options in (("ruff_format", "format"), ("ruff_fix", "check --fix")):
            config.set_section_option("post_write_hooks", f"{hook}.type", "exec")
            config.set_section_option("post_write_hooks", f"{hook}.executable", "ruff")
            config.set_section_option(
                "post_write_hooks", f"{hook}.options", f"{options} REVISION_SCRIPT_FILENAME"
            )
    return config


# -- python -m asyncpatterns.migrations ---------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Alembic's command line on the kit's migrations: ``upgrade head``, ``downgrade
    base``, ``current``, ``history``, ``check``, ``revision --autogenerate -m ...``."""
    cli = CommandLine(prog="python -m asyncpatterns.migrations")
    cli.parser.add_argument("--url", help="database URL (default: $DATABASE_URL or SQLite)")
    options = cli.parser.parse_args(argv)
    if not hasattr(options, "cmd"):
        cli.parser.print_help(sys.stderr)
        return 2
    config = alembic_config(options.url)
    config.cmd_opts = options
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    for name in ("alembic", __name__):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # setup chatter
    try:
        if options.cmd[0] is command.stamp and not options.sql:
            # The kit's stamp: only a revision whose schema the database has.
            for revision in options.revisions:
                asyncio.run(stamp(options.url, revision))
        else:
            try:
                cli.run_cmd(config, options)
            except UnmanagedDatabaseError as exc:  # an upgrade on what create_all made
                try:
                    explained = asyncio.run(explain_unmanaged(resolve_url(options.url), exc.tables))
                except ConfigurationError:  # no scratch database: the shorter line
                    raise exc from None
                raise explained from None
    except (
        ConfigurationError,
        DatabaseUnavailableError,
        MigrationLockTimeout,
        CommandError,  # e.g. a revision that does not exist
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
