"""Optimistic locking on every backend: the version column, conditional updates,
ETag / If-Match over HTTP, hostile If-Match values, and racing writers.

A lost update is the failure guarded against: two writers read version n, both
write, and one write silently replaces the other. With the version, exactly one
write over version n succeeds; every other one is refused (VersionConflictError,
HTTP 412) and the row holds the winner's change, on SQLite, PostgreSQL and MySQL.
"""

import asyncio
import os
import re
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.util import await_only

from asyncpatterns import crud, locking, relationships
from asyncpatterns.api import create_app
from asyncpatterns.cli import TOUR_STEPS
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import User
from asyncpatterns.sqlwatch import watch_sql
from asyncpatterns.testing import _client_for

ROUNDS = int(os.environ.get("ASYNCPATTERNS_RACE_ROUNDS", "3"))  # rounds per race
WRITERS = 6  # concurrent writers per round
TIMEOUT = 30.0  # seconds one round may take: a hang fails instead of blocking


async def stored(engine: AsyncEngine, user_id: int) -> User | None:
    """The user as committed, read in a fresh session."""
    async with make_session_maker(engine)() as session:
        return await session.get(User, user_id)


async def new_user(engine: AsyncEngine, email: str = "ada@example.com") -> User:
    async with make_session_maker(engine)() as session:
        return await crud.create_user(session, User(name="Ada", email=email))


# -- The version column ------------------------------------------------------------------


async def test_a_new_user_is_version_1_and_each_change_counts_it_up(session) -> None:
    user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    assert user.version == 1
    assert (await crud.update_user(session, user.id, {"name": "Ada L."})).version == 2
    # No change, no UPDATE and no new version: the ETag still names the same row.
    assert (await crud.update_user(session, user.id, {"name": "Ada L."})).version == 2
    user.name = "Ada Lovelace"  # the ORM counts too, whoever changes the object
    await session.commit()
    assert user.version == 3


async def test_the_update_checks_the_version_it_read(engine) -> None:
    user = await new_user(engine)
    with watch_sql(engine) as sql:
        await crud_update(engine, user.id, {"name": "Ada L."}, expected_version=1)
    (update,) = [s.sql for s in sql.statements if s.sql.lstrip().upper().startswith("UPDATE")]
    assert "version" in update.split("WHERE", 1)[1]


async def crud_update(engine: AsyncEngine, user_id: int, data: Any, **options: Any) -> Any:
    async with make_session_maker(engine)() as session:
        return await crud.update_user(session, user_id, data, **options)


async def test_create_users_stores_version_1_and_its_users_can_be_changed(engine) -> None:
    """The bulk INSERT is SQL by hand and does not name the column: the server
    default gives 1, the objects say 1 (whatever they said), and a later ORM
    UPDATE of them matches their row."""
    async with make_session_maker(engine)() as session:
        users = await crud.create_users(
            session,
            [
                User(name="Ada", email="ada@example.com", version=7),
                User(name="Bob", email="b@x.io"),
            ],
        )
        assert [u.version for u in users] == [1, 1]
        users[0].name = "Ada L."
        await session.commit()  # UPDATE ... WHERE id = ? AND version = 1
        assert users[0].version == 2
    assert (await stored(engine, users[0].id)).version == 2
    assert (await stored(engine, users[1].id)).version == 1


@pytest.mark.parametrize("one", [1.0, True, Decimal(1)], ids=repr)
async def test_create_users_gives_an_int_version_whatever_equal_value_was_set(engine, one) -> None:
    """1.0, True and Decimal(1) equal 1; the objects must hold the int the column
    gives back, or the next UPDATE binds the wrong type (SQLite refuses a Decimal)."""
    async with make_session_maker(engine)() as session:
        (user,) = await crud.create_users(session, [User(name="V", email="v@x.io", version=one)])
        assert type(user.version) is int and user.version == 1
        user.name = "W"
        await session.commit()
        assert type(user.version) is int and user.version == 2
    assert (await stored(engine, user.id)).version == 2


