"""Keyset pagination: pages by ``(sort key, primary key)`` and an opaque cursor.

Use ``page = await keyset_page(session, Model, order_by=Model.name, cursor=c)``:
``page.items``, then ``page.next`` / ``page.previous``, cursors to hand the
client (``None``: no page that way). Any table with a one-column primary key
works; sort by a NOT NULL column of ``int``, ``str``, aware ``datetime`` or
``UUID`` values, with an index on ``(sort key, primary key)``. What goes wrong
without it:

* ``OFFSET 100000``: the database reads and throws away 100,000 rows to find the
  page; the deeper the page, the slower (``python -m asyncpatterns bench
  --only pagination`` measures it). Here the page starts where the last one
  ended, at an index seek: page 1,000 costs what page 1 does.
* Offsets under writers: a row deleted before the current page shifts every row
  after it one place up, and the next page skips one; a row inserted repeats
  one. Here a page starts after the last row seen, whatever moved: a row there
  for the whole walk is seen exactly once.
* Sorting by a key that is not unique (a name): rows with the same name come in
  any order, so they are skipped or repeated between pages. Here the primary key
  breaks the ties, in the ORDER BY and in the cursor.
* A cursor trusted as it came: a tampered or truncated one was a 500 (a value
  the column cannot hold, a NUL PostgreSQL refuses) or a different query. Here
  it is decoded, checked against the column's type and size (and its
  TypeDecorator's own bind checks), and bound to its sort order; anything else is
  ``InvalidCursorError`` (a ``ValueError``: 400).
* A session kept across pages: a cached copy of a row someone renamed made the
  next cursor from the stale name, and the walk never ended. Each page re-reads
  its rows (``populate_existing``).
* MySQL's ``ENUM`` sorts by the order its values were declared in, but compares
  as text: pages by one skip rows. It is refused there.

A cursor is a position, not a permission: it carries no filter, so a client who
edits one only moves in the rows the query already lets it see (no signature is
needed; filters belong in ``where``). A row whose sort key changes during a walk
may be seen twice or not at all: sort by a key that does not change (the id, a
creation time) when that matters.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy import and_, or_
from sqlalchemy import inspect as sa_inspect
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .columns import UTCDateTime

MAX_PAGE_SIZE = 100  # rows a page holds at most (crud.list_page's too)
MAX_CURSOR_LENGTH = 4096  # characters: two values, a string of 500 4-byte characters
M = TypeVar("M", bound=SQLModel)
INT_BITS = {sa.SmallInteger: 16, sa.BigInteger: 64, sa.Integer: 32}  # subclasses first
_NO_BIND = sa.TypeDecorator.process_bind_param  # a decorator that changes nothing on the way in
MAX_SORT_LENGTH = 500  # characters a str sort key may hold: its cursor fits in a URL


class InvalidCursorError(ValueError):
    """The cursor was not made by this query: malformed, tampered, truncated, or
    made for another sort order."""


@dataclass
class Page(Generic[M]):
    items: list[M]
    next: str | None = None  # the page after this one; None: this is the last
    previous: str | None = None  # the page before (empty if its rows were deleted); None: first


async def keyset_page(
    session: AsyncSession,
    model: type[M],
    *,
    order_by: Any = None,
    cursor: str | None = None,
    limit: int = MAX_PAGE_SIZE,
    where: Sequence[Any] = (),
) -> Page[M]:
    """One page of ``model`` rows in ``(order_by, primary key)`` order, ascending.

    ``order_by``: a column of the model (default: the primary key). ``cursor``: a
    ``next`` or ``previous`` of a page of the same order, or None for the first
    page. ``where``: filters, the same on every page. ``1 <= limit <= 100``.
    One statement; raises ``InvalidCursorError`` for a cursor it did not make.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    key = _primary_key(model)
    sort = key if order_by is None else sa_inspect(order_by).expression
    columns = [key] if sort is key else [sort, key]
    dialect = session.get_bind().dialect
    for column in columns:
        _check_sortable(column, dialect)
    order = ",".join(str(c.name) for c in columns)
    if cursor is None:
        backwards, position = False, None
    else:
        backwards, position = _decode(cursor, order, columns, dialect)
    statement = select(model).where(*where).execution_options(populate_existing=True)
    if position is not None:
        statement = statement.where(_beyond(columns, position, backwards))
    ordering = [c.desc() if backwards else c.asc() for c in columns]
    rows = list((await session.exec(statement.order_by(*ordering).limit(limit + 1))).all())
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    page: Page[M] = Page(rows)
    if rows:  # an empty page (its rows deleted since) has no cursors: start again
        first, last = _values(rows[0], columns), _values(rows[-1], columns)
        ahead, behind = (True, more) if backwards else (more, position is not None)
        page.next = _encode(order, "next", last) if ahead else None
        page.previous = _encode(order, "previous", first) if behind else None
    return page


