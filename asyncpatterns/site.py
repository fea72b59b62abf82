"""``python -m asyncpatterns site``: the course as a static site.

Sphinx with myst-nb renders the notebooks with their committed outputs (nothing is
executed) into ``docs/_build/html``. Warnings fail the build: a link between pages
that does not resolve, a notebook left out of the index, a missing reference.
Needs the ``[docs]`` extra and the project folder (run it from there).
"""

import sys
from pathlib import Path

SOURCE = Path(".")  # the project folder: the notebooks stay where they are
CONF = Path("docs")
OUT = Path("docs/_build/html")


def build(out: Path | str = OUT, source: Path | str = SOURCE) -> int:
    """Build the site into ``out``; 0 when it built without a warning."""
    source, out = Path(source), Path(out)
    if not (source / CONF / "conf.py").is_file():
        print(
            f"error: no {CONF / 'conf.py'} under {source.resolve()}: "
            "run this from the project folder",
            file=sys.stderr,
        )
        return 2
    try:
        from sphinx.cmd.build import build_main
    except ImportError:
        print('error: the site needs the docs extra: pip install -e ".[docs]"', file=sys.stderr)
        return 2
    status = build_main(
        ["-b", "html", "-c", str(source / CONF), "-W", "--keep-going", "-n", "-q"]
        + [str(source), str(out)]
    )
    if status == 0:
        print(f"site built: {(out / 'index.html').resolve().as_uri()}")
    return status