async def test_bulk_writes_count_the_version_too(engine) -> None:
    """A representation that changed must get a new ETag, whatever path changed it."""
    async with make_session_maker(engine)() as session:
        team = await relationships.create_team(session, "Engines")
        ada = await crud.create_user(
            session, User(name="Ada", email="ada@example.com", team_id=team.id)
        )
        assert await crud.deactivate_users(session, [ada.id]) == 1
        assert ada.version == 2  # the loaded object follows the UPDATE
        assert await relationships.delete_team(session, team.id)
        assert ada.team_id is None and ada.version == 3
    assert (await stored(engine, ada.id)).version == 3


# -- StaleDataError: what the ORM raises, and what the kit answers instead -------------


async def test_a_stale_object_raises_stale_data_error(engine) -> None:
    """Two sessions load version 1; the second to write matches no row."""
    user = await new_user(engine)
    sessions = make_session_maker(engine)
    async with sessions() as first, sessions() as second:
        mine, theirs = await first.get(User, user.id), await second.get(User, user.id)
        await first.commit()  # reading is over (SQLite: no open read transaction)
        await second.commit()
        theirs.name = "Bob's change"
        await second.commit()
        mine.name = "Ada's change"
        with pytest.raises(StaleDataError, match="expected to update 1 row"):
            await first.commit()
        await first.rollback()
    assert (await stored(engine, user.id)).name == "Bob's change"


async def test_an_expected_version_is_a_condition(engine) -> None:
    user = await new_user(engine)
    updated = await crud_update(engine, user.id, {"name": "B"}, expected_version=1)
    assert updated.version == 2
    with pytest.raises(crud.VersionConflictError) as conflict:
        await crud_update(engine, user.id, {"name": "C"}, expected_version=1)
    assert (conflict.value.current, conflict.value.expected) == (2, {1})
    assert "version 2" in str(conflict.value)
    with pytest.raises(crud.VersionConflictError):  # nothing can match an empty set
        await crud_update(engine, user.id, {"name": "C"}, expected_version=set())
    assert (await crud_update(engine, user.id, {"name": "C"}, expected_version={1, 2})).version == 3
    # Gone is not changed: no such user is None, whatever version was expected.
    assert await crud_update(engine, 10**6, {"name": "C"}, expected_version=1) is None
    assert (await stored(engine, user.id)).name == "C"


async def test_a_conditional_update_inside_the_callers_transaction(engine) -> None:
    """It joins the caller's transaction: a conflict undoes only its own part."""
    user = await new_user(engine)
    other = await new_user(engine, "bob@example.com")
    async with make_session_maker(engine)() as session, session.begin():
        await crud.update_user(session, other.id, {"name": "Bob B."})
        with pytest.raises(crud.VersionConflictError):
            await crud.update_user(session, user.id, {"name": "X"}, expected_version=5)
    assert (await stored(engine, other.id)).name == "Bob B."
    assert (await stored(engine, user.id)).name == "Ada"


@pytest.mark.parametrize("meanwhile", ["changed", "deleted"])
async def test_a_write_between_read_and_update_is_told_apart(engine, backend, meanwhile) -> None:
    """The version matched when read; another writer commits before the UPDATE.
    The UPDATE matches no row (StaleDataError); a locking read says which:
    changed is a conflict, deleted is None (404). SQLite has one writer, which
    holds the write lock from its read on: the other writer cannot get in."""
    if backend == "sqlite":
        pytest.skip("SQLite: no writer can commit between this writer's read and its UPDATE")
    user = await new_user(engine)
    other = make_session_maker(engine)

    async def write_meanwhile() -> None:
        async with other() as session, session.begin():
            if meanwhile == "deleted":
                await crud.delete_user(session, user.id)
            else:
                row = await session.get(User, user.id)
                row.name = "The other writer"

    async with make_session_maker(engine)() as session:
        fired = []

        @event.listens_for(session.sync_session, "before_flush")
        def interleave(*_: Any) -> None:
            if not fired:  # once, inside the flush that sends the guarded UPDATE
                fired.append(True)
                await_only(write_meanwhile())

        if meanwhile == "deleted":
            assert (
                await crud.update_user(session, user.id, {"name": "X"}, expected_version=1) is None
            )
        else:
            with pytest.raises(crud.VersionConflictError) as conflict:
                await crud.update_user(session, user.id, {"name": "X"}, expected_version=1)
            assert conflict.value.current == 2
    assert fired
    after = await stored(engine, user.id)
    assert after is None if meanwhile == "deleted" else after.name == "The other writer"


