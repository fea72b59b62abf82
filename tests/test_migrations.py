"""Migrations agree with the models, go up and down, keep data, and take turns.

The tests run on each configured backend, in throw-away databases of their own.

"Agree" is checked twice: Alembic's autogenerate comparison (``migrations.check``,
the check that fails CI when a model changes without a revision), and a direct
comparison of what the database reports for a ``create_all`` schema and a migrated
one, for what autogenerate does not compare: collations and charsets (MySQL),
CHECK constraints, table options, SQLite's AUTOINCREMENT (and, once more, columns,
indexes and foreign keys with their ON DELETE actions, as each backend reports them).
"""

import asyncio
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, closing
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

from asyncpatterns import migrations
from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import create_db_and_tables, error_code, make_engine, throwaway_database
from asyncpatterns.migrations.adopt import schema_differences
from asyncpatterns.migrations.catalog import schema
from asyncpatterns.testing import SERVER_URL_VARIABLES, required_backends

ROOT = Path(__file__).parent.parent
WAIT = 30  # seconds: the bound on every subprocess and wait below
# Every revision, oldest first: what `upgrade head` applies to an empty database.
REVISIONS = [
    script.revision
    for script in reversed(
        list(ScriptDirectory.from_config(migrations.alembic_config()).walk_revisions())
    )
]

NewDatabase = Callable[[], Awaitable[URL]]


@pytest_asyncio.fixture(loop_scope="session")
async def new_database(backend: str, tmp_path: Path) -> AsyncIterator[NewDatabase]:
    """Make empty databases on the backend under test; all dropped afterwards."""
    base = (
        f"sqlite+aiosqlite:///{tmp_path / 'base.db'}"
        if backend == "sqlite"
        else os.environ[SERVER_URL_VARIABLES[backend]]
    )
    async with AsyncExitStack() as stack:

        async def new() -> URL:
            try:
                return await stack.enter_async_context(
                    throwaway_database(base, "asyncpatterns_migrations")
                )
            except DatabaseUnavailableError as exc:
                if backend in required_backends():
                    pytest.fail(f"{backend} is required but unreachable: {exc}")
                pytest.skip(f"{backend} unreachable: {exc}")

        yield new


async def on_connection(url: URL, work: Callable[[Connection], Any], begin: bool = True) -> Any:
    """Run sync ``work`` on a connection (in a transaction committed after it, if ``begin``)."""
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            if not begin:
                return await connection.run_sync(work)
            async with connection.begin():
                return await connection.run_sync(work)
    finally:
        await engine.dispose()


async def execute(url: URL, *statements: str) -> list[list[tuple[Any, ...]]]:
    """Run statements in one transaction; the rows of each (empty for writes).
    ``{user}`` is the user table's name, quoted for the backend ("user" is reserved)."""

    def run(connection: Connection) -> list[list[tuple[Any, ...]]]:
        user = connection.dialect.identifier_preparer.quote_identifier("user")
        results = [connection.execute(text(s.format(user=user))) for s in statements]
        return [list(map(tuple, r.all())) if r.returns_rows else [] for r in results]

    return await on_connection(url, run)


# -- What the database reports about its schema ------------------------------------------


async def create_all(url: URL) -> URL:
    """The models' tables made with ``create_all`` on the database at ``url``."""
    engine = make_engine(url)
    try:
        await create_db_and_tables(engine)
    finally:
        await engine.dispose()
    return url


async def created_schema(new_database: NewDatabase) -> dict[str, Any]:
    """The schema ``create_all`` makes from the models, on a fresh database."""
    return await on_connection(await create_all(await new_database()), schema)


# -- Agreement ---------------------------------------------------------------------------


async def test_upgrade_head_gives_the_schema_create_all_gives(new_database: NewDatabase) -> None:
    url = await new_database()
    assert await migrations.upgrade(url) == REVISIONS
    assert await migrations.current(url) == migrations.head() == REVISIONS[-1]
    # What autogenerate sees: nothing to do. A model changed without a revision fails here.
    assert await migrations.check(url) == []
    # What it does not compare: collations, CHECKs, table options, AUTOINCREMENT.
    assert await on_connection(url, schema) == await created_schema(new_database)


