"""Sphinx configuration: the course as a static site.

Build it from the project folder with ``python -m asyncpatterns site``. The source
folder is the project folder (so the notebooks stay where they are); this file and
``index.md`` live in ``docs/``, and only the pages named in ``include_patterns`` are
read. Notebooks are rendered with their committed outputs, never executed.
"""

from pathlib import Path

project = "asyncpatterns"
author = "asyncpatterns contributors"
copyright = "asyncpatterns contributors"

extensions = ["myst_nb"]

root_doc = "docs/index"
include_patterns = ["docs/index.md", "notebooks/*.ipynb", "notebooks/*.md"]
exclude_patterns = [".*", "**/.*", "docs/_build", "build", "**/.ipynb_checkpoints"]

# The stored outputs are the course: show them as committed, run nothing.
nb_execution_mode = "off"
# Stored tracebacks are cut to their last line ("Error: message"), which the
# IPython traceback lexer cannot parse: show them as plain text.
nb_render_error_lexer = "text"
# Links between pages: [next](02_relationships.ipynb), [index](README.md) and
# [a section](03_transactions.ipynb#some-heading) resolve to pages and anchors;
# one that does not resolve is a warning, and the build turns warnings into errors.
myst_heading_anchors = 4

html_theme = "furo"
html_title = "asyncpatterns"
html_show_sourcelink = False
html_copy_source = False


def _landing_page(app, exception):
    """The pages live under docs/ and notebooks/: an index.html at the top leads in."""
    if exception is None and app.builder.format == "html":
        target = app.builder.get_target_uri(app.config.root_doc)
        Path(app.outdir, "index.html").write_text(
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="0; url={target}">'
            f"<title>{project}</title></head>"
            f'<body><a href="{target}">{project}</a></body></html>\n',
            encoding="utf-8",
        )


def setup(app):
    app.connect("build-finished", _landing_page)
