"""Stream a large query in constant memory: rows or objects, a chunk at a time.

``.all()`` holds every row at once: 20,000 users are about 28 MiB of Python
objects, a million about 1.4 GiB. A stream holds one chunk (``chunk_size``
rows, ``yield_per``) at a time, fetched from a cursor on the server:

* PostgreSQL (asyncpg): a real server-side cursor (a portal of the prepared
  statement), which only lives inside a transaction. The rows wait on the
  server; each chunk is one round trip.
* MySQL/MariaDB (aiomysql): an unbuffered ``SSCursor``. The server sends the
  whole result down the socket at once and the driver reads it row by row as
  it is asked, so Python memory stays flat, but while the result is open the
  connection can do nothing else: any other statement on it first reads the
  rest of the result and throws it away -- the stream then ends early, silently.
* SQLite (aiosqlite): the ``sqlite3`` cursor steps through the result in the
  driver's thread, ``fetchmany(chunk_size)`` per chunk. (Without streaming, the
  adapter fetches every row before the first one is returned.)

Rules, enforced here on every backend (what MariaDB does to a broken rule is
silent data loss, and code written on PostgreSQL would not notice):

* A stream needs its session's connection for its whole life: no commit, no
  rollback, no close, and no other statement on that session until it ends.
  Use another session for other work meanwhile. A statement sent on the
  streaming connection raises ``StreamBusyError``; a stream whose session was
  committed, rolled back or closed raises ``StreamClosedError`` -- never a
  shorter result that looks complete.
* Streams are context managers: the cursor is closed when the block exits,
  also after ``break`` or an error. An async generator left by ``break``
  stays suspended inside its stream until the garbage collector closes it
  (meanwhile its session refuses other statements): close generators built on
  a stream (the CSV and pandas exports of ``exports.py``) with
  ``contextlib.aclosing``. Closing early on MariaDB still reads the rest of the
  result off the socket (the protocol has no other way); to stop early and
  cheaply, put a ``LIMIT`` in the query.
* ORM objects streamed are added to the session's identity map, which holds
  them weakly: memory stays flat as long as you do not keep or change them.
  Exports need no ORM objects: ``stream_rows`` with a few columns holds a
  third of the memory and runs 2 to 3 times faster.

The stream reads in the session's transaction (begun if there is none, as any
query does); ending it stays the caller's job (closing the session does it).
It sees the table as it was when its query started, on every backend: other
sessions write and commit meanwhile without waiting for it, unseen by it.
Every function takes a statement or a model (``stream_all(session, Product)``);
``stream_users`` is ``stream_all`` on the kit's users. Nothing else of the kit is
needed beside this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Select, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

if TYPE_CHECKING:
    from .models import User

M = TypeVar("M", bound=SQLModel)
CHUNK_SIZE = 1000  # rows per fetch: memory held at once, and round trips on PostgreSQL


class StreamClosedError(RuntimeError):
    """The stream's session was committed, rolled back or closed before the stream ended."""


class StreamBusyError(RuntimeError):
    """Another statement was sent on the connection a stream is reading from."""


