"""The transactional outbox (``asyncpatterns.outbox``) on every backend: an event
exists if and only if its change commits; racing relays publish each event once;
a relay killed between the publish and the mark loses nothing (the event goes
again, and ends sent); a failing publish is retried with backoff while the rest
go on; hostile payloads are stored exactly or refused before the database is
asked; and the API's POST /users/ emits one ``user.created`` per user created."""

import asyncio
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns import outbox
from asyncpatterns.db import make_session_maker
from asyncpatterns.jobs import utc_now
from asyncpatterns.models import Outbox, Team

ROOT = Path(__file__).parent.parent
WAIT = 30.0  # seconds: the bound on every wait below


async def until(check: Callable[[], Awaitable[bool]], what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def emit_many(engine: AsyncEngine, count: int, topic: str = "thing.happened") -> list[int]:
    async with make_session_maker(engine)() as session, session.begin():
        events = [await outbox.emit(session, Outbox, topic, {"n": n}) for n in range(count)]
    return [e.id for e in events]


async def all_events(engine: AsyncEngine) -> list[Outbox]:
    async with make_session_maker(engine)() as session:
        return list((await session.exec(select(Outbox).order_by(col(Outbox.id)))).all())


async def unsent(engine: AsyncEngine) -> int:
    return sum(e.sent_at is None for e in await all_events(engine))


# -- emit: the event commits with the change, or not at all --------------------------------


async def test_a_rolled_back_change_emits_nothing_and_a_committed_one_emits_once(
    engine: AsyncEngine,
) -> None:
    session_maker = make_session_maker(engine)
    with pytest.raises(RuntimeError, match="the change failed"):
        async with session_maker() as session, session.begin():
            session.add(team := Team(name="Core"))
            await session.flush()
            await outbox.emit(session, Outbox, "team.created", {"id": team.id})
            raise RuntimeError("the change failed")  # after the event was written
    assert await all_events(engine) == []
    async with session_maker() as session, session.begin():
        session.add(team := Team(name="Core"))
        await session.flush()
        emitted = await outbox.emit(session, Outbox, "team.created", {"id": team.id}, key="t")
    [stored] = await all_events(engine)
    assert (stored.id, stored.topic, stored.key, stored.payload) == (
        emitted.id,
        "team.created",
        "t",
        {"id": team.id},
    )
    assert (stored.sent_at, stored.attempts, stored.locked_until) == (None, 0, None)
    assert stored.created_at.utcoffset() == timedelta(0)


async def test_emit_refuses_a_session_with_no_transaction_begun(engine: AsyncEngine) -> None:
    """Committing on its own (as ``jobs.enqueue`` may) would publish an event for a
    change that might still roll back: emit refuses, and writes nothing."""
    async with make_session_maker(engine)() as session:
        with pytest.raises(outbox.NoTransactionError, match=r"session\.begin\(\)"):
            await outbox.emit(session, Outbox, "team.created", {})
        await session.exec(select(Team))  # a transaction the session began by itself
        with pytest.raises(outbox.NoTransactionError):
            await outbox.emit(session, Outbox, "team.created", {})
        assert not session.new
    assert await all_events(engine) == []


HOSTILE_PAYLOADS = {
    "unicode": {"name": "Zoë 🦀 ｆｕｌｌ\u202eright-to-left", "𝄞": ["\u0301", "\u2028"]},
    "nul": {"a\x00b": "c\x00d", "list": ["\x00"]},
    "huge": {"text": "é" * 1_000_000, "items": list(range(20_000))},
    "nested": {"a": [{"b": [{"c": [None, True, 1.5, -(2**53)]}]}]},
    "empty": {},
}


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS.values(), ids=HOSTILE_PAYLOADS.keys())
async def test_hostile_payloads_come_back_exactly(engine: AsyncEngine, payload: Any) -> None:
    async with make_session_maker(engine)() as session, session.begin():
        await outbox.emit(session, Outbox, "hostile", payload, key="κλειδί 🔑")
    [claimed] = await outbox.claim(engine, Outbox)
    assert (claimed.payload, claimed.key) == (payload, "κλειδί 🔑")


NOT_JSON = {
    "object": ({"when": object()}, TypeError),
    "bytes": ({"raw": b"\x00"}, TypeError),
    "set": ({"tags": {1, 2}}, TypeError),
    "nan": ({"amount": float("nan")}, ValueError),
    "infinity": ({"amount": float("inf")}, ValueError),
    "surrogate": ({"name": "a\ud800"}, ValueError),  # no UTF-8 for a lone surrogate
}


