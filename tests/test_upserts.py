"""upserts.py on every backend: what upsert_users and get_or_create_team store and
return, how many statements they send, whose transaction they run in, and races.

Races run each writer in a session of its own (``asyncio.gather``), for a few
rounds on fresh rows, and check afterwards, in a fresh session, that the
database holds one row per email or name and that nobody saw an exception.
"""

import asyncio

import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from asyncpatterns import bench, crud, relationships
from asyncpatterns.cli import TOUR_STEPS
from asyncpatterns.db import is_retryable, make_session_maker
from asyncpatterns.models import Team, User
from asyncpatterns.sqlwatch import watch_sql
from asyncpatterns.upserts import RepeatedEmailError, get_or_create_team, upsert_users

ROUNDS = 3  # rounds per storm, each on fresh rows
RACE_TIMEOUT = 60.0  # seconds a storm may take: a hang fails instead of blocking the run


def make_users(n: int, prefix: str = "user", name: str = "User") -> list[User]:
    return [User(name=f"{name} {i}", email=f"{prefix}{i}@example.com") for i in range(n)]


async def stored_users(engine) -> dict[str, tuple[int, str, int]]:
    """{email: (id, name, version)} as the database holds it, read in a fresh session."""
    async with make_session_maker(engine)() as session:
        rows = await session.exec(select(User.email, User.id, User.name, User.version))
        return {email: (id_, name, version) for email, id_, name, version in rows}


async def team_rows(engine, name: str) -> list[int]:
    async with make_session_maker(engine)() as session:
        return list((await session.exec(select(Team.id).where(Team.name == name))).all())


# -- upsert_users: what it stores and returns ----------------------------------------------


async def test_upsert_inserts_new_users_and_returns_them_in_input_order(session) -> None:
    users = make_users(25)
    returned = await upsert_users(session, users)
    assert all(a is b for a, b in zip(returned, users, strict=True))  # the objects passed in
    assert all(u.id is not None and u.version == 1 for u in returned)
    assert len({u.id for u in returned}) == 25
    assert await crud.count_users(session) == 25
    assert await session.get(User, users[3].id) is users[3]  # persistent in the session


async def test_upsert_updates_by_canonical_email_and_bumps_the_version(session) -> None:
    ada = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    session.expunge(ada)  # a caller that no longer holds her
    [again] = await upsert_users(
        session, [User(name="Ada Lovelace", email="  ADA@Example.COM ", is_active=False)]
    )
    assert (again.id, again.email, again.name) == (ada.id, "ada@example.com", "Ada Lovelace")
    assert (again.is_active, again.version) == (False, 2)
    [third] = await upsert_users(session, [User(name="Ada L.", email="ada@example.com")])
    assert third is again and (third.version, third.is_active) == (3, True)
    assert await crud.count_users(session) == 1


async def test_a_user_the_session_holds_is_brought_up_to_date(session) -> None:
    ada = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    [returned] = await upsert_users(session, [User(name="Renamed", email="ada@example.com")])
    assert returned is ada  # the object the session holds, not a second one
    assert (ada.name, ada.version) == ("Renamed", 2)
    # its version is the stored one: an ORM update afterwards is not a stale write
    updated = await crud.update_user(session, ada.id, {"name": "Ada again"})
    assert (updated.name, updated.version) == ("Ada again", 3)


async def test_a_held_user_shows_nothing_of_an_upsert_rolled_back(engine) -> None:
    async with make_session_maker(engine)() as session:
        await crud.create_users(session, [User(name="Ada", email="ada@example.com")])
    async with make_session_maker(engine)() as session, session.begin():
        ada = (await session.exec(select(User))).one()
        savepoint = await session.begin_nested()
        await upsert_users(session, [User(name="Upserted", email="ada@example.com")])
        assert (ada.name, ada.version) == ("Upserted", 2)
        await savepoint.rollback()
        # Expired by the rollback, as the ORM expires what it wrote: nothing shows
        # the values that were never kept. Reloaded, it is as stored.
        assert {"name", "version"} <= sa_inspect(ada).expired_attributes
        await session.refresh(ada)
        assert (ada.name, ada.version) == ("Ada", 1)
        ada.name = "Ada Lovelace"
        await session.flush()  # its version is the stored one: not a false conflict
    async with make_session_maker(engine)() as session:
        assert (await session.exec(select(User.name, User.version))).one() == ("Ada Lovelace", 2)


