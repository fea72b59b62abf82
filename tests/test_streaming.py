"""Streaming large results (``streaming``) and the CSV export endpoint, on every backend.

Every row once and in order; a stream that is left early, misused (another
statement on its connection) or whose session ends under it closes its cursor
and raises, never returns a shorter result; CSV is exact for hostile values
and neutralizes formulas; the endpoint releases its connection when the
client goes away or the database fails mid-stream. Memory is checked as a
ratio of tracemalloc peaks (streaming against ``.all()``), never a timing.
"""

import asyncio
import csv
import gc
import io
import logging
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import fastapi
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import func, insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from starlette.requests import ClientDisconnect

from asyncpatterns import crud, exports, streaming
from asyncpatterns.api import ExportCutOff, create_app
from asyncpatterns.cli import TOUR_STEPS
from asyncpatterns.db import make_engine, make_session_maker
from asyncpatterns.models import Team, User

HOSTILE_NAMES = [
    "Comma, Inc.",
    'Quote "the" name',
    "Line\nbreak",
    "Carriage\r\nreturn",
    "Ünïcødé ✓ 漢字 🎉",
    '=HYPERLINK("http://evil.example","x")',
    "+1 555",
    "-2",
    "@SUM(A1)",
    "'already quoted",
    "plain",
]


async def add_users(engine: AsyncEngine, count: int, offset: int = 0) -> None:
    """``count`` plain users, inserted in chunks (Core: fast, no ORM objects kept)."""
    async with engine.begin() as conn:
        for start in range(offset, offset + count, 5000):
            stop = min(offset + count, start + 5000)
            rows = [
                {"name": f"User {i}", "email": f"user{i}@example.com"} for i in range(start, stop)
            ]
            await conn.execute(insert(User), rows)


async def add_hostile_users(engine: AsyncEngine) -> None:
    async with make_session_maker(engine)() as session:
        team = Team(name='Team, "A"')
        session.add(team)
        await session.commit()
        for i, name in enumerate(HOSTILE_NAMES):
            session.add(
                User(
                    name=name,
                    email=f"=cmd{i}@example.com" if i % 2 else f"u{i}@example.com",
                    is_active=bool(i % 3),
                    team_id=team.id if i % 2 else None,
                )
            )
        await session.commit()


