import asyncio
import random
from decimal import Decimal

import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import col, func, select

from asyncpatterns import crud
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import Account, Profile, User
from asyncpatterns.transactions import (
    AccountNotFoundError,
    InsufficientFundsError,
    complex_operation,
    is_retryable,
    run_in_transaction,
    transfer_funds,
)

START = Decimal("100.00")


async def open_accounts(engine, count: int = 10, balance: Decimal = START) -> None:
    async with make_session_maker(engine)() as session:
        await session.exec(delete(Account))
        session.add_all(
            Account(id=i, owner=f"Owner {i}", balance=balance) for i in range(1, count + 1)
        )
        await session.commit()


async def balances(engine) -> dict[int, Decimal]:
    async with make_session_maker(engine)() as session:
        return dict((await session.exec(select(Account.id, Account.balance))).all())


async def transfer(engine, from_id: int, to_id: int, amount) -> None:
    async with make_session_maker(engine)() as session:
        await transfer_funds(session, from_id, to_id, amount)


# --- single transfers ---------------------------------------------------------


async def test_transfer_moves_the_exact_amount(engine) -> None:
    await open_accounts(engine, 2, Decimal("0.30"))
    for _ in range(3):
        await transfer(engine, 1, 2, Decimal("0.10"))  # float arithmetic refuses the third
    assert await balances(engine) == {1: Decimal("0.00"), 2: Decimal("0.60")}


async def test_large_amounts_are_exact_on_every_backend(engine) -> None:
    await open_accounts(engine, 2, Decimal("1234567.89"))  # MariaDB FLOAT: 1234570.0
    await transfer(engine, 2, 1, Decimal("0.01"))
    assert await balances(engine) == {1: Decimal("1234567.90"), 2: Decimal("1234567.88")}


@pytest.mark.parametrize("amount", [Decimal("0"), Decimal("-0.01"), Decimal("-430"), 0, -5])
async def test_amounts_of_zero_or_less_are_refused(engine, amount) -> None:
    await open_accounts(engine, 2)
    with pytest.raises(ValueError, match="must be positive"):
        await transfer(engine, 1, 2, amount)
    assert await balances(engine) == {1: START, 2: START}


async def test_floats_and_fractions_of_a_cent_are_refused(engine) -> None:
    await open_accounts(engine, 2)
    with pytest.raises(TypeError, match="float"):
        await transfer(engine, 1, 2, 0.1)
    with pytest.raises(ValueError, match="whole number of cents"):
        await transfer(engine, 1, 2, Decimal("0.001"))
    assert await balances(engine) == {1: START, 2: START}


async def test_a_transfer_to_the_same_account_is_refused(engine) -> None:
    await open_accounts(engine, 1)
    with pytest.raises(ValueError, match="itself"):
        await transfer(engine, 1, 1, Decimal("1.00"))
    assert await balances(engine) == {1: START}


@pytest.mark.parametrize(("from_id", "to_id", "missing"), [(1, 99, 99), (99, 1, 99), (2, 0, 0)])
async def test_unknown_accounts_raise_and_change_nothing(engine, from_id, to_id, missing) -> None:
    await open_accounts(engine, 2)
    with pytest.raises(AccountNotFoundError) as caught:
        await transfer(engine, from_id, to_id, Decimal("5.00"))
    assert caught.value.account_id == missing
    assert isinstance(caught.value, ValueError)
    assert await balances(engine) == {1: START, 2: START}


@pytest.mark.parametrize(("from_id", "to_id"), [(1, 2), (2, 1)])
async def test_insufficient_funds_raise_and_change_nothing(engine, from_id, to_id) -> None:
    await open_accounts(engine, 2)
    with pytest.raises(InsufficientFundsError, match="Insufficient funds"):
        await transfer(engine, from_id, to_id, Decimal("100.01"))
    assert await balances(engine) == {1: START, 2: START}
    await transfer(engine, from_id, to_id, Decimal("100.00"))  # the whole balance is fine
    assert await balances(engine) == {from_id: Decimal("0.00"), to_id: Decimal("200.00")}


async def test_transfer_works_on_a_session_that_already_ran_a_query(engine) -> None:
    # The common transfer's session.begin() raised "A transaction is already begun".
    await open_accounts(engine, 2)
    async with make_session_maker(engine)() as session:
        await session.exec(select(Account).where(Account.id == 1))
        assert session.in_transaction()
        await transfer_funds(session, 1, 2, Decimal("30.00"))
        with pytest.raises(InsufficientFundsError):
            await transfer_funds(session, 1, 2, Decimal("70.01"))
        await transfer_funds(session, 2, 1, 5)  # the session is still usable
    assert await balances(engine) == {1: Decimal("75.00"), 2: Decimal("125.00")}


async def test_transfer_in_the_rolled_back_test_session(session) -> None:
    session.add_all([Account(id=1, owner="A", balance=START), Account(id=2, owner="B")])
    await session.commit()  # the fixture's commit only releases a savepoint
    await transfer_funds(session, 1, 2, Decimal("12.34"))
    rows = (await session.exec(select(Account.balance).order_by(Account.id))).all()
    assert rows == [Decimal("87.66"), Decimal("12.34")]


