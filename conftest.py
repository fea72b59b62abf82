"""pytest setup for the kit itself: the opt-in fixtures, and a scratch database
for the notebooks that nbval runs."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
