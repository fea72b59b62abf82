"""The trap catalogue (notebooks/TRAPS.md) points at things that exist.

Each row names the notebook section that shows the trap live and the tests that
guard its fix; a renamed test or section must not leave the catalogue pointing at
nothing.
"""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
CATALOGUE = ROOT / "notebooks" / "TRAPS.md"
ROW = re.compile(r"^\| (?!trap \|)(?!---)(.+) \|$", re.MULTILINE)
LIVE = re.compile(r"\[\d+\]\((\d\d_\w+\.ipynb)\) · (.+)")
TEST = re.compile(r"`(?:(test_\w+\.py))?::(test_\w+)`")


def rows() -> list[list[str]]:
    return [
        [cell.strip() for cell in row.split(" | ")] for row in ROW.findall(CATALOGUE.read_text())
    ]


def headings(notebook: Path) -> list[str]:
    cells = nbformat.read(notebook, as_version=4).cells
    return [
        line.lstrip("#").strip()
        for cell in cells
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith("#")
    ]


def test_the_catalogue_has_a_row_per_trap() -> None:
    assert len(rows()) >= 40
    assert all(len(row) == 4 for row in rows()), [row for row in rows() if len(row) != 4]


@pytest.mark.parametrize("row", rows(), ids=lambda row: row[0][:40])
def test_each_trap_is_live_in_a_notebook_section_and_guarded(row: list[str]) -> None:
    trap, live, _fixed_by, guarded_by = row
    found = LIVE.fullmatch(live)
    assert found, f"{trap}: 'shown live in' must be [NN](NN_name.ipynb) · section"
    notebook, section = ROOT / "notebooks" / found[1], found[2]
    assert notebook.exists(), notebook
    assert any(section in h for h in headings(notebook)), (
        f"{trap}: no section {section!r} in {notebook.name}"
    )
    file = None
    for named_file, test in TEST.findall(guarded_by):
        file = named_file or file
        assert file, f"{trap}: {test} names no file"
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"def {test}\b", source), f"{trap}: no {test} in tests/{file}"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=str)
def test_a_trap_cell_shows_a_short_error(notebook: Path) -> None:
    """What JupyterLab prints for a trap: the stored traceback is the kernel's own
    (``%xmode Minimal`` in the first cell; regenerating keeps it), at most 15 lines."""
    cells = nbformat.read(notebook, as_version=4).cells
    assert "%xmode Minimal" in next(c.source for c in cells if c.cell_type == "code")
    for cell in cells:
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        assert bool(errors) == ("raises-exception" in cell.metadata.get("tags", [])), cell.source
        for error in errors:
            lines = ANSI.sub("", "\n".join(error.traceback)).splitlines()
            assert 1 <= len(lines) <= 15, (cell.source, lines)
