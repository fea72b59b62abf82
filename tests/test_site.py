"""The course as a static site, read in a real browser.

The site is built once per session (``python -m asyncpatterns site --out TMP``), or
taken from ``$ASYNCPATTERNS_SITE_DIR`` when a build is at hand. Each notebook's page
is loaded in headless Chromium and its DOM read back: the page shows the notebook's
title (its first markdown heading) and, for every cell tagged ``raises-exception``,
the short error stored in the committed notebook ("ExceptionName: message"). The
expectations come from the .ipynb files, so a new notebook is covered as it lands.

Without Chromium or the ``[docs]`` extra the tests skip, saying which is missing;
with ``ASYNCPATTERNS_REQUIRE_SITE=1`` (CI) they fail instead.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REQUIRED = os.environ.get("ASYNCPATTERNS_REQUIRE_SITE") == "1"


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (ASYNCPATTERNS_REQUIRE_SITE=1: the site test may not skip)")
    pytest.skip(reason)


def one_line(text: str) -> str:
    return " ".join(text.split())


def title_of(notebook: dict) -> str:
    """The first markdown heading, as the page shows it (inline markup removed)."""
    for cell in notebook["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if match := re.match(r"#{1,6}\s+(.+?)\s*#*$", line):
                heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match[1])  # [text](url)
                return one_line(re.sub(r"(`+|\*\*|__)", "", heading))
    raise AssertionError("the notebook has no markdown heading to title its page")


def stored_errors(notebook: dict) -> list[str]:
    """ "ExceptionName: first line of the message" of each error a trap cell stores."""
    errors = []
    for cell in notebook["cells"]:
        if "raises-exception" not in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                message = output["evalue"].splitlines()[0] if output["evalue"] else ""
                errors.append(one_line(f"{output['ename']}: {message}".rstrip(": ")))
    return errors


class PageText(HTMLParser):
    """The text of a page (scripts and styles left out), and of its <h1> headings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.headings: list[str] = []
        self._skip = 0
        self._h1: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "template"):
            self._skip += 1
        elif tag == "h1":
            self._h1 = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "template"):
            self._skip -= 1
        elif tag == "h1" and self._h1 is not None:
            self.headings.append(one_line("".join(self._h1)).rstrip("#¶ "))
            self._h1 = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._h1 is not None:
            self._h1.append(data)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if given := os.environ.get("ASYNCPATTERNS_SITE_DIR"):
        out = Path(given)
        assert (out / "index.html").is_file(), f"ASYNCPATTERNS_SITE_DIR={given} holds no site"
        return out
    missing = [m for m in ("sphinx", "myst_nb", "furo") if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f'building the site needs the docs extra (pip install -e ".[docs]"): {missing}')
    out = tmp_path_factory.mktemp("site") / "html"
    build = subprocess.run(
        [sys.executable, "-m", "asyncpatterns", "site", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"the site did not build:\n{build.stdout}{build.stderr}"
    return out


@pytest.fixture(scope="session")
def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("headless Chromium is not installed (Debian: apt-get install chromium)")
    return found


def dump_dom(browser: str, page: Path) -> str:
    """The page's DOM after it loaded, as headless Chromium serializes it."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
            + [f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0 and "</html>" in result.stdout, (
        f"Chromium could not load {page}:\n{result.stderr[-2000:]}"
    )
    return result.stdout


@pytest.fixture(scope="session")
def pages(site: Path, browser: str) -> dict[str, PageText]:
    """Every notebook's page and the index, loaded in Chromium (two at a time)."""
    paths = {nb.stem: site / "notebooks" / f"{nb.stem}.html" for nb in NOTEBOOKS}
    paths["index"] = site / "docs" / "index.html"  # where the top index.html leads
    for name, path in paths.items():
        assert path.is_file(), f"the site has no page for {name} ({path.relative_to(site)})"
    with ThreadPoolExecutor(max_workers=2) as pool:
        doms = dict(
            zip(paths, pool.map(lambda p: dump_dom(browser, p), paths.values()), strict=True)
        )
    parsed = {}
    for name, dom in doms.items():
        parsed[name] = page = PageText()
        page.feed(dom)
        page.close()
    return parsed


def test_the_front_page_leads_to_every_notebook(site: Path, pages: dict[str, PageText]) -> None:
    assert NOTEBOOKS, "no notebooks found"
    assert 'url=docs/index.html"' in (site / "index.html").read_text(encoding="utf-8")
    front = one_line("".join(pages["index"].text))
    for path in NOTEBOOKS:
        title = title_of(json.loads(path.read_text(encoding="utf-8")))
        assert title in front, f"the front page does not list {path.name} ({title!r})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_a_notebook_page_shows_its_title_and_its_traps(
    path: Path, pages: dict[str, PageText]
) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    page = pages[path.stem]
    title = title_of(notebook)
    assert title in page.headings, f"{path.name}: title {title!r} not among {page.headings}"
    text = one_line("".join(page.text))
    missing = [error for error in stored_errors(notebook) if error not in text]
    assert not missing, f"{path.name}: stored errors not shown on the page: {missing}"