async def table_rows(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    async with make_session_maker(engine)() as session:
        return [tuple(row) for row in await session.exec(exports.users_export_statement())]


def expected_csv(rows: list[tuple[Any, ...]], neutralize: bool = True) -> list[list[str]]:
    """What the CSV must hold, written independently of the kit's writer."""
    expected = [list(exports.CSV_COLUMNS)]
    for row in rows:
        cells = []
        for value in row:
            if value is None:
                cells.append("")
            elif isinstance(value, bool):
                cells.append("true" if value else "false")
            elif neutralize and isinstance(value, str) and value[:1] in "=+-@\t\r" and value:
                cells.append("'" + value)
            else:
                cells.append(str(value))
        expected.append(cells)
    return expected


def parsed(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


@asynccontextmanager
async def pool_of_one(database_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        yield engine
    finally:
        await engine.dispose()


# -- Streams: every row once, in order; closed on every way out -------------------------


async def test_every_row_once_in_id_order(engine) -> None:
    await add_users(engine, 2500)
    async with make_session_maker(engine)() as session:
        expected = list((await session.exec(select(User.id).order_by(col(User.id)))).all())
        async with streaming.stream_users(session, chunk_size=97) as users:
            streamed = [user.id async for user in users]
        sizes = []
        async with streaming.stream_rows(
            session, select(User.id).order_by(col(User.id)), chunk_size=97
        ) as chunks:
            rows = []
            async for chunk in chunks:
                sizes.append(len(chunk))
                rows += [row.id for row in chunk]
    assert streamed == expected and len(expected) == 2500
    assert rows == expected
    assert max(sizes) == 97 and sum(sizes) == 2500


async def test_chunk_size_must_be_at_least_one(session) -> None:
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        async with streaming.stream_users(session, chunk_size=0):
            pass


async def test_break_closes_the_cursor_and_the_connection_serves_again(
    engine, database_url
) -> None:
    await add_users(engine, 3000)
    async with pool_of_one(database_url) as small:
        async with make_session_maker(small)() as session:
            async with streaming.stream_users(session, chunk_size=100) as users:
                async for _user in users:
                    break
            # The same connection, at once: on MariaDB an unclosed unbuffered result
            # would have eaten this query's answer or cut the stream.
            count = (await session.exec(select(func.count()).select_from(User))).one()
            assert count == 3000
        assert small.pool.checkedout() == 0
        async with make_session_maker(small)() as session:
            assert (await session.exec(select(func.count()).select_from(User))).one() == 3000


async def test_another_statement_on_the_streaming_session_is_refused(engine) -> None:
    await add_users(engine, 500)
    async with make_session_maker(engine)() as session:
        seen = 0
        with pytest.raises(streaming.StreamBusyError, match="another session"):
            async with streaming.stream_users(session, chunk_size=100) as users:
                async for _user in users:
                    seen += 1
                    if seen == 150:
                        await session.exec(select(func.count()).select_from(User))
        # the block is over: the session works again, and saw every row
        assert (await session.exec(select(func.count()).select_from(User))).one() == 500


@pytest.mark.parametrize("end", ["commit", "rollback", "close"])
async def test_a_stream_whose_session_ended_raises_not_truncates(engine, database_url, end) -> None:
    await add_users(engine, 500)
    async with pool_of_one(database_url) as small:
        async with make_session_maker(small)() as session:
            seen = 0
            with pytest.raises(streaming.StreamClosedError, match="committed, rolled back or"):
                async with streaming.stream_users(session, chunk_size=100) as users:
                    async for _user in users:
                        seen += 1
                        if seen == 150:
                            await getattr(session, end)()
            assert seen == 150
        assert small.pool.checkedout() == 0
        async with make_session_maker(small)() as session:
            assert (await session.exec(select(func.count()).select_from(User))).one() == 500


async def test_writers_during_a_stream_neither_wait_nor_change_what_it_reads(engine) -> None:
    """A stream reads the table as it was when its query started, on every backend:
    rows another session deletes, changes or adds meanwhile (and commits, without
    waiting for the stream) neither vanish from it, change in it, nor appear in it."""
    await add_users(engine, 3000)
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        before = list((await session.exec(select(User.id, User.name).order_by(col(User.id)))).all())
        await session.commit()
        seen = []
        async with streaming.stream_rows(
            session, select(User.id, User.name).order_by(col(User.id)), chunk_size=100
        ) as chunks:
            async for chunk in chunks:
                if not seen:  # after the first chunk: another session writes, and commits
                    async with session_maker() as writer:
                        ids = [user_id for user_id, _ in before]
                        await crud.deactivate_users(writer, ids[1500:1600])
                        assert await crud.delete_inactive_users(writer) == 100
                        await crud.update_user(writer, ids[2500], {"name": "Changed"})
                        await crud.create_users(
                            writer,
                            [User(name="New", email=f"new{i}@example.com") for i in range(50)],
                        )
                seen += [tuple(row) for row in chunk]
    assert seen == [tuple(row) for row in before]
    async with session_maker() as session:
        assert await crud.count_users(session) == 3000 - 100 + 50


async def test_iterating_after_the_block_raises(session) -> None:
    async with streaming.stream_users(session) as users:
        pass
    with pytest.raises(streaming.StreamClosedError, match="block has ended"):
        async for _user in users:
            pass


# -- CSV and pandas ----------------------------------------------------------------------


async def test_csv_is_exact_for_hostile_values_and_neutralizes_formulas(engine) -> None:
    await add_hostile_users(engine)
    rows = await table_rows(engine)
    async with make_session_maker(engine)() as session:
        async with aclosing(exports.export_users_csv(session, chunk_size=4)) as chunks:
            safe = "".join([chunk async for chunk in chunks])
        async with aclosing(
            exports.export_users_csv(session, chunk_size=4, neutralize_formulas=False)
        ) as chunks:
            raw = "".join([chunk async for chunk in chunks])
    assert parsed(safe) == expected_csv(rows)
    assert parsed(raw) == expected_csv(rows, neutralize=False)
    cells = [cell for row in parsed(safe)[1:] for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")]
    assert "'=HYPERLINK(" in safe and "Ünïcødé ✓ 漢字 🎉" in safe
    assert safe.startswith("id,name,email,is_active,team_id\r\n")


async def test_write_users_csv_writes_what_the_generator_yields(engine) -> None:
    await add_hostile_users(engine)
    await add_users(engine, 1200)
    file = io.StringIO(newline="")
    async with make_session_maker(engine)() as session:
        written = await exports.write_users_csv(session, file, chunk_size=500)
        async with aclosing(exports.export_users_csv(session, chunk_size=500)) as chunks:
            generated = "".join([chunk async for chunk in chunks])
    assert written == 1200 + len(HOSTILE_NAMES)
    assert file.getvalue() == generated
    assert parsed(generated) == expected_csv(await table_rows(engine))


async def test_an_empty_table_is_a_header_and_no_frames(engine) -> None:
    async with make_session_maker(engine)() as session:
        async with aclosing(exports.export_users_csv(session)) as chunks:
            assert [chunk async for chunk in chunks] == ["id,name,email,is_active,team_id\r\n"]
        async with aclosing(exports.users_to_dataframes(session)) as frames:
            assert [frame async for frame in frames] == []
        async with streaming.stream_users(session) as users:
            assert [user async for user in users] == []


async def test_dataframes_in_chunks_hold_the_table(engine) -> None:
    import pandas as pd

    await add_hostile_users(engine)
    await add_users(engine, 2000)
    async with (
        make_session_maker(engine)() as session,
        aclosing(exports.users_to_dataframes(session, chunk_size=750)) as frames,
    ):
        chunks = [frame async for frame in frames]
    assert [len(frame) for frame in chunks] == [750, 750, 511]
    assert all(frame.dtypes.equals(chunks[0].dtypes) for frame in chunks)
    assert str(chunks[0].dtypes["team_id"]) == "Int64"
    whole = pd.concat(chunks, ignore_index=True)
    rows = await table_rows(engine)
    for position, column in enumerate(exports.CSV_COLUMNS):
        values = [None if pd.isna(v) else v for v in whole[column].tolist()]
        assert values == [row[position] for row in rows], column


# -- Memory: a structural check, not a timing ----------------------------------------------


async def peak_bytes(work: Callable[[], Awaitable[Any]]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        await work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_streaming_20000_rows_holds_a_fraction_of_all(engine) -> None:
    await add_users(engine, 20_000)
    session_maker = make_session_maker(engine)

    async def everything() -> None:
        async with session_maker() as session:
            users = (await session.exec(select(User).order_by(col(User.id)))).all()
            assert len(users) == 20_000

    async def streamed() -> None:
        seen = 0
        async with session_maker() as session, streaming.stream_users(session) as users:
            async for _user in users:
                seen += 1
        assert seen == 20_000

    async def exported() -> None:
        size = 0
        async with (
            session_maker() as session,
            aclosing(exports.export_users_csv(session)) as chunks,
        ):
            async for chunk in chunks:
                size += len(chunk)
        assert size > 20_000 * 20

    await streamed()  # warm-up: compiled statements, pool connection
    await exported()
    all_peak = await peak_bytes(everything)
    stream_peak = await peak_bytes(streamed)
    export_peak = await peak_bytes(exported)
    assert stream_peak < all_peak / 3, (stream_peak, all_peak)
    assert export_peak < all_peak / 3, (export_peak, all_peak)


# -- The endpoint ---------------------------------------------------------------------------


async def call_app(
    app: FastAPI,
    path: str,
    sent: list[dict[str, Any]],
    spec_version: str = "2.4",
    disconnect_after: int | None = None,
) -> None:
    """Drive the ASGI app directly; the messages it sends go to ``sent``. With
    ``disconnect_after``, the client goes away after that many body messages: on ASGI
    2.4 the next ``send`` raises OSError (as uvicorn's does), before 2.4 ``receive``
    says http.disconnect."""
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            if spec_version == "2.4":
                raise OSError("the client went away")
            return
        sent.append(message)
        bodies = sum(m["type"] == "http.response.body" for m in sent)
        if disconnect_after is not None and bodies >= disconnect_after:
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    await app(scope, receive, send)


@asynccontextmanager
async def app_on_a_pool_of_one(database_url: URL) -> AsyncIterator[FastAPI]:
    app = create_app(database_url, pool_timeout=1)
    await app.state.engine.dispose()
    app.state.engine = make_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=1)
    app.state.session_maker = make_session_maker(app.state.engine)
    try:
        yield app
    finally:
        await app.state.engine.dispose()


async def test_export_endpoint_streams_the_table(engine, app) -> None:
    await add_hostile_users(engine)
    await add_users(engine, 2500)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/users/export.csv")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="users.csv"'
    assert "content-length" not in response.headers  # streamed
    assert parsed(response.text) == expected_csv(await table_rows(engine))
    assert app.state.engine.pool.checkedout() == 0


async def test_export_endpoint_on_an_empty_table(app) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/users/export.csv")
    assert response.status_code == 200
    assert response.text == "id,name,email,is_active,team_id\r\n"


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
async def test_a_client_leaving_mid_stream_releases_the_connection(
    engine, database_url, spec_version
) -> None:
    await add_users(engine, 5000)
    async with app_on_a_pool_of_one(database_url) as app:
        sent: list[dict[str, Any]] = []
        try:
            await call_app(app, "/users/export.csv", sent, spec_version, disconnect_after=1)
        except ClientDisconnect:  # ASGI 2.4: Starlette's word for the OSError from send
            assert spec_version == "2.4"
        assert app.state.engine.pool.checkedout() == 0
        assert sent[0]["status"] == 200
        assert [m.get("more_body") for m in sent[1:]] == [True]  # one chunk, never ended
        # the pool's only connection serves the next request, in full
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/users/export.csv")
        assert response.status_code == 200
        assert len(parsed(response.text)) == 5001


async def test_a_database_error_mid_stream_cuts_the_body_off_and_releases_the_connection(
    engine, database_url, monkeypatch, caplog
) -> None:
    await add_users(engine, 3000)
    real_next = streaming._Chunks.__anext__
    calls = 0

    async def failing_next(self: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the first chunk went out
            raise OperationalError("SELECT ...", {}, Exception("connection lost mid-stream"))
        return await real_next(self)

    async with app_on_a_pool_of_one(database_url) as app:
        monkeypatch.setattr(streaming._Chunks, "__anext__", failing_next)
        sent: list[dict[str, Any]] = []
        with (
            caplog.at_level(logging.ERROR, "asyncpatterns.api"),
            # to the server: it drops the connection (Starlette < 0.39 wraps the error
            # in an ExceptionGroup from the task group that streams the body)
            pytest.raises((ExportCutOff, BaseExceptionGroup)) as raised,
        ):
            await call_app(app, "/users/export.csv", sent)
        cut = raised.value
        if isinstance(cut, BaseExceptionGroup):
            (cut,) = cut.exceptions
        assert isinstance(cut, ExportCutOff)
        assert isinstance(cut.__cause__, OperationalError)
        assert app.state.engine.pool.checkedout() == 0
        assert "export cut off" in caplog.text
        # the status and the first chunk went out; the body never got its end
        assert sent[0]["status"] == 200
        assert [m.get("more_body") for m in sent[1:]] == [True]
        assert parsed(sent[1]["body"].decode())[0] == list(exports.CSV_COLUMNS)
        monkeypatch.setattr(streaming._Chunks, "__anext__", real_next)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/users/export.csv")
        assert response.status_code == 200 and len(parsed(response.text)) == 3001


async def test_a_full_pool_before_the_export_starts_is_a_503(engine, database_url) -> None:
    await add_users(engine, 10)
    async with app_on_a_pool_of_one(database_url) as app:
        async with app.state.engine.connect() as held:  # the pool's only connection
            await held.exec_driver_sql("SELECT 1")
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                logging.getLogger("asyncpatterns.api").disabled = True
                try:
                    response = await client.get("/users/export.csv")
                finally:
                    logging.getLogger("asyncpatterns.api").disabled = False
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert app.state.engine.pool.checkedout() == 0


async def test_an_unreachable_database_before_the_export_starts_is_a_503() -> None:
    app = create_app("postgresql+asyncpg://app:s3cret@127.0.0.1:9/shop")
    transport = httpx.ASGITransport(app=app)
    logging.getLogger("asyncpatterns.api").disabled = True
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/users/export.csv")
    finally:
        logging.getLogger("asyncpatterns.api").disabled = False
        await app.state.engine.dispose()
    assert response.status_code == 503
    assert response.json() == {"detail": "Database unavailable: cannot connect to the database"}


# -- FastAPI: when does a yield dependency end, for a streamed answer? --------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


async def test_when_fastapi_closes_a_yield_dependency_around_a_streamed_body() -> None:
    """The installed FastAPI's behaviour, recorded. 0.106 to 0.117 ran a yield
    dependency's exit code before the body was streamed (a session from it was
    closed under the stream); before 0.106 and since 0.118 it runs after the body.
    The export endpoint opens its own session, so it works on either."""
    events: list[str] = []

    async def dependency() -> AsyncIterator[None]:
        events.append("dependency opened")
        yield
        events.append("dependency closed")

    probe = FastAPI()

    @probe.get("/stream")
    async def stream(_: None = Depends(dependency)) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            events.append("body started")
            yield b"x"
            events.append("body finished")

        return StreamingResponse(body())

    transport = httpx.ASGITransport(app=probe)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/stream")).text == "x"
    version = _version(fastapi.__version__)
    if (0, 106) <= version < (0, 118):
        assert events.index("dependency closed") < events.index("body started"), events
    else:
        assert events[-1] == "dependency closed", events


async def test_the_tour_step_streams_every_user_and_refuses_a_cut(engine) -> None:
    await add_users(engine, 100)
    lines = await dict(TOUR_STEPS)["Streaming"](engine)
    assert lines[0] == "stream_users: 5100 of 5100 users, 500 at a time, in 1 statement(s)"
    assert lines[2] == "a commit mid-stream: StreamClosedError, not a shorter result"


async def test_a_real_client_aborting_a_download_releases_the_connection(
    engine, database_url
) -> None:
    """The same, served by uvicorn over TCP: the client reads the first bytes and resets
    the connection; the pool's only connection comes back, and serves the next download."""
    import socket

    import uvicorn

    await add_users(engine, 20_000)
    async with app_on_a_pool_of_one(database_url) as app:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        try:
            for _ in range(500):  # until it listens (bounded: at most 5 s)
                if server.started:
                    break
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /users/export.csv HTTP/1.1\r\nHost: test\r\n\r\n")
            head = await reader.readexactly(4096)  # the headers and the first rows
            assert head.startswith(b"HTTP/1.1 200 OK")
            writer.transport.abort()  # the client goes away mid-download
            for _ in range(500):  # until the server noticed (bounded: at most 10 s)
                if app.state.engine.pool.checkedout() == 0:
                    break
                await asyncio.sleep(0.02)
            assert app.state.engine.pool.checkedout() == 0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.get("/users/export.csv")
            assert response.status_code == 200 and len(parsed(response.text)) == 20_001
        finally:
            server.should_exit = True
            await serving