@pytest.mark.parametrize(("payload", "error"), NOT_JSON.values(), ids=NOT_JSON.keys())
async def test_what_is_not_json_is_refused_before_the_database(
    engine: AsyncEngine, payload: Any, error: type[Exception]
) -> None:
    async with make_session_maker(engine)() as session, session.begin():
        session.add(Team(name="Core"))
        with pytest.raises(error):
            await outbox.emit(session, Outbox, "bad", payload)
        # The caller's transaction is untouched: it may go on, or roll back.
    assert await all_events(engine) == []
    [team] = (await _teams(engine)).values()
    assert team == "Core"


@pytest.mark.parametrize(
    ("topic", "key", "error"),
    [
        ("", None, ValueError),
        ("t" * 101, None, ValueError),
        ("a\x00b", None, ValueError),
        (7, None, TypeError),
        ("t", "k" * 256, ValueError),
        ("t", "a\x00b", ValueError),
        ("t", 17, TypeError),
    ],
    ids=["empty", "long-topic", "nul-topic", "int-topic", "long-key", "nul-key", "int-key"],
)
async def test_a_topic_or_key_that_does_not_fit_is_refused(
    engine: AsyncEngine, topic: Any, key: Any, error: type[Exception]
) -> None:
    async with make_session_maker(engine)() as session, session.begin():
        with pytest.raises(error):
            await outbox.emit(session, Outbox, topic, {}, key=key)
    assert await all_events(engine) == []


async def _teams(engine: AsyncEngine) -> dict[int | None, str]:
    async with make_session_maker(engine)() as session:
        return {t.id: t.name for t in (await session.exec(select(Team))).all()}


# -- claim: the oldest first, a lease, and only its holder marks -----------------------------


async def test_a_claim_takes_the_oldest_in_one_statement_where_the_backend_allows(
    engine: AsyncEngine, backend: str
) -> None:
    ids = await emit_many(engine, 7)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement.split()[0].upper())

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        first = await outbox.claim(engine, Outbox, batch=3)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    assert (
        sent
        == {
            "postgresql": ["WITH"],  # autocommit: one UPDATE, its CTE locking the batch
            "sqlite": ["BEGIN", "WITH"],  # BEGIN IMMEDIATE, then the same statement
            "mysql": ["SELECT", "UPDATE"],  # SELECT ... FOR UPDATE SKIP LOCKED, then UPDATE
        }[backend]
    )
    second = await outbox.claim(engine, Outbox, batch=3)
    assert [e.id for e in first] == ids[:3] and [e.id for e in second] == ids[3:6]
    assert {(e.attempts, e.sent_at) for e in first + second} == {(1, None)}


async def test_a_claim_in_progress_locks_only_its_batch(engine: AsyncEngine, backend: str) -> None:
    """A second relay claims the next events while the first one's claim is still
    open. On MariaDB an ORDER BY the index does not give (a sort) would lock every
    unsent row the claim read, and leave the other relays nothing."""
    if backend == "sqlite":
        pytest.skip("SQLite has one writer: a second claim waits for the first to commit")
    ids = await emit_many(engine, 6)
    async with make_session_maker(engine)() as held:
        # The claim's statements, held open in a transaction (outbox.claim commits at once).
        await held.connection(execution_options={"isolation_level": "READ COMMITTED"})
        first = sorted(e.id for e in await outbox._claim(held, Outbox, 2, 30.0))
        second = await asyncio.wait_for(outbox.claim(engine, Outbox, batch=2), WAIT)
        await held.rollback()
    assert first == ids[:2] and [e.id for e in second] == ids[2:4]


async def test_a_claim_is_a_lease_and_only_its_holder_marks_it_sent(engine: AsyncEngine) -> None:
    await emit_many(engine, 1)
    [first] = await outbox.claim(engine, Outbox, lease=1.0)  # long enough for a loaded CI
    assert await outbox.claim(engine, Outbox) == []  # leased
    await asyncio.sleep(max(0.0, (first.locked_until - utc_now()).total_seconds()) + 0.05)
    [second] = await outbox.claim(engine, Outbox, lease=30)
    assert (second.id, second.attempts) == (first.id, 2)
    assert not await outbox.mark_sent(engine, first)  # its lease is over: another's now
    assert await outbox.mark_sent(engine, second)
    assert not await outbox.mark_sent(engine, second)  # once
    [stored] = await all_events(engine)
    assert stored.sent_at is not None and stored.attempts == 2
    assert await outbox.claim(engine, Outbox) == []


# -- relay: each event once, at least once, retried ------------------------------------------