async def test_check_sees_a_model_change_that_has_no_revision(new_database: NewDatabase) -> None:
    url = await new_database()
    await migrations.upgrade(url, "0001")  # as if 0002 had not been written yet
    differences = await migrations.check(url)
    assert ("add_column", "account", "is_verified") in [
        (d[0], d[2], d[3].name) for d in differences if d[0] == "add_column"
    ]


async def test_an_app_refuses_to_start_on_an_old_schema(new_database: NewDatabase) -> None:
    url = await new_database()
    with pytest.raises(migrations.SchemaOutOfDateError, match="at no revision.*upgrade head"):
        await migrations.require_head(url)
    await migrations.upgrade(url, REVISIONS[0])
    with pytest.raises(migrations.SchemaOutOfDateError, match=f"at revision {REVISIONS[0]}"):
        await migrations.require_head(url)
    await migrations.upgrade(url)
    await migrations.require_head(url)  # at head: nothing to say


async def test_autogenerate_writes_what_the_kit_types_store(new_database: NewDatabase) -> None:
    def generate(connection: Connection) -> str:
        context = MigrationContext.configure(connection, opts=migrations.context_options())
        return render_python_code(
            produce_migrations(context, SQLModel.metadata).upgrade_ops,
            render_item=migrations.render_item,
        )

    code = await on_connection(await new_database(), generate)
    assert "asyncpatterns" not in code and "sqlmodel" not in code  # no application import
    assert "sa.Column('balance', sa.BigInteger()" in code  # Money: what it stores
    email = "sa.String(length=255).with_variant(mysql.VARCHAR(charset='utf8mb4', "
    assert f"sa.Column('email', {email}collation='utf8mb4_bin', length=255), 'mysql')" in code


# -- Up, down, and the data in between ----------------------------------------------------


async def test_downgrade_base_leaves_no_kit_table(new_database: NewDatabase) -> None:
    url = await new_database()
    await migrations.upgrade(url)
    assert await migrations.downgrade(url, "base") == REVISIONS[::-1]

    def tables(connection: Connection) -> set[str]:
        return set(inspect(connection).get_table_names())

    assert await on_connection(url, tables) == {"alembic_version"}
    assert await migrations.current(url) is None
    # ... and up again gives the same schema: each downgrade undoes its upgrade exactly.
    await migrations.upgrade(url)
    assert await on_connection(url, schema) == await created_schema(new_database)


async def test_upgrade_keeps_the_data_and_backfills(new_database: NewDatabase) -> None:
    url = await new_database()
    await migrations.upgrade(url, "0001")
    await execute(
        url,
        "INSERT INTO team (name) VALUES ('Core')",
        "INSERT INTO {user} (name, email, is_active, team_id) VALUES ('Ada', 'ada@x.io', true, 1)",
        "INSERT INTO profile (user_id, bio) VALUES (1, 'Engines')",
        "INSERT INTO account (owner, balance) VALUES ('Ada', 1050), ('Bob', 0), ('Cy', 7)",
        "DELETE FROM account WHERE owner = 'Cy'",  # its id, 3, must never come back
    )
    before = await execute(url, *READ_BACK)

    await migrations.upgrade(url)
    assert await execute(url, *READ_BACK) == before
    # An INSERT that does not name the new column, as code deployed before 0002 sends it.
    await execute(url, "INSERT INTO account (owner, balance) VALUES ('New', 100)")
    (accounts,) = await execute(url, "SELECT id, owner, is_verified FROM account ORDER BY id")
    # Backfilled: existing accounts verified; the new one got the server default.
    assert [(i, o, bool(v)) for i, o, v in accounts] == [
        (1, "Ada", True),
        (2, "Bob", True),
        (4, "New", False),
    ]

    await migrations.downgrade(url, "0001")
    (accounts,) = await execute(url, "SELECT id, owner, balance FROM account ORDER BY id")
    assert accounts == [(1, "Ada", 1050), (2, "Bob", 0), (4, "New", 100)]
    (_, _, users, profiles) = await execute(url, *READ_BACK)
    assert (users, profiles) == (before[2], before[3])
    await execute(url, "INSERT INTO account (owner, balance) VALUES ('Next', 1)")
    (ids,) = await execute(url, "SELECT max(id) FROM account")
    assert ids == [(5,)]  # not 3, nor 4: ids are never reused, across migrations too


