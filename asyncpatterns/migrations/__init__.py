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

What the environment does that a copied ``alembic init -t async`` does not:

* Two processes that migrate at once (two app replicas starting, a deploy retried)
  take turns: the second waits for the migration lock, then finds nothing left to do.
  Without it, both run the same ``CREATE TABLE``/``ALTER`` and one fails half-way
  (on MySQL, after committing part of its work).
* A DDL statement waits at most ``LOCK_TIMEOUT`` for a table that the app is using,
  instead of queueing every query behind it (PostgreSQL) or waiting up to a year
  (MySQL's metadata lock wait).
* SQLite alterations copy the table (batch mode) with foreign keys off, so copying a
  referenced table does not cascade-delete the rows that point at it, and keep
  ``AUTOINCREMENT`` counters, so an id is never handed out twice.
* The kit's column types are written into a migration as what they store
  (``Money`` as ``BIGINT``, ``Email`` as a binary-collated ``VARCHAR`` on MySQL), so a
  migration never changes meaning when the Python types do.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import CommandLine, Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, text
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import CompileError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import SQLModel

from .. import models  # noqa: F401  (registers the kit's tables on SQLModel.metadata)
from ..config import ConfigurationError, DatabaseUnavailableError, backend_name
from ..db import LOCK_TIMEOUT, SQLITE_BEGIN, is_lock_timeout, make_engine

T = TypeVar("T")
logger = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
# How long a migration waits for another one to finish before giving up.
MIGRATION_LOCK_WAIT = 60.0
# PostgreSQL advisory lock key, MySQL named lock: "the kit is migrating this database".
_PG_LOCK_KEY = 0x61_73_79_6E_63_70_61_74  # "asyncpat"
_MYSQL_LOCK_PREFIX = "asyncpatterns.migrate."
# The dialects a rendered column type must be right for.
_DIALECTS = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),
    "mysql": mysql.dialect(),
}


class SchemaOutOfDateError(RuntimeError):
    """The database is not at the revision the code needs."""


class MigrationLockTimeout(TimeoutError):
    """Another migration held the database's migration lock for longer than the wait."""


# -- The API: upgrade, downgrade, check, current -------------------------------------


async def upgrade(
    url: str | URL | None = None, revision: str = "head", *, lock_wait: float = MIGRATION_LOCK_WAIT
) -> list[str]:
    """Migrate the database up to ``revision``; return the revisions applied, in order.

    Safe to run from several processes at once: one migrates, the others wait for it
    (up to ``lock_wait`` seconds), then find nothing left to do and return ``[]``.
    """
    return await _run(url, lock_wait, command.upgrade, revision)


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
        config.attributes.update(connection=connection, lock_wait=lock_wait, steps=[])
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


# -- What env.py configures Alembic with -----------------------------------------------


def context_options(steps: list[str] | None = None) -> dict[str, Any]:
    """The options ``env.py`` passes to ``context.configure`` (and ``check`` compares with)."""
    options: dict[str, Any] = {
        "target_metadata": SQLModel.metadata,
        # SQLite cannot ALTER most things: batch operations copy the table instead.
        "render_as_batch": True,
        "compare_type": True,
        "compare_server_default": compare_server_default,
        "render_item": render_item,
    }
    if steps is not None:

        def record(*, step: Any, **_: Any) -> None:
            steps.append(step.up_revision_id)

        options["on_version_apply"] = record
    return options


