"""Display helpers for the notebooks: source code, tables, and stable output.

Outputs are compared by nbval, so everything here prints deterministically:
columns in model-field order, no memory addresses, no timings.
"""

import inspect
from collections.abc import Iterable
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