# --- concurrency --------------------------------------------------------------


async def test_500_concurrent_transfers_never_lose_money(engine) -> None:
    accounts, expected = 10, START * 10
    rng = random.Random(11)
    for _ in range(3):
        await open_accounts(engine, accounts)
        plan = [
            (*rng.sample(range(1, accounts + 1), 2), Decimal(rng.randint(1, 4000)) / 100)
            for _ in range(500)
        ]
        results = await asyncio.gather(
            *(transfer(engine, *step) for step in plan), return_exceptions=True
        )
        unexpected = [r for r in results if r and not isinstance(r, InsufficientFundsError)]
        assert unexpected == []
        assert results.count(None) > 250  # most transfers went through
        final = await balances(engine)
        assert sum(final.values()) == expected
        assert min(final.values()) >= 0


# --- the retry helper under real conflicts --------------------------------------


def _debit(account_id: int, amount: str):
    return (
        update(Account)
        .where(col(Account.id) == account_id)
        .values(balance=Account.balance - Decimal(amount))
    )


async def test_retry_reruns_the_transaction_after_a_deadlock(engine, backend) -> None:
    if backend == "sqlite":
        pytest.skip("a single writer cannot deadlock; the stale-read test covers SQLite")
    await open_accounts(engine, 4)
    session_maker = make_session_maker(engine)
    other_holds, mine_holds = asyncio.Event(), asyncio.Event()
    errors: list[DBAPIError] = []

    async def other() -> None:  # locks 2, 3, 4, then wants 1: the heavier transaction
        async with session_maker() as session, session.begin():
            for account_id in (2, 3, 4):
                await session.exec(_debit(account_id, "1.00"))
            other_holds.set()
            await mine_holds.wait()
            await asyncio.sleep(0.3)  # let the first attempt wait on row 2 first
            await session.exec(_debit(1, "1.00"))

    async def work(session) -> None:  # locks 1, then wants 2: a lock cycle
        try:
            await session.exec(_debit(1, "10.00"))
            mine_holds.set()
            await other_holds.wait()
            await session.exec(_debit(2, "10.00"))
        except DBAPIError as exc:
            errors.append(exc)
            raise

    async def mine() -> None:
        async with session_maker() as session:
            await run_in_transaction(session, work)

    other_task = asyncio.create_task(other())
    await other_holds.wait()
    await mine()
    await other_task
    assert len(errors) == 1 and is_retryable(errors[0])  # deadlock on the first attempt only
    expected_code = "40P01" if backend == "postgresql" else 1213
    assert expected_code in (getattr(errors[0].orig, "sqlstate", None), errors[0].orig.args[0])
    assert await balances(engine) == {
        1: Decimal("89.00"),
        2: Decimal("89.00"),
        3: Decimal("99.00"),
        4: Decimal("99.00"),
    }


NO_STALE_READ_ON_SQLITE = (
    "run_in_transaction begins with SQLite's write lock (BEGIN IMMEDIATE): no writer can "
    "commit between its read and its write; test_sqlite_writers_wait_their_turn covers it"
)


async def _stale_write(engine, session, attempts_seen: list[int], conflicts: int) -> None:
    """Read a balance, let another session commit a change to it, then write."""
    attempts_seen.append(len(attempts_seen) + 1)
    if engine.dialect.name == "postgresql":
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    await session.exec(select(Account.balance).where(Account.id == 1))
    if len(attempts_seen) <= conflicts:
        async with make_session_maker(engine)() as other, other.begin():
            await other.exec(_debit(1, "1.00"))
    await session.exec(_debit(1, "10.00"))


async def test_retry_reruns_the_transaction_after_a_stale_read(engine, backend) -> None:
    if backend == "mysql":
        pytest.skip("InnoDB's repeatable read writes the latest row: the deadlock test covers it")
    if backend == "sqlite":
        pytest.skip(NO_STALE_READ_ON_SQLITE)
    await open_accounts(engine, 1)
    attempts: list[int] = []
    async with make_session_maker(engine)() as session:
        await run_in_transaction(session, lambda s: _stale_write(engine, s, attempts, conflicts=2))
    assert attempts == [1, 2, 3]
    assert await balances(engine) == {1: Decimal("88.00")}  # two others, then ours once


async def test_retry_gives_up_after_the_given_attempts(engine, backend) -> None:
    if backend == "mysql":
        pytest.skip("InnoDB's repeatable read writes the latest row: no conflict to force")
    if backend == "sqlite":
        pytest.skip(NO_STALE_READ_ON_SQLITE)
    await open_accounts(engine, 1)
    attempts: list[int] = []
    async with make_session_maker(engine)() as session:
        with pytest.raises(DBAPIError) as caught:
            await run_in_transaction(
                session, lambda s: _stale_write(engine, s, attempts, conflicts=9), attempts=3
            )
    assert is_retryable(caught.value)
    assert attempts == [1, 2, 3]
    assert await balances(engine) == {1: Decimal("97.00")}  # only the others' writes