def compare_server_default(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Compare boolean defaults by value: MySQL stores ``false`` as ``0`` and reflects
    it so, which Alembic's text comparison reports as a change. ``None``: Alembic decides."""
    if context.dialect.name != "mysql" or not isinstance(metadata_column.type, Boolean):
        return None
    return _boolean_value(inspected_default) != _boolean_value(rendered_metadata_default)


def _boolean_value(default: str | None) -> str | None:
    if default is None:
        return None
    value = default.strip("'\"() ").lower()
    return {"false": "0", "true": "1"}.get(value, value)


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | bool:
    """Write a ``TypeDecorator`` (the kit's ``Money``, ``ExactText``, ``Email``;
    SQLModel's ``AutoString``) into a migration as the type it stores: its ``impl``,
    with a ``with_variant`` where a backend stores something else. A migration then
    needs no import of the application, and keeps its meaning when the Python type
    changes. Anything else renders as Alembic renders it (``False``)."""
    if kind != "type" or not isinstance(obj, TypeDecorator):
        return False
    stored = obj.impl_instance
    rendered = _render_type(stored, autogen_context)
    for name, dialect in _DIALECTS.items():
        variant = obj.load_dialect_impl(dialect)
        if _ddl(variant, dialect) != _ddl(stored, dialect):
            rendered += f".with_variant({_render_type(variant, autogen_context)}, {name!r})"
    return rendered


def _render_type(type_: TypeEngine[Any], autogen_context: Any) -> str:
    module = type(type_).__module__
    if module.startswith("sqlalchemy.dialects."):
        dialect_name = module.split(".")[2]
        autogen_context.imports.add(f"from sqlalchemy.dialects import {dialect_name}")
        return f"{dialect_name}.{type_!r}"
    return f"sa.{type_!r}"


def _ddl(type_: TypeEngine[Any], dialect: Any) -> str:
    try:
        return type_.compile(dialect=dialect)
    except CompileError as exc:  # e.g. VARCHAR without a length on MySQL
        return f"error: {exc}"


# -- One migration at a time, in one transaction -----------------------------------------


@contextmanager
def migration_transaction(
    connection: Connection, lock_wait: float = MIGRATION_LOCK_WAIT
) -> Iterator[None]:
    """Hold the database's migration lock, inside a transaction committed at the end.

    A second migration waits here (up to ``lock_wait`` seconds) and then sees the
    first one's result. PostgreSQL and SQLite roll back a failed migration entirely
    (transactional DDL); MySQL commits each DDL statement as it runs.
    """
    backend = connection.dialect.name
    logger.info("Waiting for the migration lock (at most %g s)", lock_wait)
    try:
        if backend == "sqlite":
            with _sqlite_migration(connection):
                yield
        elif backend == "postgresql":
            with connection.begin():
                _postgresql_lock(connection, lock_wait)
                yield
        else:
            with _mysql_lock(connection, lock_wait), connection.begin():
                yield
    except DBAPIError as exc:
        if is_lock_timeout(exc) and _waiting_for_lock(exc):
            raise MigrationLockTimeout(_lock_message(lock_wait)) from exc
        raise


def _lock_message(lock_wait: float) -> str:
    return (
        f"another migration held this database's migration lock for more than {lock_wait:g} s; "
        "wait for it to finish, then run the migration again"
    )


def _waiting_for_lock(exc: DBAPIError) -> bool:
    statement = (exc.statement or "").upper()
    return statement.startswith("BEGIN") or "PG_ADVISORY_XACT_LOCK" in statement


def _postgresql_lock(connection: Connection, lock_wait: float) -> None:
    # Wait up to lock_wait for the lock, then go back to the short wait for DDL locks.
    previous = connection.exec_driver_sql("SHOW lock_timeout").scalar_one()
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_wait * 1000)}")
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    connection.execute(text("SELECT set_config('lock_timeout', :value, true)"), {"value": previous})


@contextmanager
def _mysql_lock(connection: Connection, lock_wait: float) -> Iterator[None]:
    # A named lock belongs to the session: DDL's implicit commits do not release it.
    database = connection.exec_driver_sql("SELECT DATABASE()").scalar_one()
    name = f"{_MYSQL_LOCK_PREFIX}{database}"[:64]
    # DDL waits for a table's metadata lock up to lock_wait_timeout: one year by default.
    connection.exec_driver_sql(f"SET SESSION lock_wait_timeout = {max(1, round(LOCK_TIMEOUT))}")
    got = connection.execute(
        text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": lock_wait}
    ).scalar()
    connection.commit()  # start the migration with a fresh snapshot
    if got != 1:
        raise MigrationLockTimeout(_lock_message(lock_wait))
    try:
        yield
    finally:
        connection.rollback()  # if the migration failed mid-transaction
        connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        connection.commit()


@contextmanager
def _sqlite_migration(connection: Connection) -> Iterator[None]:
    """SQLite: take the write lock first (``BEGIN IMMEDIATE``), with foreign keys off
    while tables are copied, checked before the commit; keep AUTOINCREMENT counters."""
    _sqlite_pragma(connection, "foreign_keys=OFF")  # outside a transaction, or ignored
    try:
        connection.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with connection.begin():
            counters = _sqlite_counters(connection)
            yield
            _restore_sqlite_counters(connection, counters)
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"the migration broke foreign keys (rolled back): {broken}")
    finally:
        _sqlite_pragma(connection, "foreign_keys=ON")


def _sqlite_pragma(connection: Connection, pragma: str) -> None:
    # On the DBAPI connection: through SQLAlchemy, the statement would begin a transaction.
    cursor = connection.connection.cursor()
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _sqlite_counters(connection: Connection) -> dict[str, int]:
    """AUTOINCREMENT counters: copying a table restarts them at its highest id."""
    if not _has_table(connection, "sqlite_sequence"):
        return {}
    rows = connection.exec_driver_sql("SELECT name, seq FROM sqlite_sequence").all()
    return {name: seq for name, seq in rows}


def _restore_sqlite_counters(connection: Connection, counters: dict[str, int]) -> None:
    for table, seq in counters.items():
        if not _has_table(connection, table) or not _has_table(connection, "sqlite_sequence"):
            continue
        found = connection.execute(
            text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}
        ).scalar()
        if found is None:
            connection.execute(
                text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :s)"),
                {"t": table, "s": seq},
            )
        elif found < seq:
            connection.execute(
                text("UPDATE sqlite_sequence SET seq = :s WHERE name = :t"), {"t": table, "s": seq}
            )


def _has_table(connection: Connection, name: str) -> bool:
    query = text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name")
    return connection.execute(query, {"name": name}).first() is not None


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
        cli.run_cmd(config, options)
    except (ConfigurationError, DatabaseUnavailableError, MigrationLockTimeout) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