async def test_mixed_batches_across_batch_boundaries(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        existing = await crud.create_users(session, make_users(7, "even"))  # 7 of 14 exist
    ids = {u.email: u.id for u in existing}
    users = [
        User(name=f"new {i}", email=f"{prefix}{i}@example.com")
        for i in range(7)
        for prefix in ("odd", "even")
    ]
    async with session_maker() as session:
        with watch_sql(engine) as sql:
            returned = await upsert_users(session, users, batch_size=3)
    assert sql.count == 5  # 14 users in batches of 3: one statement per batch
    assert [u.email for u in returned] == [u.email for u in users]
    for user in returned:
        if user.email.startswith("even"):
            assert (user.id, user.version) == (ids[user.email], 2)
        else:
            assert user.version == 1 and user.id not in ids.values()
    stored = await stored_users(engine)
    assert len(stored) == 14
    assert {email: name for email, (_, name, _) in stored.items()} == {
        u.email: u.name for u in users
    }


async def test_10000_users_half_existing_in_one_statement_per_1000(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        await crud.create_users(session, make_users(5000))
    async with session_maker() as session:
        with watch_sql(engine) as sql:
            returned = await upsert_users(session, make_users(10_000, name="Renamed"))
    assert sql.count == 10
    assert sql.first_words(1) == ["INSERT"] * 10
    assert len({u.id for u in returned}) == 10_000
    stored = await stored_users(engine)
    assert len(stored) == 10_000
    assert stored["user4999@example.com"][1:] == ("Renamed 4999", 2)
    assert stored["user5000@example.com"][1:] == ("Renamed 5000", 1)


async def test_without_returning_the_rows_are_read_back_with_a_locking_read(
    engine, no_returning, backend
) -> None:
    # MySQL has no INSERT ... RETURNING: that path, forced on MariaDB (and SQLite).
    if backend == "postgresql":
        pytest.skip("PostgreSQL always has RETURNING: its path does not depend on the flag")
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        existing = await crud.create_users(session, make_users(3))
    async with session_maker() as session:
        with watch_sql(engine) as sql:
            returned = await upsert_users(session, make_users(6, name="New"), batch_size=4)
    assert sql.first_words(1) == ["INSERT", "SELECT", "INSERT", "SELECT"]
    if backend == "mysql":
        assert all(s.sql.endswith("FOR UPDATE") for s in sql.statements[1::2])
    assert [u.id for u in returned[:3]] == [u.id for u in existing]
    assert [u.version for u in returned] == [2, 2, 2, 1, 1, 1]
    stored = await stored_users(engine)
    assert {u.email: u.id for u in returned} == {e: id_ for e, (id_, _, _) in stored.items()}


async def test_upsert_of_nothing_sends_nothing(engine) -> None:
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql:
            assert await upsert_users(session, []) == []
    assert sql.count == 0


@pytest.mark.parametrize(
    "emails",
    [
        ["ada@example.com", "bob@example.com", "ada@example.com"],
        ["Ada@Example.com", "ada@example.com"],  # one email once canonical
        ["jos\u00e9@example.com", "jose\u0301@example.com"],  # composed and decomposed é
    ],
)
async def test_one_email_twice_in_one_call_is_refused_before_anything_is_sent(
    engine, emails
) -> None:
    users = [User(name=f"n{i}", email=email) for i, email in enumerate(emails)]
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql, pytest.raises(RepeatedEmailError, match="more than once"):
            await upsert_users(session, users)
    assert sql.count == 0
    assert await stored_users(engine) == {}


async def test_hostile_but_legal_values_are_stored_as_given(session) -> None:
    longest_email = "é" * 243 + "@example.com"  # 255 characters
    users = [
        User(name="é" * 100, email=longest_email),  # the longest legal name, 200 bytes
        User(name="🦆" * 100, email="DUCK@Example.com"),  # 4-byte characters
        User(name="İstanbul", email="İ@example.com"),  # lower-cases to two characters
        User(name="'; DROP TABLE user; --", email="o'brien@example.com"),
    ]
    returned = await upsert_users(session, users)
    emails = [u.email for u in returned]
    assert emails == [
        longest_email,
        "duck@example.com",
        "i\u0307@example.com",
        "o'brien@example.com",
    ]
    again = await upsert_users(
        session, [User(name="x", email=email.upper()) for email in ("duck@example.com",)]
    )
    assert again[0].id == returned[1].id and again[0].version == 2
    rows = dict((await session.exec(select(User.email, User.name))).all())
    assert rows == {
        longest_email: "é" * 100,
        "duck@example.com": "x",
        "i\u0307@example.com": "İstanbul",
        "o'brien@example.com": "'; DROP TABLE user; --",
    }


@pytest.mark.parametrize(
    ("name", "email", "message"),
    [
        ("Ada", "a" * 250 + "@example.com", "longer than 255"),
        ("Ada", "İ" * 128 + "@example.com", "longer than 255"),  # 140, 268 once lower-cased
        ("a" * 101, "ada@example.com", "at most 100"),
        ("Ada\x00", "ada@example.com", "NUL"),
        ("Ada", "ada\x00@example.com", "NUL"),
        ("Ada\ud800", "ada@example.com", "surrogate"),
        ("Ada", "ada\udfff@example.com", "surrogate"),
    ],
)
async def test_values_no_backend_may_store_are_refused_on_every_backend(
    session, name, email, message
) -> None:
    with pytest.raises(ValueError, match=message):
        await upsert_users(
            session, [User(name="ok", email="ok@example.com"), User(name=name, email=email)]
        )
    assert await crud.count_users(session) == 0


@pytest.mark.parametrize("team_id", [999, 2**31, -1, 2**63])
async def test_an_unknown_team_is_a_lookup_error_and_stores_nothing(session, team_id) -> None:
    users = [
        User(name="Ada", email="ada@example.com"),
        User(name="Bob", email="b@x.org", team_id=team_id),
    ]
    with pytest.raises(LookupError, match="Team not found"):
        await upsert_users(session, users)
    assert await crud.count_users(session) == 0


# -- Whoever begins a transaction ends it ---------------------------------------------------


async def test_upsert_inside_the_callers_transaction_joins_it_and_commits_nothing(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        async with session.begin():
            users = await upsert_users(session, make_users(3))
            assert await stored_users(engine) == {}  # not committed: the caller commits
            team = await get_or_create_team(session, "Red")
            assert await team_rows(engine, "Red") == []
            await session.rollback()
        assert users[0] not in session and team not in session  # their rows are gone
    assert await stored_users(engine) == {}
    async with session_maker() as session, session.begin():
        await upsert_users(session, make_users(3))
        await get_or_create_team(session, "Red")
    assert len(await stored_users(engine)) == 3 and len(await team_rows(engine, "Red")) == 1


async def test_a_session_holding_uncommitted_changes_is_refused(engine) -> None:
    from asyncpatterns.db import TransactionOwnershipError

    async with make_session_maker(engine)() as session:
        session.add(User(name="Pending", email="pending@example.com"))
        with pytest.raises(TransactionOwnershipError):
            await upsert_users(session, make_users(1))
        with pytest.raises(TransactionOwnershipError):
            await get_or_create_team(session, "Red")


# -- get_or_create_team ---------------------------------------------------------------------


async def test_get_or_create_team_creates_once_then_gets(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        red = await get_or_create_team(session, "  Re\u0301d ")  # trimmed, NFC
        assert red.id is not None and red.name == "R\u00e9d"
    async with session_maker() as session:
        with watch_sql(engine) as sql:
            again = await get_or_create_team(session, red.name)
        assert again.id == red.id
    assert sql.first_words(1) == ["SELECT"]  # found: nothing written
    assert await team_rows(engine, red.name) == [red.id]


async def test_team_names_are_matched_canonical(session) -> None:
    created = await relationships.create_team(session, "Caf\u00e9")
    for spelling in ("Cafe\u0301", " Caf\u00e9\t", "Caf\u00e9"):
        assert (await get_or_create_team(session, spelling)).id == created.id
    other = await get_or_create_team(session, "café")  # another case is another name
    assert other.id != created.id


@pytest.mark.parametrize("name", ["", "   ", "a" * 101, "\u0958" * 51])
async def test_blank_or_too_long_team_names_are_refused(session, name) -> None:
    with pytest.raises(ValueError):
        await get_or_create_team(session, name)


async def test_the_longest_team_name_is_stored(session) -> None:
    name = "🦆" * 100
    team = await get_or_create_team(session, name)
    assert (await get_or_create_team(session, name)).id == team.id
    assert (await session.exec(select(Team.name))).all() == [name]


@pytest.mark.parametrize("end", ["commit", "rollback"])
async def test_get_or_create_waits_for_a_team_being_created(engine, end) -> None:
    # s1 creates the team in a transaction it holds open; s2 asks for it meanwhile.
    session_maker = make_session_maker(engine)
    async with session_maker() as s1, session_maker() as s2:
        transaction = await s1.begin()
        first_id = (await get_or_create_team(s1, "Red")).id  # joins s1's transaction
        second = asyncio.create_task(get_or_create_team(s2, "Red"))
        await asyncio.sleep(0.3)
        assert not second.done()  # waiting for s1's row (SQLite: for the write lock)
        await (transaction.commit() if end == "commit" else transaction.rollback())
        team = await asyncio.wait_for(second, 15)
    if end == "commit":  # s2 got s1's team; after a rollback, one of its own
        assert team.id == first_id
    assert await team_rows(engine, "Red") == [team.id]


async def test_a_callers_old_snapshot_does_not_hide_the_winner(engine, backend) -> None:
    # MariaDB/MySQL: the caller's transaction read before another one committed the
    # team; its snapshot does not show that row, the locking re-read does.
    session_maker = make_session_maker(engine)
    async with session_maker() as s2:
        await s2.begin()
        await s2.exec(select(Team))  # the snapshot starts here
        async with session_maker() as s1:
            winner = await relationships.create_team(s1, "Red")
        try:
            team = await get_or_create_team(s2, "Red")
        except DBAPIError as exc:
            # SQLite: a transaction that read before another wrote cannot write
            # (SQLITE_BUSY_SNAPSHOT): retryable, and the caller owns the retry.
            assert backend == "sqlite" and is_retryable(exc), exc
            await s2.rollback()
            team = await get_or_create_team(s2, "Red")
        else:
            await s2.commit()
    assert team.id == winner.id
    assert await team_rows(engine, "Red") == [winner.id]


# -- Races ------------------------------------------------------------------------------------


async def gather_in_own_sessions(engine, calls) -> list:
    """Run each ``call(session)`` at once, each in a session of its own."""
    session_maker = make_session_maker(engine)

    async def one(call):
        async with session_maker() as session:
            return await call(session)

    return await asyncio.wait_for(asyncio.gather(*(one(c) for c in calls)), RACE_TIMEOUT)


async def test_racing_get_or_create_stores_one_team_and_all_get_it(engine) -> None:
    for round_number in range(ROUNDS):
        name = f"Race {round_number}"
        spellings = [f" {name}", name, f"{name}\t"]
        teams = await gather_in_own_sessions(
            engine, [lambda s, n=spellings[i % 3]: get_or_create_team(s, n) for i in range(20)]
        )
        ids = {team.id for team in teams}
        assert len(ids) == 1 and {team.name for team in teams} == {name}
        assert await team_rows(engine, name) == list(ids)


async def test_racing_overlapping_upserts_keep_one_row_per_email(engine) -> None:
    # Each writer upserts a window of 60 emails out of 100, in its own order and case;
    # a row's version counts the upserts that wrote it.
    for round_number in range(ROUNDS):
        prefix = f"r{round_number}."
        windows = [range(start, start + 60) for start in range(0, 41, 5)]  # 9 writers

        def call(window, writer, prefix=prefix):
            users = [
                User(name=f"w{writer}", email=f"{prefix}{i}@Example.com".upper())
                if writer % 2
                else User(name=f"w{writer}", email=f"{prefix}{i}@example.com")
                for i in (reversed(window) if writer % 3 else window)
            ]
            return lambda session: upsert_users(session, users, batch_size=25)

        results = await gather_in_own_sessions(
            engine, [call(w, writer) for writer, w in enumerate(windows)]
        )
        stored = {e: v for e, v in (await stored_users(engine)).items() if e.startswith(prefix)}
        assert len(stored) == 100
        writes = {f"{prefix}{i}@example.com": sum(i in w for w in windows) for i in range(100)}
        assert {e: version for e, (_, _, version) in stored.items()} == writes
        for users in results:  # every writer got the ids that are stored
            assert all(stored[u.email][0] == u.id for u in users)


async def test_racing_upserts_and_get_or_create_through_the_api(live_client, engine) -> None:
    answers = await asyncio.wait_for(
        asyncio.gather(
            *(
                live_client.post("/teams/get-or-create", json={"name": name})
                for name in [" Red", "Red", "Red "] * 7
            )
        ),
        RACE_TIMEOUT,
    )
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["id"] for a in answers}) == 1
    assert await team_rows(engine, "Red") == [answers[0].json()["id"]]


# -- The API endpoint -------------------------------------------------------------------------


async def test_get_or_create_endpoint_answers_200_with_the_team_and_members(client) -> None:
    first = await client.post("/teams/get-or-create", json={"name": "Red"})
    assert first.status_code == 200
    team = first.json()
    assert team == {"id": team["id"], "name": "Red", "members": []}
    member = await client.post(
        "/users/", json={"name": "Ada", "email": "ada@example.com", "team_id": team["id"]}
    )
    again = await client.post("/teams/get-or-create", json={"name": " Red "})
    assert again.status_code == 200
    assert again.json()["id"] == team["id"]
    assert [m["id"] for m in again.json()["members"]] == [member.json()["id"]]


@pytest.mark.parametrize(
    "body",
    [{"name": ""}, {"name": "  "}, {"name": "a" * 101}, {"name": "a\x00"}, {"name": 5}, {}],
)
async def test_get_or_create_endpoint_refuses_bad_names_with_422(client, body) -> None:
    response = await client.post("/teams/get-or-create", json=body)
    assert response.status_code == 422
    assert (await client.get("/teams/")).json() == []


# -- The tour and the bench ---------------------------------------------------------------


async def test_tour_step_races_and_upserts(engine) -> None:
    lines = await dict(TOUR_STEPS)["Upserts"](engine)
    assert lines == [
        "20 racing get_or_create_team calls for one name: 1 team, no error",
        "upsert_users of 1000 users, 500 stored already: 500 updated, 500 inserted, "
        "in 1 statement(s)",
    ]


async def test_bench_upsert_counts_statements_and_checks_every_row(engine) -> None:
    results = {r.variant: r for r in await bench.upsert(engine, users=40, repeats=1)}
    common = results["common: select, insert or update each"]
    assert common.kind == bench.ANTI
    assert common.statements == 80  # a SELECT per user, then its INSERT or UPDATE
    assert results["kit: upserts.upsert_users"].statements == 1
    assert results["raw driver: executemany of the upsert"].vs_raw == 1
    assert all(r.extra == {"users": 40, "existing": 20} for r in results.values())
    assert await stored_users(engine) == {}  # emptied after the scenario


async def test_objects_of_another_session_are_left_alone(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as first:
        [ada] = await upsert_users(first, [User(name="Ada", email="ada@example.com")])
    async with session_maker() as second:
        ada.name = "Ada Lovelace"  # detached: it belongs to the closed session
        [copy] = await upsert_users(second, [ada])
        assert copy is not ada and copy in second and ada not in second
        assert (copy.id, copy.name, copy.version) == (ada.id, "Ada Lovelace", 2)


@pytest.mark.parametrize("value", [None, 5])
async def test_values_that_are_not_text_are_value_errors(session, value) -> None:
    with pytest.raises(ValueError, match="text"):
        await upsert_users(session, [User(name="Ada", email=value)])
    with pytest.raises(ValueError, match="text"):
        await get_or_create_team(session, value)


async def test_users_of_a_rolled_back_upsert_come_back_transient_to_retry(engine) -> None:
    """The caller's transaction rolls back after an upsert: the users passed in were left
    detached and expired (reading one raised); they come back as they were given."""
    async with make_session_maker(engine)() as session:
        users = make_users(3)
        async with session.begin():
            await upsert_users(session, users)
            await session.rollback()
        assert all(sa_inspect(u).transient for u in users)
        assert [(u.email, u.id) for u in users] == [
            (f"user{i}@example.com", None) for i in range(3)
        ]
        assert len(await upsert_users(session, users)) == 3
    assert len(await stored_users(engine)) == 3