def _primary_key(model: type[SQLModel]) -> Any:
    primary = sa_inspect(model).primary_key
    if len(primary) != 1:
        raise TypeError(f"{model.__name__}: keyset pages need a one-column primary key")
    return primary[0]


def _check_sortable(column: Any, dialect: sa.Dialect) -> None:
    if not isinstance(column, sa.Column):
        raise TypeError(f"order_by must be a column of the model, not {column!r}")
    if column.nullable and not column.primary_key:
        raise TypeError(
            f"{column.name} is nullable: NULLs do not compare, and a keyset page would "
            "lose those rows; sort by a NOT NULL column"
        )
    kind, stored = _kind(column), _stored(column)
    if kind is None:
        raise TypeError(f"{column.name}: keyset pages sort by int, str, datetime or UUID")
    bounded = isinstance(stored, sa.Uuid | sa.Enum) or (getattr(stored, "length", 0) or 0) > 0
    if kind is str and not (bounded and (getattr(stored, "length", 0) or 0) <= MAX_SORT_LENGTH):
        raise TypeError(
            f"{column.name}: a str sort key needs a length of at most {MAX_SORT_LENGTH} "
            "(its cursor must fit in a URL)"
        )
    if dialect.name == "mysql" and isinstance(stored, sa.Enum) and stored.native_enum:
        raise TypeError(
            f"{column.name}: MySQL sorts an ENUM by the order of its values but compares it "
            "as text, so pages would skip rows; sort by another column"
        )
    decorator = type(column.type)
    converts = getattr(decorator, "process_result_value", None)
    if kind is int and converts not in (None, sa.TypeDecorator.process_result_value):
        raise TypeError(f"{column.name}: its values are not the ints it stores (Money?)")


def _stored(column: Any) -> Any:
    """The column's type as the database stores it: TypeDecorators unwrapped."""
    kind: Any = column.type
    while isinstance(kind, sa.TypeDecorator):  # AutoString, UTCDateTime, Email
        kind = kind.impl_instance
    return kind


def _kind(column: Any) -> type | None:
    stored = _stored(column)
    if isinstance(stored, sa.Uuid):
        return uuid.UUID if getattr(stored, "as_uuid", True) else str
    try:
        python = stored.python_type
    except NotImplementedError:
        return None
    for kind in (bool, int, str, datetime, uuid.UUID):
        if issubclass(python, kind):
            return None if kind is bool else kind
    return None


def _beyond(columns: list[Any], position: list[Any], backwards: bool) -> Any:
    """``(sort, key) > (s, k)``, spelt so that every backend's index finds the start:
    ``sort >= s AND (sort > s OR key > k)`` (MariaDB does not seek on a row value)."""
    after = (lambda c, v: c < v) if backwards else (lambda c, v: c > v)
    if len(columns) == 1:
        return after(columns[0], position[0])
    (sort, key), (s, k) = columns, position
    at_or_after = sort <= s if backwards else sort >= s
    return and_(at_or_after, or_(after(sort, s), and_(sort == s, after(key, k))))


def _values(row: Any, columns: list[Any]) -> list[Any]:
    values = [getattr(row, _attribute(row, c)) for c in columns]
    for column, value in zip(columns, values, strict=True):
        kind = _kind(column)
        if (kind is not None and not isinstance(value, kind)) or isinstance(value, bool):
            raise TypeError(
                f"{column.name} holds {type(value).__name__} values: keyset pages sort by "
                "int, str, datetime or UUID"
            )
    return values


