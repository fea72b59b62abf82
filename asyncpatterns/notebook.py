"""Display helpers for the notebooks: source code, tables, and stable output.

Outputs are compared by nbval, so everything here prints deterministically:
columns in model-field order, no memory addresses, no timings.
"""

import configparser
import inspect
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from IPython.display import Markdown
from sqlmodel import SQLModel


def show(obj: Any) -> Markdown:
    """The source of a function or class, rendered as a code block."""
    return Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```")


def as_frame(rows: Iterable[Any], columns: list[str] | None = None) -> pd.DataFrame:
    """A DataFrame of SQLModel objects (columns in field order), dicts or tuples."""
    rows = list(rows)
    if rows and isinstance(rows[0], SQLModel):
        names = columns or list(type(rows[0]).model_fields)
        return pd.DataFrame([[getattr(r, n) for n in names] for r in rows], columns=names)
    return pd.DataFrame(rows, columns=columns)


def error_line(exc: BaseException) -> str:
    """``ExceptionType: first line of the message``, for a stable one-line output."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"


def regenerate(paths: Iterable[str | Path]) -> None:
    """Re-execute notebooks on a scratch SQLite file and store their outputs.

    The stored outputs are nbval's baseline, and what a reader sees before
    running anything, so the same inputs must store the same notebook: no
    execution timestamps, and a cell whose output truly varies (tagged
    ``nbval-ignore-output``: a timing, a plot) keeps its stored output
    unless its source changed. Error tracebacks are stored as IPython printed
    them: short, in ``%xmode Minimal`` (each notebook's setup cell sets it).
    """
    import nbformat
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{scratch}/notebooks.db"}
        for path in map(Path, paths):
            print(f"executing {path}")
            notebook = nbformat.read(path, as_version=4)
            stored = {cell.source: cell.get("outputs") for cell in notebook.cells}
            resources = {"metadata": {"path": str(path.parent)}}
            client = NotebookClient(notebook, timeout=600, resources=resources, record_timing=False)
            client.execute(env=env)
            volatile = _volatile_patterns(path.parent / "sanitize.cfg")
            for cell in notebook.cells:
                cell.get("metadata", {}).pop("execution", None)  # timestamps of an earlier run
                tags = cell.get("metadata", {}).get("tags", [])
                if "nbval-ignore-output" in tags and stored.get(cell.source) is not None:
                    cell.outputs = stored[cell.source]
                elif "outputs" in cell:
                    cell.outputs = _coalesce_streams(cell.outputs)
                for output in cell.get("outputs", []):
                    _mask(output, volatile)
            nbformat.write(notebook, path)


def _coalesce_streams(outputs: list[Any]) -> list[Any]:
    """Consecutive writes to one stream as one output: how a ``print`` is split into
    outputs depends on when the kernel flushed (on load), not on what it printed."""
    merged: list[Any] = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output.get("output_type") == "stream"
            and previous is not None
            and previous.get("output_type") == "stream"
            and previous.get("name") == output.get("name")
        ):
            previous["text"] += output["text"]
        else:
            merged.append(output)
    return merged


def _volatile_patterns(config_path: Path) -> list[tuple[re.Pattern[str], str]]:
    """The sanitize rules for what changes from run to run (memory addresses, object
    ids): stored masked, so that regenerating an unchanged notebook changes nothing."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(config_path)
    return [
        (re.compile(config[name]["regex"]), config[name]["replace"])
        for name in config.sections()
        if name.startswith("volatile:")
    ]


def _mask(output: Any, patterns: list[tuple[re.Pattern[str], str]]) -> None:
    def masked(text: str) -> str:
        for pattern, replacement in patterns:
            text = pattern.sub(replacement, text)
        return text

    if "text" in output:
        output["text"] = masked(output["text"])
    if output.get("output_type") == "error":
        output["evalue"] = masked(output["evalue"])
        output["traceback"] = [masked(line) for line in output["traceback"]]
    if "text/plain" in output.get("data", {}):
        output["data"]["text/plain"] = masked(output["data"]["text/plain"])
