"""pytest setup for the kit itself: the opt-in fixtures, and a scratch database
for the notebooks that nbval runs."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL, make_url

from asyncpatterns import topology
from asyncpatterns.topology.pgbouncer import installed, running_pgbouncer

pytest_plugins = ["asyncpatterns.testing"]


def pytest_configure(config: pytest.Config) -> None:
    # nbval compares the notebooks with outputs recorded on SQLite, so their
    # kernels get a scratch SQLite file whatever DATABASE_URL the shell has.
    # The other backends run them in tests/test_notebooks.py.
    scratch = tempfile.mkdtemp(prefix="asyncpatterns-notebooks-")
    config.stash[_SCRATCH] = scratch
    os.environ["DATABASE_URL"] = f"sqlite+aiosqlite:///{Path(scratch) / 'notebooks.db'}"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash.get(_SCRATCH, ""), ignore_errors=True)


_SCRATCH = pytest.StashKey[str]()

# Notebook 13 runs a PgBouncer and clusters of its own in front of a PostgreSQL server.
TOPOLOGY_NOTEBOOK = "13_production"
LOCAL_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def topology_missing() -> str | None:
    """What notebook 13 needs and this machine lacks (None: nothing)."""
    url = make_url(os.environ.get("ASYNCPATTERNS_POSTGRES_URL") or LOCAL_POSTGRES)
    return topology.missing(url)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    notebook = [item for item in items if Path(str(item.path)).stem == TOPOLOGY_NOTEBOOK]
    if notebook and (lacking := topology_missing()):
        reason = f"notebook 13 needs {lacking}"
        for item in notebook:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
async def no_returning(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's dialect says "no INSERT ... RETURNING", as MySQL's does, so that
    path runs on every backend (MariaDB's dialect sets the flag again on each new
    connection: that is stopped too)."""
    async with engine.connect():  # the dialect sets its flags on the first connection
        pass
    dialect = engine.sync_engine.dialect
    monkeypatch.setattr(dialect, "insert_returning", False)
    if hasattr(dialect, "_set_mariadb"):
        set_mariadb = dialect._set_mariadb

        def set_mariadb_without_returning(*args) -> None:
            set_mariadb(*args)
            dialect.insert_returning = False

        monkeypatch.setattr(dialect, "_set_mariadb", set_mariadb_without_returning)


@pytest.fixture(scope="session")
def bouncer(backend: str, database_url: URL) -> Iterator[int]:
    """The port of a PgBouncer of our own, in transaction mode, in front of the test
    database's server (Debian's pgbouncer; ``asyncpatterns.topology.pgbouncer``). Its
    ``asyncpatterns_one_server`` database gives every client one server connection."""
    if backend != "postgresql":
        pytest.skip("PgBouncer pools PostgreSQL connections")
    if not installed():
        message = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if "postgresql" in os.environ.get("ASYNCPATTERNS_REQUIRE_BACKENDS", ""):
            pytest.fail(message + " (postgresql is listed in ASYNCPATTERNS_REQUIRE_BACKENDS)")
        pytest.skip(message)
    host, port = database_url.host or "127.0.0.1", database_url.port or 5432
    with running_pgbouncer(host, port, pool_size=4) as bouncer_port:
        yield bouncer_port
