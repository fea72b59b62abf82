"""Whoever begins a transaction ends it; SQLite writers wait their turn; locks time out.

``db.run_in_transaction`` is what every writer of the kit goes through. Each
rule is tested through the public writers, the way a caller meets it.
"""

import asyncio
import time
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from asyncpatterns import crud, relationships, transactions
from asyncpatterns.db import (
    TransactionOwnershipError,
    is_lock_timeout,
    is_retryable,
    make_engine,
    make_session_maker,
    run_in_transaction,
    session_scope,
)
from asyncpatterns.models import Account, Team, User


async def emails(engine) -> list[str]:
    async with make_session_maker(engine)() as session:
        return list((await session.exec(select(User.email).order_by(User.id))).all())


async def balances(engine) -> list[Decimal]:
    async with make_session_maker(engine)() as session:
        return list((await session.exec(select(Account.balance).order_by(Account.id))).all())


async def open_two_accounts(engine) -> tuple[int, int]:
    async with make_session_maker(engine)() as session:
        ada = await transactions.open_account(session, "Ada", Decimal("10.00"))
        bob = await transactions.open_account(session, "Bob", Decimal("0.00"))
    return ada.id, bob.id


# -- The caller's changes are never committed by someone else --------------------------


async def test_a_failed_transfer_does_not_commit_what_the_caller_added(engine) -> None:
    ada, bob = await open_two_accounts(engine)
    async with make_session_maker(engine)() as session:
        session.add(User(name="Pending", email="pending@example.com"))
        with pytest.raises(TransactionOwnershipError, match="commit or roll back first"):
            await transactions.transfer_funds(session, ada, bob, Decimal("99.00"))
        with pytest.raises(TransactionOwnershipError):  # flushed is still uncommitted
            await session.flush()
            await transactions.transfer_funds(session, ada, bob, Decimal("1.00"))
    assert await emails(engine) == []
    assert await balances(engine) == [Decimal("10.00"), Decimal("0.00")]


@pytest.mark.parametrize("outcome", ["refused", "raised later"])
async def test_session_scope_rolls_back_everything_inside_it(engine, outcome) -> None:
    ada, bob = await open_two_accounts(engine)
    session_maker = make_session_maker(engine)
    with pytest.raises((transactions.InsufficientFundsError, RuntimeError)):
        async with session_scope(session_maker) as session:
            session.add(User(name="Pending", email="pending@example.com"))
            amount = Decimal("99.00") if outcome == "refused" else Decimal("1.00")
            await transactions.transfer_funds(session, ada, bob, amount)  # joins: no commit
            raise RuntimeError("the caller fails after the transfer")
    assert await emails(engine) == []
    assert await balances(engine) == [Decimal("10.00"), Decimal("0.00")]


async def test_session_maker_begin_is_joined_and_committed_once(engine) -> None:
    ada, bob = await open_two_accounts(engine)
    session_maker = make_session_maker(engine)
    async with session_maker.begin() as session:  # SQLAlchemy's standard idiom
        await transactions.transfer_funds(session, ada, bob, Decimal("3.00"))
        user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
        with pytest.raises(transactions.InsufficientFundsError):  # undoes only itself
            await transactions.transfer_funds(session, ada, bob, Decimal("50.00"))
        await crud.update_user(session, user.id, {"name": "Ada L."})
        assert session.in_transaction()  # nothing committed yet: the caller will
    assert await balances(engine) == [Decimal("7.00"), Decimal("3.00")]
    assert await emails(engine) == ["ada@example.com"]


WRITERS = {
    "create_user": lambda s, ids: crud.create_user(s, User(name="N", email="new@example.com")),
    "create_users": lambda s, ids: crud.create_users(s, [User(name="N", email="n@example.com")]),
    "update_user": lambda s, ids: crud.update_user(s, ids["user"], {"name": "Changed"}),
    "deactivate_users": lambda s, ids: crud.deactivate_users(s, [ids["user"]]),
    "delete_user": lambda s, ids: crud.delete_user(s, ids["user"]),
    "create_team": lambda s, ids: relationships.create_team(s, "New team"),
    "move_member": lambda s, ids: relationships.move_member(s, ids["user"], None),
    "delete_team": lambda s, ids: relationships.delete_team(s, ids["team"]),
    "transfer_funds": lambda s, ids: transactions.transfer_funds(s, ids["ada"], ids["bob"], 1),
    "open_account": lambda s, ids: transactions.open_account(s, "Eve", 1),
    "complex_operation": lambda s, ids: transactions.complex_operation(s),
}


async def snapshot(engine) -> str:
    async with make_session_maker(engine)() as session:
        rows = [
            (await session.exec(select(User.id, User.name, User.is_active, User.team_id))).all(),
            (await session.exec(select(Team.id, Team.name))).all(),
            (await session.exec(select(Account.id, Account.balance))).all(),
        ]
    return repr(rows)


async def writer_fixture(engine) -> dict[str, int]:
    ada, bob = await open_two_accounts(engine)
    async with make_session_maker(engine)() as session:
        team = await relationships.create_team(session, "Team")
        user = User(name="Old", email="old@example.com", team_id=team.id)
        await crud.create_user(session, user)
    return {"ada": ada, "bob": bob, "team": team.id, "user": user.id}


@pytest.mark.parametrize("writer", WRITERS)
async def test_every_writer_commits_alone_and_joins_a_callers_transaction(engine, writer):
    ids = await writer_fixture(engine)
    before = await snapshot(engine)
    session_maker = make_session_maker(engine)
    async with session_maker() as session:  # the caller began it, then changes its mind
        await session.begin()
        await WRITERS[writer](session, ids)
        await session.rollback()
    assert await snapshot(engine) == before  # joined: nothing committed behind the caller
    async with session_maker() as session:
        await session.exec(select(User))  # a request session that has read: just works
        await WRITERS[writer](session, ids)
    assert await snapshot(engine) != before  # owned: committed


