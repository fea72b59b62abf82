"""Run every notebook on PostgreSQL and MySQL/MariaDB.

On SQLite, nbval runs them and compares every output with the committed one.
Here they run on the server backends, each in a throw-away database: every
cell must execute, and only cells tagged ``raises-exception`` may raise.
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from asyncpatterns.db import throwaway_database
from asyncpatterns.testing import SERVER_URL_VARIABLES

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
async def test_notebook_runs_on_server_backend(backend: str, path: Path) -> None:
    if backend == "sqlite":
        pytest.skip("nbval runs the notebooks on SQLite and compares their outputs")
    notebook = nbformat.read(path, as_version=4)
    async with throwaway_database(os.environ[SERVER_URL_VARIABLES[backend]]) as url:
        env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)}
        client = NotebookClient(
            notebook, timeout=600, resources={"metadata": {"path": str(path.parent)}}
        )
        await client.async_execute(env=env)