@asynccontextmanager
async def stream_rows(
    session: AsyncSession, statement: Select[Any], chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[AsyncIterator[Sequence[Any]]]:
    """Run ``statement`` with a server-side cursor; yield an iterator of chunks.

    Each chunk is a list of at most ``chunk_size`` rows (``Row`` tuples)::

        async with stream_rows(session, select(User.id, User.email)) as chunks:
            async for chunk in chunks:
                for user_id, email in chunk: ...

    The cursor is closed when the block exits (also after ``break``). Raises
    ``StreamClosedError`` / ``StreamBusyError`` when the rules in the module
    docstring are broken, instead of returning fewer rows.
    """
    async with _stream(session, statement, chunk_size, scalars=False) as chunks:
        yield chunks


@asynccontextmanager
async def stream_scalars(
    session: AsyncSession, statement: Select[Any], chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[AsyncIterator[Any]]:
    """Like ``stream_rows``, one object at a time: ORM objects for ``select(User)``."""
    async with _stream(session, statement, chunk_size, scalars=True) as chunks:
        yield _Items(chunks)


def stream_all(
    session: AsyncSession, model: type[M], chunk_size: int = CHUNK_SIZE
) -> AbstractAsyncContextManager[AsyncIterator[M]]:
    """Every row of ``model``, in primary-key order, ``chunk_size`` objects in memory
    at a time::

    async with stream_all(session, Product) as products:
        async for product in products: ...
    """
    statement = select(model).order_by(*sa_inspect(model).primary_key)
    return stream_scalars(session, statement, chunk_size)


class _Chunks:
    """The chunks of an open result; refuses to go on once the rules are broken."""

    def __init__(self, result: Any, connection: Connection, chunk_size: int) -> None:
        self.result, self.connection, self.chunk_size = result, connection, chunk_size
        self.open = True  # the stream's block has not ended
        self.done = False  # every row was read

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> Sequence[Any]:
        self.check()
        if self.done:
            raise StopAsyncIteration
        try:
            chunk = await self.result.fetchmany(self.chunk_size)
        except Exception as exc:
            self.check(exc)
            raise
        self.check()  # MariaDB: a result drained by someone else looks ended
        if not chunk:
            self.done = True
            raise StopAsyncIteration
        return chunk

    def check(self, cause: BaseException | None = None) -> None:
        if not self.open:
            raise StreamClosedError(
                "The stream's block has ended: iterate inside `async with stream_...(...) as rows:`"
            ) from cause
        if _gone(self.connection):
            raise StreamClosedError(
                "The stream's session was committed, rolled back or closed before the stream "
                "ended: keep the session open and untouched until the stream is done (use "
                "another session for other work meanwhile)"
            ) from cause


class _Items:
    """The rows of ``_Chunks`` one by one."""

    def __init__(self, chunks: _Chunks) -> None:
        self.chunks = chunks
        self.buffer: Sequence[Any] = ()
        self.position = 0

    def __aiter__(self) -> _Items:
        return self

    async def __anext__(self) -> Any:
        while self.position >= len(self.buffer):
            self.buffer, self.position = await self.chunks.__anext__(), 0
        self.chunks.check()
        self.position += 1
        return self.buffer[self.position - 1]


@asynccontextmanager
async def _stream(
    session: AsyncSession, statement: Select[Any], chunk_size: int, scalars: bool
) -> AsyncIterator[_Chunks]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    connection = (await session.connection()).sync_connection  # the one the cursor will use
    assert connection is not None
    streaming = statement.execution_options(yield_per=chunk_size)  # implies stream_results
    result: Any = await (session.stream_scalars if scalars else session.stream)(streaming)
    chunks = _Chunks(result, connection, chunk_size)

    def refuse_other_statements(*_args: Any) -> None:
        if chunks.open:
            raise StreamBusyError(
                "This session's connection is reading a stream: finish the stream (or leave "
                "its block) first, or run the statement on another session. On MySQL/MariaDB "
                "it would silently cut the stream short."
            )

    def close_cursor_first(*_args: Any) -> None:
        # The session commits, rolls back or closes mid-stream: close the cursor before
        # (MariaDB: a ROLLBACK behind an unread result warns, and fails the pool's reset).
        # The stream then raises StreamClosedError at its next step.
        result._real_result.close()

    listeners = [
        ("before_cursor_execute", refuse_other_statements),
        ("commit", close_cursor_first),
        ("rollback", close_cursor_first),
    ]
    for name, listener in listeners:
        event.listen(connection, name, listener)
    try:
        yield chunks
    finally:
        chunks.open = False
        for name, listener in listeners:
            event.remove(connection, name, listener)
        if not _gone(connection):
            await result.close()  # the cursor; on MariaDB this reads the rest off the socket
        elif connection.invalidated:  # the connection is closed: close the cursor object only
            with suppress(Exception):  # (psycopg warns about one left open)
                await result.close()


def _gone(connection: Connection) -> bool:
    return connection.closed or connection.invalidated or not connection.in_transaction()


# -- The kit's users, under the seed's names: thin wrappers -----------------------------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused.


def stream_users(
    session: AsyncSession, chunk_size: int = CHUNK_SIZE
) -> AbstractAsyncContextManager[AsyncIterator[User]]:
    """Every user, in id order, ``chunk_size`` in memory at a time (``stream_all``)."""
    from .models import User

    return stream_all(session, User, chunk_size)