async def test_racing_relays_publish_each_event_once(engine: AsyncEngine) -> None:
    ids = await emit_many(engine, 200)
    published: list[int] = []
    stop = asyncio.Event()

    async def publish(e: Outbox) -> None:
        published.append(e.id)
        await asyncio.sleep(0)  # let the other relays race

    relays = [
        asyncio.create_task(outbox.relay(engine, Outbox, publish, stop=stop, batch=7, poll=0.02))
        for _ in range(4)
    ]
    try:
        await until(lambda: _none_unsent(engine), "200 events sent")
    finally:
        stop.set()
        counts = await asyncio.wait_for(asyncio.gather(*relays), WAIT)
    assert sorted(published) == ids and Counter(published).most_common(1)[0][1] == 1
    assert sum(counts) == len(ids)
    stored = await all_events(engine)
    assert {(e.attempts, e.locked_until, e.last_error) for e in stored} == {(1, None, None)}


async def _none_unsent(engine: AsyncEngine) -> bool:
    return await unsent(engine) == 0


KILLED_RELAY = """
import asyncio, os, signal, sys
from asyncpatterns.db import make_engine
from asyncpatterns.models import Outbox
from asyncpatterns.outbox import relay

async def publish(event):
    with open(sys.argv[2], "a") as broker:
        broker.write(f"{event.id}\\n")  # the broker has the event ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the relay dies before marking it sent

async def main():
    engine = make_engine(sys.argv[1])
    await relay(engine, Outbox, publish, stop=asyncio.Event(), lease=1.0, poll=0.05)

asyncio.run(main())
"""


