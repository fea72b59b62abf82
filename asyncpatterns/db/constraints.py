"""A write refused by a constraint, named from the table's own constraints.

Use ``constraint_error(exc, Model, values)`` where a write may be refused: it
turns the database's error into an ``AlreadyExistsError``,
``ReferenceNotFoundError``, ``StillReferencedError``, ``MissingValueError`` or
``CheckFailedError`` that names the model, the constraint, its columns and the
values the write gave them -- the same on SQLite, PostgreSQL and MySQL/MariaDB.
What goes wrong without it:

* Reading an attribute the model may lack to explain a duplicate
  (``user.email``): a ``Product`` has no email, and the explanation crashes.
  Here the constraint comes from the error and its columns from the metadata.
* Deciding "duplicate" by re-reading: MySQL's snapshot (REPEATABLE READ) may
  not show the row that won. The violated constraint is the only answer.
* Catching only ``IntegrityError``: MariaDB reports a failed CHECK as an
  ``OperationalError``. The codes decide here, whatever the class.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKeyConstraint,
    PrimaryKeyConstraint,
    Table,
    UniqueConstraint,
)
from sqlalchemy import inspect as sa_inspect

from .errors import (
    CHECK_CODES,
    FOREIGN_KEY_CODES,
    NOT_NULL_CODES,
    UNIQUE_CODES,
    error_code,
)


class ConstraintError(ValueError):
    """A write refused by one of the table's constraints.

    ``model`` and ``table`` name where (``model`` is the class name when it is
    known), ``constraint`` the constraint's name (None if the backend does not
    say), ``columns`` its columns, ``values`` theirs as the write gave them
    (empty when the write was many rows and the backend does not say which).
    """

    what = "refused by a constraint"

    def __init__(
        self,
        model: str,
        table: str,
        constraint: str | None,
        columns: tuple[str, ...],
        values: Mapping[str, Any],
    ) -> None:
        self.model, self.table, self.constraint = model, table, constraint
        self.columns, self.values = columns, dict(values)
        given = ", ".join(f"{name}={values[name]!r}" for name in columns if name in values)
        where = f" ({', '.join(columns)})" if columns and not given else ""
        named = f" [{constraint}]" if constraint else ""
        super().__init__(f"{model} {given or 'write'}{where}: {self.what}{named}")


class AlreadyExistsError(ConstraintError):
    """Another row already has these values of a unique key (or the primary key)."""

    what = "already exists"


class ReferenceNotFoundError(ConstraintError, LookupError):
    """A foreign key names a row that does not exist (or was deleted meanwhile)."""

    what = "names a row that does not exist"


class StillReferencedError(ConstraintError):
    """Rows of ``table`` still point at the row (a foreign key without ``ON DELETE
    CASCADE`` or ``SET NULL``); ``columns`` are theirs."""

    what = "is still referred to"


class MissingValueError(ConstraintError):
    """A NOT NULL column got no value."""

    what = "may not be null"


class CheckFailedError(ConstraintError):
    """A CHECK constraint refused the row."""

    what = "fails a check"


def constraint_error(
    exc: BaseException, model: Any, values: Mapping[str, Any] | None = None
) -> ConstraintError | None:
    """The ``ConstraintError`` for a write on ``model`` (a mapped class or a
    ``Table``) that ``exc`` reports refused, or None if ``exc`` is no constraint
    violation. ``values``: the written values by column name, when one row was
    written (they go into the message: keep secrets out of unique keys)."""
    code = error_code(exc)
    kind = None if code is None else _KINDS.get(code)
    if kind is None:
        return None
    table: Table = model if isinstance(model, Table) else sa_inspect(model).local_table
    name = table.name if isinstance(model, Table) else model.__name__
    error = exc.orig  # type: ignore[attr-defined]
    message = str(error.args[-1] if code[0] == "mysql" else error)
    named, columns, other = _what_failed(code[0], error, message)
    values = values or {}
    if kind is AlreadyExistsError:
        named, columns = _unique_key(table, named, columns)
    elif kind is ReferenceNotFoundError:
        statement = (getattr(exc, "statement", None) or "").lstrip()[:6].upper()
        if code[1] == 1451 or statement == "DELETE" or (other and other != table.name):
            # The row is a parent: the constraint, and its columns, belong to its children.
            # (PostgreSQL's detail names the parent's key columns: not the ones we want)
            referring, named, columns = _referring_key(table, other, named, ())
            return StillReferencedError(name, referring, named, columns, {})
        named, columns = _foreign_key(table, named, columns, values)
    elif kind is CheckFailedError:
        check = next((c for c in table.constraints if c.name and c.name == named), None)
        text = str(check.sqltext) if isinstance(check, CheckConstraint) else (named or "")
        columns = tuple(c.name for c in table.columns if re.search(rf"\b{c.name}\b", text))
    given = {column: values[column] for column in columns if column in values}
    return kind(name, table.name, named, columns, given)


_KINDS: dict[tuple[str, str | int], type[ConstraintError]] = {
    (backend, number): kind
    for codes, kind in [
        (UNIQUE_CODES, AlreadyExistsError),
        (FOREIGN_KEY_CODES, ReferenceNotFoundError),
        (NOT_NULL_CODES, MissingValueError),
        (CHECK_CODES, CheckFailedError),
    ]
    for backend, numbers in codes.items()
    for number in numbers
}


def _what_failed(
    backend: str, error: Any, message: str
) -> tuple[str | None, tuple[str, ...], str | None]:
    """(constraint name, columns, table) as far as the backend's error says them.

    PostgreSQL reports them as fields (asyncpg: on the cause; psycopg: ``diag``);
    MySQL and SQLite only in the message, in a fixed shape around identifiers
    (read after the code decided what failed, never to decide it).
    """
    if backend == "postgresql":
        fields = getattr(error, "diag", None) or error.__cause__
        column = getattr(fields, "column_name", None)
        detail = getattr(fields, "detail", None) or getattr(fields, "message_detail", None) or ""
        key = re.match(r"Key \(([^)]*)\)=", detail)  # "Key (a, b)=(1, 2) already exists."
        columns = (column,) if column else tuple(key[1].split(", ")) if key else ()
        table = getattr(fields, "table_name", None)
        return getattr(fields, "constraint_name", None), columns, table
    if backend == "mysql":
        fk = re.search(r"`([^`]*)`, CONSTRAINT `([^`]*)` FOREIGN KEY \(([^)]*)\)", message)
        if fk:  # "(`db`.`child`, CONSTRAINT `fk_q` FOREIGN KEY (`q`) REFERENCES ..."
            return fk[2], tuple(c.strip("` ") for c in fk[3].split(",")), fk[1]
        key = re.search(r" for key '(?:[^'.]*\.)?([^']*)'$", message)  # MySQL 8: 'user.ix'
        column = re.match(r"(?:Column|Field) '([^']*)'", message)
        check = re.search(r"constraint [`']([^`']*)[`']", message, re.IGNORECASE)
        named = key[1] if key else check[1] if check else None
        return named, (column[1],) if column else (), None
    # SQLite: "UNIQUE constraint failed: t.a, t.b", "NOT NULL ... failed: t.a",
    # "CHECK constraint failed: name", "UNIQUE constraint failed: index 'ix_name'"
    failed = message.partition(" constraint failed: ")[2]
    index = re.fullmatch(r"index '([^']*)'", failed)
    if index:
        return index[1], (), None
    if "." in failed.partition(" ")[0]:
        pairs = [part.partition(".") for part in failed.split(", ")]
        return None, tuple(column for _, _, column in pairs), pairs[0][0]
    return failed or None, (), None


def _unique_key(
    table: Table, named: str | None, columns: tuple[str, ...]
) -> tuple[str | None, tuple[str, ...]]:
    """The unique key of ``table`` (name, columns) that the error names, by name
    (PostgreSQL, MySQL) or by columns (SQLite)."""
    keys = [c for c in table.constraints if isinstance(c, PrimaryKeyConstraint | UniqueConstraint)]
    for key in [*keys, *(index for index in table.indexes if index.unique)]:
        names = tuple(column.name for column in key.columns)
        if named is not None and named in _names_of(key, table, names):
            return named, names
        if named is None and names == columns:
            return (key.name if isinstance(key.name, str) else None), names
    return named, columns


def _names_of(key: Any, table: Table, columns: tuple[str, ...]) -> set[str]:
    """The names a backend gives ``key``: its own, or the one it makes up when unnamed
    (PostgreSQL ``table_pkey`` and ``table_col1_col2_key``; MySQL ``PRIMARY`` and the
    first column's name). Name your constraints (``models`` has a naming convention)
    when two unnamed keys of one table start with the same column."""
    if isinstance(key, PrimaryKeyConstraint):
        return {key.name or f"{table.name}_pkey", "PRIMARY"}
    if isinstance(key.name, str):
        return {key.name}
    return {f"{table.name}_{'_'.join(columns)}_key", columns[0]}


def _foreign_key(
    table: Table, named: str | None, columns: tuple[str, ...], values: Mapping[str, Any]
) -> tuple[str | None, tuple[str, ...]]:
    """The foreign key of ``table`` (name, columns) the error names. SQLite names
    none: then the one the row sets, or all it sets when it sets several."""
    keys = list(table.foreign_key_constraints)
    for key in keys:
        names = tuple(column.name for column in key.columns)
        if (named is not None and key.name == named) or (named is None and names == columns):
            return key.name, names
    if named is not None or columns:
        return named, columns
    candidates = [k for k in keys if any(values.get(c.name) is not None for c in k.columns)]
    return _one_or_all(candidates or keys)


def _referring_key(
    table: Table, other: str | None, named: str | None, columns: tuple[str, ...]
) -> tuple[str, str | None, tuple[str, ...]]:
    """(referring table, key name, its columns) of the foreign key that keeps a row of
    ``table`` from being deleted; SQLite says none: every key pointing at ``table``."""
    keys = [
        key
        for child in table.metadata.tables.values()
        for key in child.foreign_key_constraints
        if key.referred_table is table
        and (other is None or child.name == other)
        and (key.ondelete or "NO ACTION").upper() in ("NO ACTION", "RESTRICT")  # the refusing kind
    ]
    matching = [key for key in keys if named is not None and key.name == named] or keys
    if not matching:
        return other or "another table", named, columns
    name, found = _one_or_all(matching)
    return matching[0].table.name, named or name, columns or found


def _one_or_all(keys: list[ForeignKeyConstraint]) -> tuple[str | None, tuple[str, ...]]:
    if len(keys) == 1:
        return keys[0].name, tuple(column.name for column in keys[0].columns)
    return None, tuple(column.name for key in keys for column in key.columns)


def is_unique_violation(exc: BaseException, column: Any = None) -> bool:
    """True if a write failed on a unique key (or the primary key); with ``column``,
    only if the key is that one column's."""
    if column is None:
        code = error_code(exc)
        return code is not None and code[1] in UNIQUE_CODES[code[0]]
    refused = constraint_error(exc, column.table)
    return isinstance(refused, AlreadyExistsError) and refused.columns == (column.name,)