# -- ETag and If-Match -------------------------------------------------------------------


def test_etag_is_strong_and_names_user_and_version() -> None:
    assert locking.etag(User(id=5, name="A", email="a@x.io", version=3)) == '"user-5-v3"'


@pytest.mark.parametrize(
    ("value", "versions"),
    [
        ("*", None),
        (" * ", None),
        ('"user-5-v3"', {3}),
        ('"a", "user-5-v3" ,, "user-5-v4"', {3, 4}),
        ('W/"user-5-v3"', set()),  # weak: never matches If-Match
        ('"user-6-v3"', set()),  # another user's
        ('"user-05-v3"', set()),
        ('"user-5-v99999999999999999999999"', set()),  # not a version we can hold
        ("", set()),
        (" , ,", set()),
        ('"é"', set()),
        ('""', set()),
    ],
)
def test_parse_if_match(value: str, versions: set[int] | None) -> None:
    assert locking.parse_if_match(value).versions(User, 5) == versions


@pytest.mark.parametrize(
    "value",
    [
        "user-5-v3",  # unquoted
        'w/"user-5-v3"',  # W/ is case-sensitive
        '*, "user-5-v3"',  # * stands alone
        '"user-5-v3',  # unterminated
        '"a" "b"',  # no comma
        '"a"b',
        '"a"\x00',
        '"a\x01"',
        'é"a"',
        "x" * 100_000,
    ],
)
def test_a_malformed_if_match_is_refused(value: str) -> None:
    with pytest.raises(locking.InvalidIfMatchError):
        locking.parse_if_match(value)


async def test_get_gives_the_etag_and_patch_checks_it(client) -> None:
    ada = (await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})).json()
    url = f"/users/{ada['id']}"
    read = await client.get(url)
    assert read.headers["ETag"] == f'"user-{ada["id"]}-v1"'
    first = await client.patch(url, json={"name": "A"}, headers={"If-Match": read.headers["ETag"]})
    assert first.status_code == 200
    assert (
        first.headers["ETag"] == f'"user-{ada["id"]}-v2"' == (await client.get(url)).headers["ETag"]
    )
    assert first.json()["version"] == 2
    stale = await client.patch(url, json={"name": "B"}, headers={"If-Match": read.headers["ETag"]})
    assert stale.status_code == 412
    assert "version 2" in stale.json()["detail"]
    assert (await client.get(url)).json()["name"] == "A"
    # *: any current version; no If-Match: the last write wins, as before.
    assert (
        await client.patch(url, json={"name": "C"}, headers={"If-Match": "*"})
    ).status_code == 200
    last = await client.patch(url, json={"name": "D"})
    assert last.status_code == 200 and last.headers["ETag"] == f'"user-{ada["id"]}-v4"'


async def test_a_delete_with_if_match_deletes_only_the_version_read(client) -> None:
    ada = (await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})).json()
    url = f"/users/{ada['id']}"
    read = (await client.get(url)).headers["ETag"]
    assert (await client.patch(url, json={"name": "A"})).status_code == 200  # someone else
    stale = await client.delete(url, headers={"If-Match": read})
    assert stale.status_code == 412 and "version 2" in stale.json()["detail"]
    assert (await client.get(url)).json()["name"] == "A"  # the change it had not seen: kept
    assert (await client.delete(url, headers={"If-Match": "user-1-v2"})).status_code == 400
    current = (await client.get(url)).headers["ETag"]
    assert (await client.delete(url, headers={"If-Match": current})).status_code == 200
    assert (await client.delete(url, headers={"If-Match": current})).status_code == 404
    bob = (await client.post("/users/", json={"name": "Bob", "email": "bob@example.com"})).json()
    deleted = await client.delete(f"/users/{bob['id']}", headers={"If-Match": "*"})
    assert deleted.status_code == 200