async def test_other_errors_are_raised_at_once_and_rolled_back(engine) -> None:
    await open_accounts(engine, 1)
    attempts: list[int] = []

    async def work(session) -> None:
        attempts.append(1)
        await session.exec(_debit(1, "10.00"))
        session.add(Account(id=1, owner="Duplicate"))
        await session.flush()

    async with make_session_maker(engine)() as session:
        with pytest.raises(IntegrityError) as caught:
            await run_in_transaction(session, work)
    assert not is_retryable(caught.value)
    assert attempts == [1]
    assert await balances(engine) == {1: START}


# --- savepoints: complex_operation ---------------------------------------------


async def count_rows(engine, model) -> int:
    async with make_session_maker(engine)() as session:
        return (await session.exec(select(func.count()).select_from(model))).one()


async def users_and_bios(engine) -> list[tuple[str, str | None]]:
    async with make_session_maker(engine)() as session:
        statement = select(User.email, Profile.bio).outerjoin(Profile).order_by(User.id)
        return list((await session.exec(statement)).all())


async def test_complex_operation_stores_the_user_and_the_profile(engine) -> None:
    async with make_session_maker(engine)() as session:
        user = User(name="Test", email="test@example.com")
        assert await complex_operation(session, user, "Hello")
        assert user.id is not None
    assert await users_and_bios(engine) == [("test@example.com", "Hello")]


async def test_a_failing_inner_step_rolls_back_only_its_savepoint(engine) -> None:
    async with make_session_maker(engine)() as session:
        user = User(name="A", email="a@example.com")
        assert await complex_operation(session, user, "first")
        # the same user again: the profile's INSERT fails (one per user), alone
        assert not await complex_operation(session, user, "second")
        assert user.id is not None and user.name == "A"  # still loaded, no lazy load
    assert await users_and_bios(engine) == [("a@example.com", "first")]
    assert await count_rows(engine, Profile) == 1


async def test_a_failing_outer_step_is_raised_and_nothing_is_committed(engine) -> None:
    async with make_session_maker(engine)() as session:
        await complex_operation(session, User(name="A", email="a@example.com"), "First")
        duplicate = User(name="B", email="a@example.com")
        with pytest.raises(IntegrityError):  # the common version swallowed it
            await complex_operation(session, duplicate, "Never stored")
        # the session is usable again
        assert await complex_operation(session, User(name="C", email="c@example.com"), "Third")
    assert await users_and_bios(engine) == [("a@example.com", "First"), ("c@example.com", "Third")]


async def test_complex_operation_on_a_session_that_already_ran_a_query(engine) -> None:
    # The common version's session.begin() raised "A transaction is already begun".
    async with make_session_maker(engine)() as session:
        await session.exec(select(User))
        assert session.in_transaction()
        assert await complex_operation(session, User(name="T", email="t@example.com"), "T")
        assert not session.in_transaction()
    assert await users_and_bios(engine) == [("t@example.com", "T")]


# --- isolation levels -----------------------------------------------------------


async def _current_level(session) -> str:
    connection = await session.connection()
    return await connection.run_sync(lambda sync_connection: sync_connection.get_isolation_level())


async def test_isolation_level_per_transaction(engine, backend) -> None:
    if backend == "sqlite":
        # Always serializable; setting a level would hand BEGIN back to the sqlite3 module.
        async with make_session_maker(engine)() as session:
            assert await _current_level(session) == "SERIALIZABLE"
        return
    level = "SERIALIZABLE"
    async with make_session_maker(engine)() as session:
        await session.connection(execution_options={"isolation_level": level})
        assert await _current_level(session) == level
        await session.commit()
        # the connection went back to the pool reset to the engine's default
        assert await _current_level(session) != level


async def test_repeatable_read_keeps_the_first_snapshot_on_postgresql(engine, backend) -> None:
    if backend != "postgresql":
        pytest.skip("the PostgreSQL isolation demo")
    session_maker = make_session_maker(engine)
    seen = {}
    for level in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"):
        await open_accounts(engine, 1)
        async with session_maker() as reader:
            await reader.connection(execution_options={"isolation_level": level})
            query = select(Account.balance).where(Account.id == 1)
            first = (await reader.exec(query)).one()
            await debit_in_another_session(session_maker)
            second = (await reader.exec(query)).one()
            try:
                await reader.exec(_debit(1, "1.00"))
                outcome = "written"
            except DBAPIError as exc:
                outcome = exc.orig.sqlstate
        seen[level] = (first, second, outcome)
    assert seen == {
        "READ COMMITTED": (START, Decimal("70.00"), "written"),
        "REPEATABLE READ": (START, START, "40001"),
        "SERIALIZABLE": (START, START, "40001"),
    }


async def debit_in_another_session(session_maker) -> None:
    async with session_maker() as session, session.begin():
        await session.exec(_debit(1, "30.00"))


async def test_complex_operation_keeps_the_common_signature(session) -> None:
    assert await complex_operation(session) is True
    user = await crud.get_user_by_email(session, "test@example.com")
    profile = (await session.exec(select(Profile).where(Profile.user_id == user.id))).one()
    assert (user.name, profile.bio) == ("Test", "Test")
