"""Rows a Core statement wrote, made known to the session as a flush would.

Use ``attach_inserted`` after a Core ``INSERT`` (a bulk insert, an upsert) so
the objects you inserted are persistent in the session, and
``changed_behind_the_orm`` after a Core ``UPDATE`` of rows the session holds.
What goes wrong without them: a bulk insert by Core leaves the objects
transient (a later ``session.add`` inserts them twice), and a rollback leaves
objects showing values that were never stored. Here a rollback gives inserted
objects back transient with the values they had before (fix one, try again),
and expires updated ones, exactly as the ORM treats what it flushed itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, SessionTransaction, make_transient, make_transient_to_detached
from sqlmodel.ext.asyncio.session import AsyncSession


def attach_inserted(
    session: AsyncSession,
    objects: Sequence[Any],
    before: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Make new objects whose rows a Core INSERT just stored persistent in ``session``.

    Their primary keys must be set. Afterwards they are what a flush leaves:
    ``session.get`` returns them, ``session.add`` does nothing, a change is one
    UPDATE. If the transaction (or savepoint) they were stored in rolls back,
    they leave the session transient again, with the column values they had
    before the INSERT (``before``, one mapping per object, such as a copy of its
    ``__dict__``; default: their values now), as a failed flush leaves them:
    fix one field and add them again.
    """
    if before is None:
        before = [_column_values(obj) for obj in objects]
    for obj in objects:
        make_transient_to_detached(obj)
    session.add_all(objects)
    _undo_on_rollback(session, list(zip(objects, before, strict=True)), _RESTORE)


def _column_values(obj: Any) -> dict[str, Any]:
    state = sa_inspect(obj)
    keys = [attribute.key for attribute in state.mapper.column_attrs]
    return {key: state.dict[key] for key in keys if key in state.dict}


def changed_behind_the_orm(session: AsyncSession, objects: Sequence[Any]) -> None:
    """Objects ``session`` holds whose rows a Core statement just changed, their new
    values set with ``set_committed_value``.

    If the transaction (or savepoint) that changed the rows rolls back, they are
    expired, as the ORM expires the objects it wrote itself: nothing keeps
    showing values that were never stored.
    """
    _undo_on_rollback(session, [(obj, None) for obj in objects], _EXPIRE)


def _undo_on_rollback(session: AsyncSession, objects: list[tuple[Any, Any]], undo: str) -> None:
    sync_session = session.sync_session
    transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
    noted = sync_session.info.setdefault(_ATTACHED, {}).setdefault(transaction, [])
    noted.append((objects, undo))


# {transaction: [([(object, its values before), ...], what a rollback undoes)]}
_ATTACHED = "asyncpatterns.attached"
_RESTORE, _EXPIRE = "restore", "expire"


@event.listens_for(Session, "after_soft_rollback")
def _forget_attached(session: Session, rolled_back: SessionTransaction) -> None:
    # Objects attached in this transaction or one nested in it: their rows are gone,
    # so they are new objects again, as the caller made them.
    # Objects whose rows it changed behind the ORM: what they show was not kept.
    attached = session.info.get(_ATTACHED, {})
    for transaction in list(attached):
        ancestor = transaction
        while ancestor is not None and ancestor is not rolled_back:
            ancestor = ancestor.parent
        if ancestor is rolled_back:
            for objects, undo in attached.pop(transaction):
                for obj, before in objects:
                    if obj not in session:
                        continue
                    if undo == _EXPIRE:
                        session.expire(obj)
                        continue
                    session.expunge(obj)
                    make_transient(obj)
                    columns = {attribute.key for attribute in sa_inspect(obj).mapper.column_attrs}
                    for key, value in before.items():
                        if key in columns:
                            setattr(obj, key, value)


@event.listens_for(Session, "after_commit")
def _keep_attached(session: Session) -> None:
    # A committed savepoint hands its objects to the transaction around it; at
    # the end of the root transaction there is nothing left to undo.
    committed = session.get_nested_transaction() or session.get_transaction()
    attached = session.info.get(_ATTACHED, {})
    if committed in attached:
        objects = attached.pop(committed)
        if committed.parent is not None:
            attached.setdefault(committed.parent, []).extend(objects)