async def test_delete_user_with_an_expected_version(engine) -> None:
    user = await new_user(engine)
    async with make_session_maker(engine)() as session:
        with pytest.raises(crud.VersionConflictError) as refused:
            await crud.delete_user(session, user.id, expected_version=7)
        assert refused.value.current == 1
        assert await stored(engine, user.id) is not None
        assert await crud.delete_user(session, user.id, expected_version={1, 2})
        assert not await crud.delete_user(session, user.id, expected_version=1)  # gone: False


async def test_racing_conditional_deletes_and_patches_one_wins(live_client, engine) -> None:
    for round_ in range(ROUNDS):
        user = await new_user(engine, f"race{round_}@example.com")
        url = f"/users/{user.id}"
        tag = {"If-Match": (await live_client.get(url)).headers["ETag"]}
        writes = [live_client.delete(url, headers=tag) for _ in range(3)]
        writes += [live_client.patch(url, json={"name": f"w{i}"}, headers=tag) for i in range(3)]
        answers = await asyncio.wait_for(asyncio.gather(*writes), TIMEOUT)
        codes = [a.status_code for a in answers]
        assert codes.count(200) == 1 and set(codes) <= {200, 404, 412}, [a.text for a in answers]
        after = await stored(engine, user.id)
        if codes.index(200) < 3:  # a delete won: the user is gone
            assert after is None
        else:  # a patch won: stored as it wrote it, one version up
            assert (after.name, after.version) == (answers[codes.index(200)].json()["name"], 2)


async def test_clients_cannot_set_the_version(client) -> None:
    body = {"name": "Ada", "email": "ada@example.com", "version": 7}
    assert (await client.post("/users/", json=body)).status_code == 422
    ada = (await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})).json()
    assert (await client.patch(f"/users/{ada['id']}", json={"version": 99})).status_code == 422
    assert (await client.get(f"/users/{ada['id']}")).json()["version"] == 1


async def test_a_user_that_does_not_exist_is_404_whatever_if_match_says(client) -> None:
    for value in ["*", '"user-999999-v1"', '"anything"', ""]:
        answer = await client.patch(
            "/users/999999", json={"name": "A"}, headers={"If-Match": value}
        )
        assert answer.status_code == 404, value


def hostile_if_match(user_id: int) -> list[tuple[Any, int]]:
    """(If-Match value, the answer it must get) for a user at version 1."""
    ours = f'"user-{user_id}-v1"'
    return [
        ("", 412),
        (" , ,", 412),
        ('"a", "b"', 412),
        (f'"a", {ours}', 200),
        (f"W/{ours}", 412),
        (f"w/{ours}", 400),
        (ours.strip('"'), 400),
        (f"*, {ours}", 400),
        ('"' + "x" * 100_000 + '"', 412),
        ("x" * 100_000, 400),
        (", ".join(['"a"'] * 10_000), 412),
        ('"é"'.encode(), 412),  # UTF-8 bytes: obs-text, allowed inside the quotes
        ("é".encode(), 400),
        ('"\U0001f600"'.encode(), 412),
        (b'"a\x7f"', 400),
        ('"a"\t,\t"b"', 412),
        (f'"user-{user_id}-v01"', 412),
        (f'"user-{user_id}-v{"9" * 5000}"', 412),
        (f'"user-{user_id + 1}-v1"', 412),
    ]


@pytest.mark.parametrize("case", range(len(hostile_if_match(1))))
async def test_hostile_if_match_is_a_4xx_and_changes_nothing(client, case: int) -> None:
    ada = (await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})).json()
    value, expected = hostile_if_match(ada["id"])[case]
    url = f"/users/{ada['id']}"
    answer = await client.patch(url, json={"name": "Changed"}, headers={"If-Match": value})
    assert answer.status_code == expected, answer.text
    after = (await client.get(url)).json()
    if expected == 200:
        assert after["name"] == "Changed" and after["version"] == 2
    else:
        assert isinstance(answer.json()["detail"], str)
        assert after == ada


async def test_several_if_match_lines_are_one_list(client) -> None:
    ada = (await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})).json()
    headers = [("If-Match", '"stale"'), ("If-Match", f'"user-{ada["id"]}-v1"')]
    answer = await client.patch(f"/users/{ada['id']}", json={"name": "A"}, headers=headers)
    assert answer.status_code == 200


