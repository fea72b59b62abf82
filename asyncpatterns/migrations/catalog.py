"""The schema as each backend's catalog reports it: what Alembic's comparison leaves out.

Use ``schema(connection)`` to compare two databases in full, and
``catalog_differences(live, wanted)`` to say in words where they differ.
``migrations.stamp`` uses both, beside Alembic's ``compare_metadata``, before it
records a revision. What Alembic's autogenerate comparison does not see, and a
stamp would then silently accept:

* CHECK constraints (a database without ``balance_not_negative`` takes a negative
  balance);
* collations and character sets (a MySQL email column that is not binary-collated
  makes ``Ada@x`` and ``ada@x`` one value: a duplicate becomes "already exists",
  or two accounts one);
* table options (MySQL's engine: MyISAM has no transactions and no foreign keys),
  SQLite's ``AUTOINCREMENT`` (without it, ids are reused), PostgreSQL constraints as
  the server defines them and column defaults.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection


def schema(connection: Connection) -> dict[str, Any]:
    """Everything the database reports about the kit's tables, comparable as a dict."""
    inspector = inspect(connection)
    tables = {
        name: _table(connection, inspector, name)
        for name in inspector.get_table_names()
        if name != "alembic_version"
    }
    return {"tables": tables, **_backend_details(connection)}


def _table(connection: Connection, inspector: Any, name: str) -> dict[str, Any]:
    def by_name(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(items, key=lambda item: str(item.get("name")))

    columns = [
        {**column, "type": column["type"].compile(dialect=connection.dialect)}
        for column in inspector.get_columns(name)
    ]
    return {
        "columns": columns,
        "primary_key": inspector.get_pk_constraint(name),
        "foreign_keys": by_name(inspector.get_foreign_keys(name)),
        "indexes": by_name(inspector.get_indexes(name)),
        "unique": by_name(inspector.get_unique_constraints(name)),
        "checks": by_name(inspector.get_check_constraints(name)),
        # SQLite's one option, AUTOINCREMENT, is read from sqlite_master below
        "options": {} if connection.dialect.name == "sqlite" else inspector.get_table_options(name),
    }


def _backend_details(connection: Connection) -> dict[str, Any]:
    """What the inspector leaves out, read from each backend's own catalog."""
    backend = connection.dialect.name
    if backend == "sqlite":  # AUTOINCREMENT (ids never reused) is only in the CREATE TABLE
        rows = connection.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
        return {"autoincrement": {name: "AUTOINCREMENT" in sql for name, sql in rows}}
    if backend == "mysql":  # every column's charset and collation, every table's
        columns = connection.exec_driver_sql(
            "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, CHARACTER_SET_NAME, COLLATION_NAME,"
            " IS_NULLABLE, COLUMN_DEFAULT, EXTRA FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME != 'alembic_version'"
            " ORDER BY TABLE_NAME, ORDINAL_POSITION"
        )
        tables = connection.exec_driver_sql(
            "SELECT TABLE_NAME, ENGINE, TABLE_COLLATION FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME != 'alembic_version'"
            " ORDER BY TABLE_NAME"
        )
        return {"columns": [tuple(r) for r in columns], "engines": [tuple(r) for r in tables]}
    constraints = connection.exec_driver_sql(  # PostgreSQL: each constraint as it is defined
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace"
        " AND conrelid::regclass::text != 'alembic_version' ORDER BY 1, 2"
    )
    collations = connection.exec_driver_sql(
        "SELECT table_name, column_name, collation_name, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " AND table_name != 'alembic_version' ORDER BY 1, ordinal_position"
    )
    return {
        "constraints": [tuple(r) for r in constraints],
        "columns": [tuple(r) for r in collations],
    }


def catalog_differences(live: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Where two ``schema`` dicts differ, in words (tables only in one of them are left
    to Alembic's comparison, which names them)."""
    found: list[str] = []
    both = sorted(set(live["tables"]) & set(wanted["tables"]))
    for table in both:
        for part, value in wanted["tables"][table].items():
            if part != "columns" and live["tables"][table].get(part) != value:
                found.append(f"{table}: {part.replace('_', ' ')} differ")
    for part, rows in wanted.items():
        if part == "tables":
            continue
        if isinstance(rows, dict):  # SQLite: table -> AUTOINCREMENT
            found += [
                f"{table}: {part} differs"
                for table in both
                if live.get(part, {}).get(table) != rows.get(table)
            ]
            continue
        width = 1 if part == "engines" else 2  # a table by its name; the rest by table and name
        mine = {tuple(row[:width]): row for row in live.get(part, [])}
        theirs = {tuple(row[:width]): row for row in rows}
        for key in sorted(set(mine) | set(theirs), key=str):
            if key[0] in both and mine.get(key) != theirs.get(key):
                what = "table" if part == "engines" else part.removesuffix("s")
                found.append(f"{'.'.join(map(str, key))}: {what} definition differs")
    return list(dict.fromkeys(found))
