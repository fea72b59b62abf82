"""A database made by ``create_all``: which revision it is, and stamping it safely.

Use ``await stamp(url, revision)`` instead of Alembic's ``stamp`` to record that a
database already has a revision's schema: it compares the live schema with that
revision's, built in a scratch database beside it (``throwaway_database``), and refuses
when they differ. ``await matching_revision(url)`` names the revision whose schema the
database has. ``upgrade`` uses both: on a database that holds the kit's tables but no
revision, it stops with one line that names the exact ``stamp`` command.

What goes wrong without it: ``upgrade head`` on a database the app made with
``create_all`` runs the first revision's ``CREATE TABLE`` on tables that exist, and
fails with a long traceback that does not say what to do. ``stamp`` believes whatever
revision it is given: stamp an older one on today's schema, and the next ``upgrade``
runs steps (adding a column, backfilling it) over a schema that already has them, and
the recorded version moves backwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import URL, Connection
from sqlmodel import SQLModel

from ..config import ConfigurationError, resolve_url
from ..db import throwaway_database
from .catalog import catalog_differences, schema


class UnmanagedDatabaseError(ConfigurationError):
    """The database holds the kit's tables but no migration revision."""

    def __init__(self, message: str, tables: list[str]) -> None:
        super().__init__(message)
        self.tables = tables


def refuse_unmanaged(connection: Connection) -> None:
    """Raise ``UnmanagedDatabaseError`` if the kit's tables are there but no revision
    (``env.py`` calls it, holding the migration lock, before an upgrade)."""
    tables = kit_tables_without_revision(connection)
    if tables:
        raise UnmanagedDatabaseError(
            f"the database has the kit's tables ({', '.join(tables)}) but no migration "
            "revision: `python -m asyncpatterns migrate stamp REVISION` adopts it",
            tables,
        )


class SchemaMismatchError(ConfigurationError):
    """The database's schema is not the schema of the revision named."""


def kit_tables_without_revision(connection: Connection) -> list[str]:
    """The kit's tables in a database that records no revision (``[]``: nothing to adopt,
    or a database the migrations manage)."""
    names = set(inspect(connection).get_table_names())
    if "alembic_version" in names and MigrationContext.configure(connection).get_current_heads():
        return []
    return sorted(names & set(SQLModel.metadata.tables))


async def matching_revision(url: str | URL) -> str | None:
    """The revision whose schema the database at ``url`` has, or ``None``.

    Each revision is applied, oldest first, to one scratch database beside ``url`` (on a
    server the user needs CREATE DATABASE) and the two schemas are compared.
    """
    from . import upgrade  # the package's upgrade: it takes the process's migration turn

    with _quietly():
        async with throwaway_database(url, "asyncpatterns_adopt") as scratch:
            for revision in _revisions():
                await upgrade(scratch, revision)
                if not await _all_differences(url, scratch):
                    return revision
    return None


async def schema_differences(url: str | URL, revision: str) -> list[str]:
    """What differs between the database at ``url`` and ``revision``'s schema, in words."""
    from . import upgrade

    with _quietly():
        async with throwaway_database(url, "asyncpatterns_adopt") as scratch:
            await upgrade(scratch, revision)
            return await _all_differences(url, scratch)


async def stamp(url: str | URL | None, revision: str = "head") -> str:
    """Record ``revision`` in the database without running it, if its schema is that
    revision's; raise ``SchemaMismatchError`` (changing nothing) if it is not. Returns
    the revision stamped."""
    from . import _stamp_unchecked, head

    resolved = resolve_url(url)
    wanted = head() if revision == "head" else revision
    differences = await schema_differences(resolved, wanted)
    if differences:
        differences.sort(key=lambda d: not d.startswith("table "))  # whole tables first
        found = await matching_revision(resolved)
        hint = (
            f"it has revision {found}'s: `python -m asyncpatterns migrate stamp {found}`"
            if found
            else "it matches no revision: make it match one by hand, then stamp that one"
        )
        raise SchemaMismatchError(
            f"refusing to stamp {wanted}: the database's schema differs from it "
            f"({'; '.join(differences[:3])}{'; ...' if len(differences) > 3 else ''}); {hint}"
        )
    await _stamp_unchecked(resolved, wanted)
    return wanted


async def explain_unmanaged(url: str | URL, tables: list[str]) -> UnmanagedDatabaseError:
    """The one-line error for ``upgrade`` on a database ``create_all`` made."""
    found = await matching_revision(url)
    what = f"the database has the kit's tables ({', '.join(tables)}) but no migration revision"
    if found is None:
        return UnmanagedDatabaseError(
            f"{what}, and its schema matches no revision: make it match one by hand, "
            "then `python -m asyncpatterns migrate stamp REVISION` (it checks)",
            tables,
        )
    return UnmanagedDatabaseError(
        f"{what} (made with create_all?); its schema is revision {found}'s: adopt it with "
        f"`python -m asyncpatterns migrate stamp {found}`, then upgrade",
        tables,
    )


@contextmanager
def _quietly() -> Iterator[None]:
    """The scratch database's migrations and comparisons, without their INFO lines."""
    loggers = [logging.getLogger(name) for name in ("alembic", __package__)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _revisions() -> list[str]:
    from . import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config()).walk_revisions()
    return [script.revision for script in reversed(list(scripts))]


async def _reflected(url: URL) -> MetaData:
    """The kit's tables as the database at ``url`` reports them."""

    from . import MIGRATION_LOCK_WAIT, _on_connection

    def reflect(connection: Connection) -> MetaData:
        metadata = MetaData()
        metadata.reflect(connection, only=lambda name, _: name != "alembic_version")
        return metadata

    return await _on_connection(url, MIGRATION_LOCK_WAIT, reflect)


async def _all_differences(url: str | URL, scratch: URL) -> list[str]:
    """What differs between the database at ``url`` and the one at ``scratch``, in
    words: Alembic's comparison, then what it does not see (``catalog.py``: CHECK
    constraints, collations, table options)."""
    from . import MIGRATION_LOCK_WAIT, _on_connection

    found = [_describe(d) for d in await _differences(url, await _reflected(scratch))]
    live = await _on_connection(url, MIGRATION_LOCK_WAIT, schema)
    wanted = await _on_connection(scratch, MIGRATION_LOCK_WAIT, schema)
    return found + [d for d in catalog_differences(live, wanted) if d not in found]


async def _differences(url: str | URL, metadata: MetaData) -> list[Any]:
    """Alembic's comparison of the live database (at ``url``) with ``metadata``."""

    from . import MIGRATION_LOCK_WAIT, _on_connection

    def compare(connection: Connection) -> list[Any]:
        options = {"compare_type": True, "compare_server_default": True}
        return compare_metadata(MigrationContext.configure(connection, opts=options), metadata)

    return await _on_connection(url, MIGRATION_LOCK_WAIT, compare)


def _describe(difference: Any) -> str:
    """One of Alembic's differences in words; "extra" is in the database only."""
    if isinstance(difference, list):  # modify_* of one column: a list of tuples
        op, _schema, table, column = difference[0][:4]
        return f"{table}.{column}: {op.removeprefix('modify_')} differs"
    op = difference[0]
    if op in ("add_column", "remove_column"):
        table, column = difference[2], difference[3].name
        return f"{table}.{column} {'missing' if op == 'add_column' else 'extra'}"
    if op in ("add_table", "remove_table"):
        return f"table {difference[1].name} {'missing' if op == 'add_table' else 'extra'}"
    item = difference[1]
    name = getattr(item, "name", None) or item
    return f"{op.replace('_', ' ')} {name}"