async def test_an_app_can_require_if_match(database_url, engine) -> None:
    app = create_app(database_url, require_if_match=True)
    sessions = make_session_maker(engine)

    async def real_session() -> Any:
        async with sessions() as session:
            yield session

    try:
        async with _client_for(app, real_session) as client:
            ada = await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})
            url = f"/users/{ada.json()['id']}"
            refused = await client.patch(url, json={"name": "A"})
            assert refused.status_code == 428
            assert "If-Match" in refused.json()["detail"]
            assert (await client.get(url)).json()["name"] == "Ada"
            etag = (await client.get(url)).headers["ETag"]
            assert (
                await client.patch(url, json={"name": "A"}, headers={"If-Match": etag})
            ).status_code == 200
            assert (
                await client.patch(url, json={"name": "B"}, headers={"If-Match": "*"})
            ).status_code == 200
            assert (await client.delete(url)).status_code == 428  # a DELETE is a write too
            assert (await client.delete(url, headers={"If-Match": "*"})).status_code == 200
    finally:
        await app.state.engine.dispose()


# -- Racing writers: exactly one wins, its write is what is stored ----------------------


async def test_racing_patches_with_the_same_etag_one_wins(live_client, engine) -> None:
    for round_ in range(ROUNDS):
        user = await new_user(engine, f"race{round_}@example.com")
        url = f"/users/{user.id}"
        etag = (await live_client.get(url)).headers["ETag"]

        async def patch(i: int, url: str = url, etag: str = etag) -> httpx.Response:
            return await live_client.patch(
                url, json={"name": f"writer {i}"}, headers={"If-Match": etag}
            )

        answers = await asyncio.wait_for(asyncio.gather(*map(patch, range(WRITERS))), TIMEOUT)
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] + [412] * (WRITERS - 1), [a.text for a in answers]
        (winner,) = [a.json() for a in answers if a.status_code == 200]
        after = await stored(engine, user.id)
        assert (
            (after.name, after.version)
            == (winner["name"], 2)
            == (winner["name"], winner["version"])
        )


async def test_racing_conditional_updates_one_wins(engine) -> None:
    for round_ in range(ROUNDS):
        user = await new_user(engine, f"race{round_}@example.com")

        async def write(i: int, user_id: int = user.id) -> Any:
            try:
                return await crud_update(
                    engine, user_id, {"name": f"writer {i}"}, expected_version=1
                )
            except crud.VersionConflictError as conflict:
                return conflict

        answers = await asyncio.wait_for(asyncio.gather(*map(write, range(WRITERS))), TIMEOUT)
        winners = [a for a in answers if isinstance(a, User)]
        assert len(winners) == 1, answers
        assert all(
            isinstance(a, crud.VersionConflictError) and a.current == 2
            for a in answers
            if a not in winners
        )
        after = await stored(engine, user.id)
        assert (after.name, after.version) == (winners[0].name, 2)


async def test_a_conditional_patch_racing_a_delete_is_200_or_404(live_client, engine) -> None:
    for round_ in range(ROUNDS):
        user = await new_user(engine, f"race{round_}@example.com")
        url = f"/users/{user.id}"
        etag = (await live_client.get(url)).headers["ETag"]
        patches = [
            live_client.patch(url, json={"name": f"w{i}"}, headers={"If-Match": etag})
            for i in range(3)
        ]
        answers = await asyncio.wait_for(asyncio.gather(live_client.delete(url), *patches), TIMEOUT)
        assert answers[0].status_code == 200
        codes = [a.status_code for a in answers[1:]]
        assert set(codes) <= {200, 404, 412} and codes.count(200) <= 1, [a.text for a in answers]
        assert await stored(engine, user.id) is None


async def test_the_tour_step_shows_one_winner(engine) -> None:
    lines = await dict(TOUR_STEPS)["Optimistic locking"](engine)
    etag = lines[0].split()[3].rstrip(";")
    assert re.fullmatch(r'"user-\d+-v1"', etag), lines
    assert lines[0].endswith("1 applied (200), 9 refused (412)"), lines
    assert lines[1].endswith("version 2 (the winner)"), lines
