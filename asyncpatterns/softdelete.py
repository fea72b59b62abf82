"""Soft delete: a row marked deleted (``deleted_at``) that no query returns unless asked.

Use the ``SoftDelete`` mixin on a table model, ``await soft_delete(session, obj)``
to delete and ``await restore(session, Model, key)`` to undo; to see deleted rows,
ask: ``select(Model).execution_options(include_deleted=True)``. Importing this
module installs one ``do_orm_execute`` hook on every session: each ORM ``SELECT``,
``UPDATE`` and ``DELETE`` that involves a ``SoftDelete`` model gets ``deleted_at IS
NULL`` for it (``with_loader_criteria``), in joins, subqueries, counts and
relationship loads (lazy, ``selectinload``, ``joinedload``) too. What goes wrong
without it:

* A ``WHERE deleted_at IS NULL`` written in each query: the one query that forgets
  it (a count, a relationship, an admin export) shows deleted rows. Here no kit
  pattern can forget it: ``crud.get``, ``list_page``, ``count``, ``keyset_page``,
  ``stream_all``, the relationship loaders all see live rows only.
* ``session.get`` after a soft delete in the same session: the object is still in
  the identity map and comes back without any SQL. ``soft_delete`` expunges it.
* A unique email or SKU: the deleted row still holds it, so it can never be used
  again (or, with the constraint dropped, two live rows share it). Here
  ``unique_among_live(Model, "email")`` makes it unique among live rows only.
* A hard ``DELETE`` or an ``UPDATE`` that reaches deleted rows: the ORM's
  ``delete(Model)`` and ``update(Model)`` get the same criteria, so ``crud.delete``
  and ``crud.update`` of a deleted row change nothing (False, None).

What it does not cover: SQL written as text, Core statements on the ``Table``
(``conn.execute(select(table))``), and the database's own foreign keys (a child
row of a soft-deleted parent is still there: soft delete the children too, or
give them their own ``deleted_at``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ORMExecuteState, Session, with_loader_criteria
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .columns import UTCDateTime
from .crud import key_where, refused
from .db import run_in_transaction

INCLUDE_DELETED = "include_deleted"  # the execution option that shows deleted rows
M = TypeVar("M", bound=SQLModel)


class SoftDelete(SQLModel):
    """``deleted_at``: when the row was deleted, UTC; NULL while it is live."""

    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)


@event.listens_for(Session, "do_orm_execute")
def _hide_deleted(state: ORMExecuteState) -> None:
    if state.is_column_load or state.is_relationship_load:
        return  # a refresh; a relationship load already carries the criteria
    if not (state.is_select or state.is_update or state.is_delete):
        return
    if state.execution_options.get(INCLUDE_DELETED, False):
        return
    state.statement = state.statement.options(
        *(
            with_loader_criteria(model, lambda cls: cls.deleted_at.is_(None), include_aliases=True)
            for model in _tables(SoftDelete)
        )
    )


def _tables(base: type) -> list[type]:
    """The table models under ``base`` (the criteria name each: SQLModel's mixin has
    no ``deleted_at`` of its own for SQLAlchemy to read)."""
    found, stack = [], list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "__table__" in cls.__dict__:
            found.append(cls)
    return found


async def soft_delete(session: AsyncSession, obj: SoftDelete) -> bool:
    """Mark ``obj`` deleted now; False if it was deleted already (or is gone). In the
    caller's transaction when one was begun, else committed on its own. The object
    leaves the session: ``session.get`` no longer finds it."""
    model = type(obj)
    key = sa_inspect(obj).identity
    if key is None:
        raise ValueError("soft_delete: the object was never stored")

    async def mark(tx: AsyncSession) -> bool:
        marked = update(model).where(key_where(model, key)).values(deleted_at=datetime.now(UTC))
        done = (await tx.exec(marked.execution_options(synchronize_session=False))).rowcount == 1
        if obj in tx:
            tx.expunge(obj)
        return done

    return await run_in_transaction(session, mark)


async def restore(session: AsyncSession, model: type[M], key: Any) -> M | None:
    """Bring a deleted row back and return it; None if no deleted row has this key.
    A row whose unique value a live row took meanwhile raises the constraint's
    ``db.AlreadyExistsError`` (``unique_among_live``), and nothing changes."""

    async def back(tx: AsyncSession) -> M | None:
        deleted = model.deleted_at.isnot(None)  # type: ignore[attr-defined]
        revived = update(model).where(key_where(model, key), deleted).values(deleted_at=None)
        options = {INCLUDE_DELETED: True, "synchronize_session": False}
        if (await tx.exec(revived.execution_options(**options))).rowcount != 1:
            return None
        return (await tx.exec(select(model).where(key_where(model, key)))).one()

    try:
        return await run_in_transaction(session, back)
    except sa.exc.DBAPIError as exc:
        raise refused(exc, model) from None


def unique_among_live(model: type[SQLModel], column: str) -> None:
    """Make ``column`` unique among the live rows of ``model``: a deleted row no
    longer holds its value. Call it right after the class.

    One schema on every backend: a stored generated column ``live_<column>`` (the
    value while ``deleted_at`` is NULL, else NULL) with a unique index, since every
    backend lets NULLs repeat in a unique index. PostgreSQL and SQLite could use a
    partial index instead (``WHERE deleted_at IS NULL``); MySQL and MariaDB have
    none, and this way the migration is the same everywhere. The column is not
    mapped: the ORM never writes it.
    """
    table = model.__table__  # type: ignore[attr-defined]
    source = table.c[column]
    name = f"live_{column}"
    live = sa.case((table.c.deleted_at.is_(None), source))  # quoted for each backend
    table.append_column(sa.Column(name, source.type, sa.Computed(live, persisted=True)))
    sa.Index(f"uq_{table.name}_{name}", table.c[name], unique=True)
