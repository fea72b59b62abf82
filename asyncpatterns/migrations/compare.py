"""What ``env.py`` configures Alembic with: ``context_options`` and the hooks it names.

Use it wherever Alembic meets the kit's models: ``env.py`` passes these options to
``context.configure``, and ``check`` compares with the same ones. What it does that a
copied ``alembic init -t async`` does not:

* The kit's column types are written into a migration as what they store
  (``Money`` as ``BIGINT``, ``Email`` as a binary-collated ``VARCHAR`` on MySQL), so a
  migration never changes meaning when the Python types do.
* A boolean default is compared by its value: MySQL reflects ``false`` as ``0``, which
  Alembic's text comparison would report as a change on every ``check``.
"""

from __future__ import annotations

from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Boolean
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import CompileError
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import SQLModel

# The dialects a rendered column type must be right for.
_DIALECTS = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),
    "mysql": mysql.dialect(),
}


def context_options(steps: list[str] | None = None) -> dict[str, Any]:
    """The options ``env.py`` passes to ``context.configure`` (and ``check`` compares with)."""
    options: dict[str, Any] = {
        "target_metadata": SQLModel.metadata,
        # SQLite cannot ALTER most things: batch operations copy the table instead.
        "render_as_batch": True,
        "compare_type": True,
        "compare_server_default": compare_server_default,
        "render_item": render_item,
    }
    if steps is not None:

        def record(*, step: Any, **_: Any) -> None:
            steps.append(step.up_revision_id)

        options["on_version_apply"] = record
    return options


def compare_server_default(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Compare boolean defaults by value: MySQL stores ``false`` as ``0`` and reflects
    it so, which Alembic's text comparison reports as a change. ``None``: Alembic decides."""
    if context.dialect.name != "mysql" or not isinstance(metadata_column.type, Boolean):
        return None
    return _boolean_value(inspected_default) != _boolean_value(rendered_metadata_default)


def _boolean_value(default: str | None) -> str | None:
    if default is None:
        return None
    value = default.strip("'\"() ").lower()
    return {"false": "0", "true": "1"}.get(value, value)


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | bool:
    """Write a ``TypeDecorator`` (the kit's ``Money``, ``ExactText``, ``Email``;
    SQLModel's ``AutoString``) into a migration as the type it stores: its ``impl``,
    with a ``with_variant`` where a backend stores something else. A migration then
    needs no import of the application, and keeps its meaning when the Python type
    changes. Anything else renders as Alembic renders it (``False``)."""
    if kind != "type" or not isinstance(obj, TypeDecorator):
        return False
    stored = obj.impl_instance
    rendered = _render_type(stored, autogen_context)
    for name, dialect in _DIALECTS.items():
        variant = obj.load_dialect_impl(dialect)
        if _ddl(variant, dialect) != _ddl(stored, dialect):
            rendered += f".with_variant({_render_type(variant, autogen_context)}, {name!r})"
    return rendered


def _render_type(type_: TypeEngine[Any], autogen_context: Any) -> str:
    module = type(type_).__module__
    if module.startswith("sqlalchemy.dialects."):
        dialect_name = module.split(".")[2]
        autogen_context.imports.add(f"from sqlalchemy.dialects import {dialect_name}")
        return f"{dialect_name}.{type_!r}"
    return f"sa.{type_!r}"


def _ddl(type_: TypeEngine[Any], dialect: Any) -> str:
    try:
        return type_.compile(dialect=dialect)
    except CompileError as exc:  # e.g. VARCHAR without a length on MySQL
        return f"error: {exc}"