async def test_a_relay_killed_between_publish_and_mark_loses_nothing(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    ids = await emit_many(engine, 3)
    broker = tmp_path / "broker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)
    url = engine.url.render_as_string(hide_password=False)
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_RELAY, url, str(broker),
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(killed.communicate(), WAIT)
    assert killed.returncode == -signal.SIGKILL, stderr.decode()
    assert broker.read_text().split() == [str(ids[0])]  # published, never marked
    assert await unsent(engine) == 3  # the whole batch is still the dead relay's

    # Once its lease expires, the next relay takes the batch: the first event again.
    stop = asyncio.Event()

    async def publish(e: Outbox) -> None:
        with broker.open("a") as log:
            log.write(f"{e.id}\n")
        if e.id == ids[-1]:
            stop.set()

    count = await asyncio.wait_for(
        outbox.relay(engine, Outbox, publish, stop=stop, lease=1.0, poll=0.05), WAIT
    )
    assert count == 3
    assert broker.read_text().split() == [str(i) for i in [ids[0], *ids]]  # at least once
    stored = await all_events(engine)
    assert [(e.attempts, e.sent_at is not None) for e in stored] == [(2, True)] * 3


async def test_a_failing_publish_is_retried_with_backoff_and_the_rest_go_on(
    engine: AsyncEngine,
) -> None:
    ids = await emit_many(engine, 3)
    tries: list[float] = []
    published: list[int] = []
    stop = asyncio.Event()

    async def flaky(e: Outbox) -> None:
        if e.id == ids[0]:
            tries.append(time.monotonic())
            if e.attempts < 3:
                raise ConnectionError(f"broker refused attempt {e.attempts}\x00")
        published.append(e.id)
        if len(published) == len(ids):
            stop.set()

    count = await asyncio.wait_for(
        outbox.relay(engine, Outbox, flaky, stop=stop, backoff=0.1, poll=0.02), WAIT
    )
    assert count == 3
    assert published == [ids[1], ids[2], ids[0]]  # the failure waited, the rest did not
    # backoff * 2**attempts after attempts 1 and 2: 0.2 s, then 0.4 s (never sooner).
    gaps = [later - earlier for earlier, later in zip(tries, tries[1:], strict=False)]
    assert len(gaps) == 2 and gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps
    first = (await all_events(engine))[0]
    assert (first.attempts, first.sent_at is not None) == (3, True)
    assert first.last_error == "ConnectionError: broker refused attempt 2\ufffd"


async def test_a_publish_that_outlasts_its_lease_counts_as_failed(engine: AsyncEngine) -> None:
    """Past its lease another relay may publish the event too: the relay stops
    waiting, records a failure, and retries it under a new claim."""
    await emit_many(engine, 1)
    attempts: list[int] = []
    stop = asyncio.Event()

    async def hangs_once(e: Outbox) -> None:
        attempts.append(e.attempts)
        if e.attempts == 1:
            await asyncio.sleep(3600)  # a broker that never answers
        stop.set()

    await asyncio.wait_for(
        outbox.relay(engine, Outbox, hangs_once, stop=stop, lease=0.3, backoff=0.05, poll=0.02),
        WAIT,
    )
    assert attempts == [1, 2]
    [stored] = await all_events(engine)
    assert stored.sent_at is not None and re.match(r"TimeoutError\b", stored.last_error or "")


async def test_a_stopped_relay_gives_the_rest_of_its_batch_back(engine: AsyncEngine) -> None:
    ids = await emit_many(engine, 5)
    stop = asyncio.Event()

    async def one_then_stop(e: Outbox) -> None:
        stop.set()

    assert await outbox.relay(engine, Outbox, one_then_stop, stop=stop, lease=30) == 1
    rest = await outbox.claim(engine, Outbox)  # free at once, not after the 30 s lease
    assert [e.id for e in rest] == ids[1:]


async def test_purge_deletes_only_events_sent_long_enough_ago(engine: AsyncEngine) -> None:
    ids = await emit_many(engine, 5)
    for e in await outbox.claim(engine, Outbox, batch=4):
        assert await outbox.mark_sent(engine, e)
    async with engine.begin() as conn:  # three of the four were sent two hours ago
        old = update(Outbox).where(col(Outbox.id).in_(ids[:3]))
        await conn.execute(old.values(sent_at=utc_now() - timedelta(hours=2)))
    assert await outbox.purge_sent(engine, Outbox, timedelta(hours=1), batch=2) == 3
    kept = await all_events(engine)
    assert [(e.id, e.sent_at is None) for e in kept] == [(ids[3], False), (ids[4], True)]


# -- The API: POST /users/ emits user.created, in the insert's transaction -------------------


async def _user_events(session: AsyncSession) -> list[tuple[str, str | None, Any]]:
    rows = await session.exec(select(Outbox).order_by(col(Outbox.id)))
    return [(e.topic, e.key, e.payload) for e in rows.all()]


async def test_post_users_emits_one_user_created_and_a_refusal_none(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    ada = {"name": "Ada", "email": "ada@example.com"}
    response = await client.post("/users/", json=ada)
    assert response.status_code == 201, response.text
    user_id = response.json()["id"]
    created = [("user.created", str(user_id), {"id": user_id, "team_id": None})]
    assert await _user_events(session) == created
    refusals = [
        ({"name": "Eve", "email": "ADA@example.com"}, 400),  # the email is taken
        ({**ada, "email": "bob@example.com", "team_id": 12345}, 404),  # no such team
        ({"name": "", "email": "eve@example.com"}, 422),
    ]
    for body, status in refusals:
        assert (await client.post("/users/", json=body)).status_code == status
    assert await _user_events(session) == created


async def test_a_retried_post_users_emits_nothing_more(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """POST /users/ takes no Idempotency-Key: a client's retry of the same body (with
    the key it sends to /transfers/) is refused by the unique email, and emits nothing."""
    body, headers = {"name": "Ada", "email": "ada@example.com"}, {"Idempotency-Key": "k-1"}
    assert (await client.post("/users/", json=body, headers=headers)).status_code == 201
    assert (await client.post("/users/", json=body, headers=headers)).status_code == 400
    assert [topic for topic, _, _ in await _user_events(session)] == ["user.created"]


async def test_racing_posts_of_one_email_emit_one_event(
    engine: AsyncEngine, live_client: httpx.AsyncClient
) -> None:
    bodies = [{"name": f"Racer {i}", "email": "race@example.com"} for i in range(10)]
    responses = await asyncio.gather(*(live_client.post("/users/", json=b) for b in bodies))
    [winner] = [r.json() for r in responses if r.status_code == 201]
    assert sorted(r.status_code for r in responses) == [201] + [400] * 9
    assert [(e.topic, e.payload["id"]) for e in await all_events(engine)] == [
        ("user.created", winner["id"])
    ]


# -- what once stopped a relay for good, or every relay after it on the same event ------


async def test_a_poison_event_never_stops_the_relay(engine: AsyncEngine) -> None:
    """An event retried past any float backoff (2**1100), a broker error whose text
    holds a lone surrogate, a publish raising a CancelledError of its own: each is
    a failed publish, recorded, and the relay goes on to the next event."""
    first, second, third, last = await emit_many(engine, 4)
    async with make_session_maker(engine)() as session, session.begin():
        await session.exec(update(Outbox).where(col(Outbox.id) == first).values(attempts=1100))
    stop, published = asyncio.Event(), []

    async def hostile(e: Outbox) -> None:
        if e.id == first:
            raise ConnectionError("refused")
        if e.id == second:
            raise RuntimeError(b"bad \xff".decode("utf-8", "surrogateescape"))
        if e.id == third:
            raise asyncio.CancelledError()  # not the relay's cancellation
        published.append(e.id)
        stop.set()

    await asyncio.wait_for(outbox.relay(engine, Outbox, hostile, stop=stop, poll=0.02), WAIT)
    assert published == [last]
    errors = {e.id: e.last_error for e in await all_events(engine)}
    assert errors[first] == "ConnectionError: refused"
    assert errors[second] == "RuntimeError: bad ?"
    assert errors[third] == "CancelledError: "


async def test_a_relay_waits_out_an_exhausted_pool(engine: AsyncEngine) -> None:
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    await emit_many(engine, 1)
    calls, stop, real_claim = 0, asyncio.Event(), outbox.claim

    async def claim(*args: Any, **kwargs: Any) -> list[Outbox]:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise PoolTimeout("QueuePool limit reached")
        return await real_claim(*args, **kwargs)

    async def publish(e: Outbox) -> None:
        stop.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outbox, "claim", claim)
        assert (
            await asyncio.wait_for(
                outbox.relay(engine, Outbox, publish, stop=stop, poll=0.01), WAIT
            )
            == 1
        )


async def test_a_relay_cancelled_from_outside_gives_its_batch_back(engine: AsyncEngine) -> None:
    ids = await emit_many(engine, 3)
    started = asyncio.Event()

    async def hangs(e: Outbox) -> None:
        started.set()
        await asyncio.sleep(3600)

    relay = asyncio.create_task(outbox.relay(engine, Outbox, hangs, stop=asyncio.Event(), lease=30))
    await asyncio.wait_for(started.wait(), WAIT)
    relay.cancel()
    with pytest.raises(asyncio.CancelledError):
        await relay
    rest = await outbox.claim(engine, Outbox)  # the two it had not begun: free at once
    assert [e.id for e in rest] == ids[1:]


@pytest.mark.parametrize(
    "option", [{"lease": 0}, {"batch": 0}, {"poll": 0}, {"backoff": float("nan")}, {"batch": -1}]
)
async def test_a_relay_refuses_what_would_spin_or_publish_twice(
    engine: AsyncEngine, option: dict[str, float]
) -> None:
    async def publish(e: Outbox) -> None:
        pass

    def plain(e: Outbox) -> None:  # would publish, then fail at the await: again and again
        pass

    with pytest.raises(ValueError, match="must be a finite number"):
        await outbox.relay(engine, Outbox, publish, stop=asyncio.Event(), **option)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async function"):
        await outbox.relay(engine, Outbox, plain, stop=asyncio.Event())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await outbox.claim(engine, Outbox, batch=-1)
    with pytest.raises(ValueError):
        await outbox.purge_sent(engine, Outbox, timedelta(0), batch=0)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


CHANGED_OR_REFUSED = {
    "int keys": ({1: "a"}, TypeError),  # would come back as {"1": "a"}
    "none key": ({None: 1}, TypeError),
    "32 deep": (nested(32), ValueError),  # MariaDB's JSON CHECK stops at 31
    "5000 deep": (nested(5000), ValueError),  # a RecursionError in json.dumps
    "over 8 MB": ({"text": "x" * 8_000_001}, ValueError),
}


@pytest.mark.parametrize(
    ("payload", "error"), CHANGED_OR_REFUSED.values(), ids=CHANGED_OR_REFUSED.keys()
)
async def test_what_would_not_come_back_the_same_is_refused(
    engine: AsyncEngine, payload: Any, error: type[Exception]
) -> None:
    async with make_session_maker(engine)() as session, session.begin():
        with pytest.raises(error):
            await outbox.emit(session, Outbox, "t", payload)
        with pytest.raises(ValueError):  # a lone surrogate in the topic or the key
            await outbox.emit(session, Outbox, "t\udcff", {})
        with pytest.raises(ValueError):
            await outbox.emit(session, Outbox, "t", {}, key="k\udcff")
    assert await all_events(engine) == []


async def test_nesting_31_deep_comes_back_on_every_backend(engine: AsyncEngine) -> None:
    async with make_session_maker(engine)() as session, session.begin():
        await outbox.emit(session, Outbox, "t", {"d": nested(30)})  # the object is level 1
    [claimed] = await outbox.claim(engine, Outbox)
    assert claimed.payload == {"d": nested(30)}