async def test_a_joined_writer_is_not_retried_the_owner_retries(engine) -> None:
    attempts: list[int] = []

    async def deadlocked(session) -> None:
        attempts.append(1)
        raise DBAPIError("UPDATE", {}, _FakeDeadlock(), connection_invalidated=False)

    async with make_session_maker(engine)() as session:
        async with session.begin():
            with pytest.raises(DBAPIError):
                await run_in_transaction(session, deadlocked)
        assert attempts == [1]  # joined: raised at once, for the owner to retry
        with pytest.raises(DBAPIError):
            await run_in_transaction(session, deadlocked, attempts=3, backoff=0)
        assert attempts == [1, 1, 1, 1]  # owned: retried


class _FakeDeadlock(Exception):
    """Looks like PostgreSQL's deadlock_detected to the classifier."""

    __module__ = "sqlalchemy.dialects.postgresql.asyncpg"
    sqlstate = "40P01"


async def test_retries_are_decided_by_error_code_not_message(engine, backend) -> None:
    # A duplicate whose *value* reads "database is locked" is a duplicate, not busy.
    async with make_session_maker(engine)() as session:
        await crud.create_user(session, User(name="A", email="database is locked"))
        with pytest.raises(crud.DuplicateEmailError) as caught:
            await crud.create_user(session, User(name="B", email="database is locked"))
    assert not is_retryable(caught.value.__context__)


async def test_writers_work_with_expire_on_commit_sessions(engine) -> None:
    # SQLAlchemy's default: every attribute is expired at commit. The common
    # pattern refreshes after commit; the kit's writers must work either way.
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlmodel.ext.asyncio.session import AsyncSession

    session_maker = async_sessionmaker(engine, class_=AsyncSession)  # expire_on_commit=True
    async with session_maker() as session:
        # Each returned object is read right after its call: a later commit
        # expires it again (that is what expire_on_commit=True asks for).
        user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
        user_id = user.id
        assert (user.name, user.email) == ("Ada", "ada@example.com")
        updated = await crud.update_user(session, user_id, {"name": "Ada L."})
        assert updated.name == "Ada L."
        many = await crud.create_users(
            session, [User(name="B", email="b@example.com"), User(name="C", email="c@x.io")]
        )  # several objects: reloaded with one SELECT, not one each
        assert [(u.id is not None, u.email) for u in many] == [
            (True, "b@example.com"),
            (True, "c@x.io"),
        ]
        team = await relationships.create_team(session, "T")
        team_id = team.id
        moved = await relationships.move_member(session, user_id, team_id)
        assert (moved.name, moved.team.name) == ("Ada L.", "T")
        account = await transactions.open_account(session, "A", 5)
        assert account.balance == Decimal("5.00")
        crew = await relationships.create_team_with_members(
            session, "Crew", [User(name="D", email="d@example.com")]
        )
        assert [m.email for m in crew.members] == ["d@example.com"]


# -- SQLite: writers wait their turn, readers never wait ------------------------------


async def test_sqlite_writers_wait_their_turn(engine, backend) -> None:
    # Each writer reads first (update_user loads the user), then writes: on
    # SQLite that failed at once with "database is locked" unless the write
    # lock is taken when the transaction begins.
    async with make_session_maker(engine)() as session:
        users = await crud.create_users(
            session, [User(name=f"U{i}", email=f"u{i}@example.com") for i in range(20)]
        )
    session_maker = make_session_maker(engine)

    async def rename(user_id: int) -> None:
        async with session_maker() as session:
            await crud.get_user(session, user_id)  # a request session that read first
            await crud.update_user(session, user_id, {"name": f"Renamed {user_id}"})

    await asyncio.gather(*(rename(u.id) for u in users))
    async with session_maker() as session:
        names = {u.name for u in await crud.get_users(session)}
    assert names == {f"Renamed {u.id}" for u in users}


async def test_sqlite_readers_do_not_wait_for_a_writer(engine, backend) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as writer, writer.begin():
        await crud.create_user(writer, User(name="W", email="w@example.com"))  # holds the lock
        started = time.perf_counter()
        async with session_maker() as reader:
            assert await crud.count_users(reader) == 0  # the writer has not committed
        assert time.perf_counter() - started < 1.0


# -- Lock timeouts: nobody waits forever ---------------------------------------------------


async def test_a_writer_gives_up_after_the_lock_timeout(database_url, engine) -> None:
    # `engine` for its cleanup; this one has a short lock timeout (MySQL counts whole seconds)
    short = make_engine(database_url, lock_timeout=1)
    lock_row = text("UPDATE account SET owner = :owner WHERE id = :id")
    try:
        async with make_session_maker(short)() as setup:
            account = await transactions.open_account(setup, "Ada", 10)
        session_maker = make_session_maker(short)
        async with session_maker() as holder, holder.begin():
            await holder.exec(lock_row, params={"owner": "holder", "id": account.id})
            started = time.perf_counter()
            async with session_maker() as waiter:
                with pytest.raises(DBAPIError) as caught:
                    await run_in_transaction(
                        waiter, lambda s: s.exec(lock_row, params={"owner": "w", "id": account.id})
                    )
            waited = time.perf_counter() - started
    finally:
        await short.dispose()
    assert is_lock_timeout(caught.value) and not is_retryable(caught.value)
    assert 0.8 < waited < 3.0
