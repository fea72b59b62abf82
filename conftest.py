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