CHECK_VIOLATIONS = {("postgresql", "23514"), ("mysql", 4025), ("mysql", 3819), ("sqlite", 275)}

READ_BACK = (
    "SELECT id, owner, balance FROM account ORDER BY id",
    "SELECT id, name FROM team ORDER BY id",
    "SELECT id, name, email, team_id FROM {user} ORDER BY id",
    "SELECT id, user_id, bio FROM profile ORDER BY id",
)


async def test_migrated_constraints_hold(new_database: NewDatabase) -> None:
    url = await new_database()
    await migrations.upgrade(url)
    with pytest.raises(DBAPIError) as refused:  # the CHECK survived SQLite's table copy
        await execute(url, "INSERT INTO account (owner, balance) VALUES ('Neg', -1)")
    assert error_code(refused.value) in CHECK_VIOLATIONS
    await execute(
        url,
        "INSERT INTO team (name) VALUES ('Core')",
        "INSERT INTO {user} (name, email, is_active, team_id) VALUES ('Ada', 'ada@x.io', true, 1)",
        "INSERT INTO profile (user_id, bio) VALUES (1, '')",
        "DELETE FROM team",  # ON DELETE SET NULL
    )
    assert await execute(url, "SELECT team_id FROM {user}") == [[(None,)]]
    await execute(url, "DELETE FROM {user}")  # ON DELETE CASCADE
    assert await execute(url, "SELECT count(*) FROM profile") == [[(0,)]]


async def test_sqlite_table_copy_keeps_the_rows_that_point_at_it(
    backend: str, new_database: NewDatabase
) -> None:
    if backend != "sqlite":
        pytest.skip("only SQLite copies a table to alter it (batch mode)")
    url = await new_database()
    await migrations.upgrade(url)
    await execute(
        url,
        "INSERT INTO team (name) VALUES ('Core')",
        "INSERT INTO user (name, email, is_active, team_id) VALUES ('Ada', 'ada@x.io', 1, 1)",
        "INSERT INTO profile (user_id, bio) VALUES (1, 'Engines')",
    )

    def copy_user_table(connection: Connection) -> None:
        operations = Operations(MigrationContext.configure(connection))
        with operations.batch_alter_table(
            "user", recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ):
            pass  # what any batch alteration of "user" does: copy, drop, rename

    def in_migration(connection: Connection) -> None:
        with migrations.migration_transaction(connection):
            copy_user_table(connection)

    await on_connection(url, in_migration, begin=False)  # foreign keys off while copying
    assert await execute(url, "SELECT user_id FROM profile") == [[(1,)]]
    await on_connection(url, copy_user_table)  # the trap: foreign keys on, as the app has them
    assert await execute(url, "SELECT user_id FROM profile") == [[]]  # cascade-deleted


# -- Two migrations at once ----------------------------------------------------------------

# Holds the migration lock, as a long migration would, until a line arrives on stdin.
HOLD_LOCK = """
import asyncio, sys
from asyncpatterns.migrations import migration_engine, migration_transaction

def hold(connection):
    with migration_transaction(connection):
        print("locked", flush=True)
        sys.stdin.readline()

async def main():
    engine = migration_engine(sys.argv[1])
    async with engine.connect() as connection:
        await connection.run_sync(hold)
    await engine.dispose()

asyncio.run(main())
"""