def _attribute(row: Any, column: Any) -> str:
    return sa_inspect(type(row)).get_property_by_column(column).key


def _encode(order: str, way: str, values: list[Any]) -> str:
    plain = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    plain = [str(v) if isinstance(v, uuid.UUID) else v for v in plain]
    text = json.dumps([order, way, plain], ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(
    cursor: str, order: str, columns: list[Any], dialect: sa.Dialect
) -> tuple[bool, list[Any]]:
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidCursorError(f"a cursor is 1 to {MAX_CURSOR_LENGTH} characters")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        made_for, way, values = json.loads(text)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidCursorError("not a cursor this API made") from exc
    if made_for != order:
        raise InvalidCursorError(f"a cursor of another sort order ({made_for!r})")
    if way not in ("next", "previous") or not isinstance(values, list):
        raise InvalidCursorError("not a cursor this API made")
    if len(values) != len(columns):
        raise InvalidCursorError("not a cursor this API made")
    checked = [_checked(c, v, dialect) for c, v in zip(columns, values, strict=True)]
    return way == "previous", checked


def _checked(column: Any, value: Any, dialect: sa.Dialect) -> Any:
    """The cursor's value as the column holds it, or ``InvalidCursorError``: never a
    value the database would refuse (a 500) or silently convert."""
    bad = InvalidCursorError(f"not a valid {column.name} in the cursor")
    try:
        parsed = _parsed(column, value, dialect)
        binds = getattr(type(column.type), "process_bind_param", _NO_BIND)
        if binds is not _NO_BIND:
            column.type.process_bind_param(parsed, dialect)  # its own checks: Email, ExactText
    except (ValueError, TypeError, OverflowError, LookupError):
        raise bad from None
    return parsed


def _parsed(column: Any, value: Any, dialect: sa.Dialect) -> Any:
    kind, stored = _kind(column), _stored(column)
    if kind is int:
        bits = 64 if dialect.name == "sqlite" else _int_bits(stored)
        if type(value) is not int or not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise ValueError(value)
        return value
    if not isinstance(value, str):
        raise TypeError(value)
    if isinstance(stored, sa.Uuid):
        parsed = uuid.UUID(value)
        return parsed if stored.as_uuid else str(parsed)
    if kind is str:
        length = getattr(stored, "length", None)
        if "\x00" in value or (length is not None and len(value) > length):
            raise ValueError(value)
        value.encode()  # a lone surrogate: no database holds it (UnicodeEncodeError)
        if isinstance(stored, sa.Enum) and value not in stored.enums:
            raise ValueError(value)  # PostgreSQL's enum refuses it: a 500
        charset = column.table.kwargs.get("mysql_charset", "utf8mb4")
        narrow = dialect.name == "mysql" and charset in ("utf8", "utf8mb3")
        if narrow and any(ord(c) > 0xFFFF for c in value):  # 3 bytes a character at most
            raise ValueError(value)
        return value
    parsed_time = datetime.fromisoformat(value)
    if (parsed_time.utcoffset() is not None) != _aware(column, dialect):
        raise ValueError(value)  # naive for an aware column, or the reverse
    if parsed_time.utcoffset() is not None:
        parsed_time.astimezone(UTC)  # year 1 at +01:00 is before year 1 in UTC: OverflowError
    return parsed_time


def _int_bits(stored: Any) -> int:
    for kind, bits in INT_BITS.items():  # SmallInteger and BigInteger before Integer
        if isinstance(stored, kind):
            return bits
    return 32


def _aware(column: Any, dialect: sa.Dialect) -> bool:
    """Whether the column's times come back aware: ``UTCDateTime`` on every backend,
    ``DateTime(timezone=True)`` on PostgreSQL only (SQLite and MySQL drop the zone)."""
    if isinstance(column.type, UTCDateTime):
        return True
    return bool(getattr(_stored(column), "timezone", False)) and dialect.name == "postgresql"
