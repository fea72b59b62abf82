"""Exports of any table: CSV text (to a download or a file) and pandas frames, streamed.

Use these to hand a whole table to a spreadsheet, a file or a data frame without
holding it: ``export_csv(session, Product)`` yields CSV text a chunk of rows at a
time, ``write_csv`` writes it to a file, ``to_dataframes`` yields DataFrames with
one set of dtypes. What goes wrong without them:

* ``.all()`` then ``csv.writer``: every row in memory at once (1.4 GiB for a
  million users), and ORM objects built for nothing -- an export needs plain
  rows, read through ``streaming.stream_rows`` (a server-side cursor).
* A cell that starts with ``=``, ``+``, ``-`` or ``@`` is run as a formula by
  the spreadsheet that opens the file (CSV injection): here it gets a ``'``.
* Frames made chunk by chunk with inferred dtypes disagree (an all-NULL chunk
  of a nullable integer becomes float): here the dtypes come from the column
  types, the same for every frame.

Close the generators with ``contextlib.aclosing`` when you stop early (the
stream they read holds its session's connection). The kit's users are one table
they work on: ``export_users_csv`` and the other seed names, thin wrappers at the
end. Needs ``streaming.py`` beside it (and pandas for ``to_dataframes``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, TextIO

from sqlalchemy import Boolean, Float, Integer, Select, String, TypeDecorator
from sqlalchemy import inspect as sa_inspect
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .streaming import CHUNK_SIZE, stream_rows

CSV_COLUMNS = ("id", "name", "email", "is_active", "team_id")  # the users' export
# A spreadsheet runs a cell starting with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any, neutralize_formulas: bool = True) -> Any:
    """One value as written to CSV: booleans as true/false, NULL as an empty cell, and
    text a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR first)
    prefixed with a ``'`` when ``neutralize_formulas`` (OWASP's advice for CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if neutralize_formulas and isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(rows: Iterable[Sequence[Any]], neutralize_formulas: bool = True) -> str:
    """Rows as RFC 4180 CSV text (CRLF line ends; commas, quotes and newlines quoted)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([csv_cell(v, neutralize_formulas) for v in row] for row in rows)
    return buffer.getvalue()


def export_statement(model: type[SQLModel], columns: Sequence[str] | None = None) -> Select[Any]:
    """An export's query: ``columns`` (default: every column) of every row, in
    primary-key order."""
    mapper = sa_inspect(model)
    names = list(columns) if columns is not None else [a.key for a in mapper.column_attrs]
    return select(*(getattr(model, name) for name in names)).order_by(*mapper.primary_key)


def _header(statement: Select[Any]) -> str:
    return csv_text([[column.key for column in statement.selected_columns]])


async def export_csv(
    session: AsyncSession,
    model: type[SQLModel] | Select[Any],
    chunk_size: int = CHUNK_SIZE,
    neutralize_formulas: bool = True,
) -> AsyncIterator[str]:
    """A table (a model: every column; or an ``export_statement``) as CSV text, one
    chunk of ``chunk_size`` rows per item.

    The first item is the header together with the first rows (the query has
    run by then: a failure to connect comes before anything is sent); an
    empty table gives the header alone. Close it when you stop early::

        async with contextlib.aclosing(export_csv(session, Product)) as chunks:
            async for text in chunks: ...

    ``neutralize_formulas``: see ``csv_cell`` (on by default: exports are
    opened in spreadsheets; turn it off for machine-to-machine exports).
    """
    statement = model if isinstance(model, Select) else export_statement(model)
    header = _header(statement)
    async with stream_rows(session, statement, chunk_size) as chunks:
        async for chunk in chunks:
            yield header + csv_text(chunk, neutralize_formulas)
            header = ""
    if header:
        yield header


async def write_csv(
    session: AsyncSession,
    model: type[SQLModel] | Select[Any],
    file: TextIO,
    chunk_size: int = CHUNK_SIZE,
    neutralize_formulas: bool = True,
) -> int:
    """Write a table as CSV to ``file`` (opened with ``newline=""``), chunk by chunk;
    returns the number of rows written."""
    statement = model if isinstance(model, Select) else export_statement(model)
    file.write(_header(statement))
    rows = 0
    async with stream_rows(session, statement, chunk_size) as chunks:
        async for chunk in chunks:
            file.write(csv_text(chunk, neutralize_formulas))
            rows += len(chunk)
    return rows


async def to_dataframes(
    session: AsyncSession, model: type[SQLModel] | Select[Any], chunk_size: int = 10_000
) -> AsyncIterator[Any]:
    """A table as pandas DataFrames of at most ``chunk_size`` rows, in key order.

    Every frame has the same columns and dtypes, taken from the column types
    (a nullable integer is ``Int64``, text ``string``), so they can be processed
    one by one, or written out (``frame.to_parquet``, ``to_csv(mode="a")``)
    without holding the table. Close it with ``contextlib.aclosing`` when you
    stop early.
    """
    import pandas as pd  # only this function needs pandas

    statement = model if isinstance(model, Select) else export_statement(model)
    columns = list(statement.selected_columns)
    dtypes = {column.key: _dtype(column) for column in columns}
    async with stream_rows(session, statement, chunk_size) as chunks:
        async for chunk in chunks:
            frame = pd.DataFrame.from_records(chunk, columns=list(dtypes))
            yield frame.astype(dtypes)


def _dtype(column: Any) -> str:
    """The pandas dtype of a column: nullable ones (``Int64``, ``boolean``) where NULL can be."""
    kind = column.type
    if isinstance(kind, TypeDecorator):
        kind = kind.impl_instance
    nullable = getattr(column, "nullable", True) and not getattr(column, "primary_key", False)
    for sql_type, exact, with_null in (
        (Boolean, "bool", "boolean"),
        (Integer, "int64", "Int64"),
        (Float, "float64", "Float64"),
    ):
        if isinstance(kind, sql_type):
            return with_null if nullable else exact
    return "string" if isinstance(kind, String) else "object"


# -- The kit's users, under the seed's names: thin wrappers -----------------------------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused.


def users_export_statement() -> Select[Any]:
    """The users' export: id, name, email, is_active, team_id, in id order."""
    from .models import User

    return export_statement(User, CSV_COLUMNS)


def export_users_csv(
    session: AsyncSession, chunk_size: int = CHUNK_SIZE, neutralize_formulas: bool = True
) -> AsyncIterator[str]:
    """The user table as CSV (``export_csv``)."""
    return export_csv(session, users_export_statement(), chunk_size, neutralize_formulas)


async def write_users_csv(
    session: AsyncSession,
    file: TextIO,
    chunk_size: int = CHUNK_SIZE,
    neutralize_formulas: bool = True,
) -> int:
    """Write the user table as CSV to ``file`` (``write_csv``)."""
    return await write_csv(session, users_export_statement(), file, chunk_size, neutralize_formulas)


def users_to_dataframes(session: AsyncSession, chunk_size: int = 10_000) -> AsyncIterator[Any]:
    """The user table as pandas DataFrames (``to_dataframes``)."""
    return to_dataframes(session, users_export_statement(), chunk_size)