Spawn = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest_asyncio.fixture(loop_scope="session")
async def python() -> AsyncIterator[Spawn]:
    """Start ``python ARGS...`` in the project folder; any still running at the end is killed."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(stream: asyncio.StreamReader, marker: str) -> str:
    """The output up to and including the first line holding ``marker`` (bounded)."""
    seen = ""
    async with asyncio.timeout(WAIT):
        while marker not in seen:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"{marker!r} never came; output was:\n{seen}")
            seen += line
    return seen


async def test_two_processes_upgrading_at_once_take_turns(
    new_database: NewDatabase, python: Spawn
) -> None:
    url = (await new_database()).render_as_string(hide_password=False)
    holder = await python("-c", HOLD_LOCK, url)
    await read_until(holder.stdout, "locked")
    command = ("-m", "asyncpatterns.migrations", "--url", url, "upgrade", "head")
    racers = [await python(*command) for _ in range(2)]
    logs = [await read_until(racer.stderr, "Waiting for the migration lock") for racer in racers]
    await asyncio.sleep(0.5)  # both now wait on the lock; let the first one go
    holder.stdin.write(b"go\n")
    async with asyncio.timeout(WAIT):
        await holder.wait()
        outputs = [await racer.communicate() for racer in racers]
    logs = [log + stderr.decode() for log, (_, stderr) in zip(logs, outputs, strict=True)]

    assert [racer.returncode for racer in racers] == [0, 0], logs
    applied = sorted(re.findall(r"Running upgrade .*?-> (\w+)", log) for log in logs)
    assert applied == [[], REVISIONS], logs  # one migrated; the other found it done
    assert await execute(url, "SELECT version_num FROM alembic_version") == [[(REVISIONS[-1],)]]
    assert await migrations.check(url) == []


async def test_a_migration_waits_for_the_lock_for_a_bounded_time(
    new_database: NewDatabase, python: Spawn
) -> None:
    url = await new_database()
    holder = await python("-c", HOLD_LOCK, url.render_as_string(hide_password=False))
    try:
        await read_until(holder.stdout, "locked")
        with pytest.raises(migrations.MigrationLockTimeout, match="another migration"):
            await migrations.upgrade(url, lock_wait=1)
    finally:
        holder.stdin.write(b"go\n")
        async with asyncio.timeout(WAIT):
            await holder.wait()
    assert await migrations.current(url) is None  # it gave up before changing anything


async def test_migrations_run_in_one_process_one_at_a_time(new_database: NewDatabase) -> None:
    # Alembic keeps the running migration in module globals: the kit makes them take turns.
    url = await new_database()
    results = await asyncio.gather(*(migrations.upgrade(url) for _ in range(3)))
    assert sorted(results) == [[], [], REVISIONS]


# -- The commands -----------------------------------------------------------------------------


async def test_plain_alembic_and_the_kit_command(new_database: NewDatabase, python: Spawn) -> None:
    url = (await new_database()).render_as_string(hide_password=False)

    async def run(*args: str) -> str:
        process = await python(*args)
        async with asyncio.timeout(WAIT):
            stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        return stdout.decode()

    await run("-m", "alembic", "-x", f"url={url}", "upgrade", "head")  # reads alembic.ini
    assert "No new upgrade operations detected" in await run(
        "-m", "alembic", "-x", f"url={url}", "check"
    )
    for command in (("asyncpatterns.migrations",), ("asyncpatterns", "migrate")):
        current = await run("-m", *command, "--url", url, "current")
        assert current.strip() == f"{migrations.head()} (head)"


async def test_a_failed_connection_never_prints_the_password(python: Spawn) -> None:
    url = "postgresql://app:s3cret@127.0.0.1:9/shop"  # nothing listens on port 9
    process = await python("-m", "asyncpatterns.migrations", "--url", url, "upgrade", "head")
    async with asyncio.timeout(WAIT):
        stdout, stderr = await process.communicate()
    assert process.returncode == 2
    assert "s3cret" not in (stdout + stderr).decode()
    assert "postgresql+asyncpg://app:***@127.0.0.1:9/shop" in stderr.decode()


# -- Adopting a database create_all made --------------------------------------------------


async def made_by_create_all(new_database: NewDatabase) -> URL:
    """A database as the app made it before migrations: create_all, and some rows."""
    url = await create_all(await new_database())
    await execute(
        url,
        "INSERT INTO team (id, name) VALUES (1, 'Platform')",
        "INSERT INTO {user} (id, name, email, is_active, team_id, version) "
        "VALUES (1, 'Ada', 'ada@example.com', TRUE, 1, 4)",
        "INSERT INTO account (id, owner, balance, is_verified) VALUES (1, 'Ada', 10, FALSE)",
    )
    return url


STORED = "SELECT version FROM {user}", "SELECT is_verified FROM account"


async def test_upgrade_on_a_create_all_database_names_the_stamp_that_adopts_it(
    new_database: NewDatabase,
) -> None:
    url = await made_by_create_all(new_database)
    head = migrations.head()
    with pytest.raises(
        migrations.UnmanagedDatabaseError,
        match=rf"no migration revision .* revision {head}'s: .*migrate stamp {head}`",
    ):
        await migrations.upgrade(url)
    assert await migrations.current(url) is None
    assert await execute(url, *STORED) == [[(4,)], [(0,)]]  # nothing changed


async def test_stamp_refuses_a_revision_whose_schema_the_database_does_not_have(
    new_database: NewDatabase,
) -> None:
    url = await made_by_create_all(new_database)
    head = migrations.head()
    refused = rf"refusing to stamp {REVISIONS[0]}: .*(table job|user\.version) extra.*stamp {head}`"
    with pytest.raises(migrations.SchemaMismatchError, match=refused):
        await migrations.stamp(url, REVISIONS[0])
    assert await migrations.current(url) is None
    assert await migrations.stamp(url, "head") == head  # the revision it has: recorded
    assert await migrations.upgrade(url) == []  # nothing to run over the data
    with pytest.raises(migrations.SchemaMismatchError, match=refused):
        await migrations.stamp(url, REVISIONS[0])  # and never moved back
    assert await migrations.current(url) == head
    assert await execute(url, *STORED) == [[(4,)], [(0,)]]


async def test_stamp_sees_what_alembics_comparison_does_not(new_database: NewDatabase) -> None:
    """Autogenerate's comparison misses CHECK constraints and collations: a database
    without ``balance_not_negative`` (and, on MySQL, with a case-insensitive email
    column) compared equal to head, and was stamped."""
    url = await made_by_create_all(new_database)
    backend = url.get_backend_name()
    if backend == "sqlite":  # SQLite cannot drop a constraint: edit the stored CREATE TABLE
        with closing(sqlite3.connect(url.database)) as connection, connection:
            connection.execute("PRAGMA writable_schema = ON")
            (sql,) = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'account'")
            without = re.sub(r",\s*CONSTRAINT balance_not_negative CHECK \([^)]*\)", "", sql[0])
            assert without != sql[0]
            connection.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'account'", [without])
    else:
        await execute(url, "ALTER TABLE account DROP CONSTRAINT balance_not_negative")
    if backend == "mysql":
        await execute(url, "ALTER TABLE user MODIFY email VARCHAR(255) COLLATE utf8mb4_general_ci")
    with pytest.raises(migrations.SchemaMismatchError, match="account: checks differ") as refused:
        await migrations.stamp(url, "head")
    assert "it matches no revision" in str(refused.value)
    differences = await schema_differences(url, migrations.head())
    assert "account: checks differ" in differences
    if backend == "mysql":
        assert "user.email: column definition differs" in differences
    assert await migrations.current(url) is None


async def test_the_migrate_command_says_in_one_line_how_to_adopt(
    new_database: NewDatabase, python: Spawn
) -> None:
    url = (await made_by_create_all(new_database)).render_as_string(hide_password=False)
    head = migrations.head()

    async def run(*args: str) -> tuple[int | None, str]:
        process = await python("-m", "asyncpatterns", "migrate", "--url", url, *args)
        async with asyncio.timeout(WAIT):
            _, stderr = await process.communicate()
        return process.returncode, stderr.decode()

    code, stderr = await run("upgrade", "head")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and f"`python -m asyncpatterns migrate stamp {head}`" in errors[0]
    code, stderr = await run("stamp", REVISIONS[0])
    assert code == 2 and f"refusing to stamp {REVISIONS[0]}" in stderr, stderr
    assert (await run("stamp", head))[0] == 0
    assert await migrations.current(url) == head
