"""Run every notebook on PostgreSQL and MySQL/MariaDB, and check what it shows.

On SQLite, nbval runs them and compares every output with the committed one.
Here they run on the server backends, each in a throw-away database, and are
held to the same baseline: every cell must execute (only cells tagged
``raises-exception`` may raise, and then with the same exception type), and
every output must match the committed SQLite one -- except in cells tagged
``backend-specific``, whose output differs by backend on purpose and which
assert their behaviour in code instead, and cells tagged ``nbval-ignore-output``
(timings, plots).
"""

import configparser
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from asyncpatterns.db import throwaway_database
from asyncpatterns.testing import SERVER_URL_VARIABLES
from conftest import TOPOLOGY_NOTEBOOK, topology_missing

FOLDER = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
NOT_COMPARED = {"backend-specific", "nbval-ignore-output"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sanitizers() -> list[tuple[re.Pattern[str], str]]:
    """nbval's sanitize rules (notebooks/sanitize.cfg): addresses, versions in links."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(FOLDER / "sanitize.cfg")
    return [(re.compile(config[s]["regex"]), config[s]["replace"]) for s in config.sections()]


SANITIZERS = sanitizers()


def shown(cell: nbformat.NotebookNode) -> list[str]:
    """What a code cell shows, as comparable text: streams, plain-text results, and
    the type of an error (its message differs by driver)."""
    texts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            texts.append(output.text)
        elif output.output_type == "error":
            texts.append(f"error: {output.ename}\n")
        elif "text/plain" in output.get("data", {}):
            texts.append(output.data["text/plain"] + "\n")
    text = ANSI.sub("", "".join(texts))
    for pattern, replacement in SANITIZERS:
        text = pattern.sub(replacement, text)
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
async def test_notebook_shows_the_same_on_server_backends(backend: str, path: Path) -> None:
    if backend == "sqlite":
        pytest.skip("nbval runs the notebooks on SQLite and compares their outputs")
    if path.stem == TOPOLOGY_NOTEBOOK and (lacking := topology_missing()):
        pytest.skip(f"notebook 13 needs {lacking}")
    stored = nbformat.read(path, as_version=4)
    notebook = nbformat.read(path, as_version=4)
    async with throwaway_database(os.environ[SERVER_URL_VARIABLES[backend]]) as url:
        env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)}
        resources = {"metadata": {"path": str(path.parent)}}
        client = NotebookClient(notebook, timeout=600, resources=resources)
        await client.async_execute(env=env)
    differences = []
    for number, (expected, ran) in enumerate(zip(stored.cells, notebook.cells, strict=True)):
        tags = set(expected.get("metadata", {}).get("tags", []))
        if expected.cell_type != "code" or tags & NOT_COMPARED:
            continue
        if shown(ran) != shown(expected):
            differences.append(
                f"cell {number}: {expected.source.splitlines()[0][:60]!r}\n"
                f"  SQLite: {shown(expected)[:6]}\n  {backend}: {shown(ran)[:6]}"
            )
    assert not differences, "\n".join(differences)
