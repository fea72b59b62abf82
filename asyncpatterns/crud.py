"""Create, read, update and delete rows of any SQLModel table, one or many at a time.

Every function takes the session and the model (or the object); many rows at
once are in ``bulk.py``. The kit's ``User`` is one table they work on: the
seed's names (``create_user`` and the rest) are thin wrappers at the end.
Every writer is one unit of work (``db.run_in_transaction``): with no
transaction open it commits its own change; inside a transaction you began it
joins yours and you commit. A write
that fails undoes only its own change: objects loaded before stay usable.
What the common pattern gets wrong, and this fixes:

* ``create_users`` refreshed each row after the commit: one SELECT per row
  (``bulk.create_many``: one statement per 1,000 rows, ids set).
* ``update_user`` set any key ``hasattr`` accepted: ``{"id": 777}`` rewrote the
  primary key, ``{"name": 123}`` was stored as ``'123'``. ``update`` takes
  only the model's columns (or a schema's fields), refuses the key and the
  version, and does not coerce types.
* A duplicate was a check-then-insert that races, or an ``AttributeError``
  explaining it. Here the violated constraint decides, and the error names
  the model, the columns and the values (``db.constraints``).
* Two clients that read a row and both write lost the first write without a
  word: ``expected_version`` writes only over the version read, for a model
  with a version column (``version_id_col``), else ``VersionConflictError``.
* Lists had no order and no bound; ``limit=-1`` was everything. Here pages are
  in primary-key order, ``0 <= skip`` and ``1 <= limit <= 100``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .bulk import (  # noqa: F401  (the seed's bulk names live in bulk.py, and are crud's too)
    DuplicateEmailError,
    column_values,
    copy_many,
    copy_users,
    create_many,
    create_users,
    deactivate_users,
    delete_inactive_users,
    delete_where,
    refused,
    release_referrers,
    update_where,
    user_refusal,
)
from .db import AlreadyExistsError, ReferenceNotFoundError, run_in_transaction
from .pagination import MAX_PAGE_SIZE

if TYPE_CHECKING:
    from .models import User, UserUpdate

M = TypeVar("M", bound=SQLModel)


class VersionConflictError(Exception):
    """The row changed since the version the caller read: its write was refused."""

    def __init__(self, model: str, key: Any, current: int, expected: Collection[int]) -> None:
        sent = ", ".join(map(str, sorted(expected))) or "none"
        super().__init__(
            f"{model} {key} is at version {current}, not the version expected ({sent}): "
            "someone else changed it. Read it again, re-apply the change, write again."
        )
        self.model, self.key, self.current, self.expected = model, key, current, frozenset(expected)


async def create(session: AsyncSession, obj: M) -> M:
    """Insert one new object and return it, its id and server defaults loaded.

    Raises the ``db.ConstraintError`` its table's constraints give: a taken
    unique key (``AlreadyExistsError``), a foreign key naming no row
    (``ReferenceNotFoundError``, a ``LookupError``), a NULL, a failed CHECK.
    """

    async def insert(tx: AsyncSession) -> M:
        tx.add(obj)
        await tx.flush()
        await load_server_values(tx, obj)
        return obj

    try:
        return await run_in_transaction(session, insert)
    except DBAPIError as exc:
        raise refused(exc, type(obj), column_values(obj)) from None


async def load_server_values(session: AsyncSession, obj: Any) -> None:
    """Read the columns a flush left unloaded: values the server made (a default,
    an ``onupdate``) that the backend did not return (MySQL returns none). Touching
    them later would be a lazy load, which async code cannot do."""
    state = sa_inspect(obj)
    missing = [a.key for a in state.mapper.column_attrs if a.key in state.unloaded]
    if missing:
        await session.refresh(obj, missing)


async def get(session: AsyncSession, model: type[M], key: Any) -> M | None:
    """The row with this primary key (a tuple for a composite key), or None."""
    return await session.get(model, key)


async def get_by(session: AsyncSession, model: type[M], **values: Any) -> M | None:
    """The row whose unique key has these values (``get_by(s, Product, sku="A-1")``,
    several for a composite key), or None. ``ValueError`` unless the columns named
    are exactly one of the table's unique keys: otherwise "the" row is not one."""
    unique_key(model, list(values))
    statement = select(model).where(*(getattr(model, k) == v for k, v in values.items()))
    return (await session.exec(statement)).first()


def unique_key(model: type[SQLModel], names: Sequence[str]) -> list[Any]:
    """The columns of ``model``'s unique key (or primary key) named by these attributes;
    ``ValueError`` if no unique key of the table is exactly these columns."""
    mapper = sa_inspect(model)
    columns = [mapper.attrs[name].columns[0] for name in names if name in mapper.column_attrs]
    table = mapper.local_table
    unique = (sa.PrimaryKeyConstraint, sa.UniqueConstraint)
    keys = [set(c.columns) for c in table.constraints if isinstance(c, unique)]
    keys += [set(index.columns) for index in table.indexes if index.unique]
    if len(columns) != len(names) or set(columns) not in keys:
        raise ValueError(f"{model.__name__} has no unique key on ({', '.join(names)})")
    return columns


async def list_page(
    session: AsyncSession,
    model: type[M],
    skip: int = 0,
    limit: int = MAX_PAGE_SIZE,
    order_by: Sequence[Any] = (),
) -> list[M]:
    """One page of rows, in ``order_by`` then primary-key order (a stable order:
    the same row never shows on two pages). ``0 <= skip``, ``1 <= limit <= 100``."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    primary = list(sa_inspect(model).primary_key)
    statement = select(model).order_by(*order_by, *primary).offset(skip).limit(limit)
    return list((await session.exec(statement)).all())


async def count(session: AsyncSession, model: type[SQLModel], *where: Any) -> int:
    """How many rows (that match ``where``, if given)."""
    statement = select(sa.func.count()).select_from(model).where(*where)
    return (await session.exec(statement)).one()


async def update(
    session: AsyncSession,
    model: type[M],
    key: Any,
    changes: Mapping[str, Any] | BaseModel,
    *,
    schema: type[BaseModel] | None = None,
    expected_version: int | Collection[int] | None = None,
) -> M | None:
    """Apply the fields present in ``changes``; None if there is no such row.

    ``changes`` is checked against ``schema`` (a pydantic model of the
    updatable fields) or, without one, the model's own columns and their
    types, strictly (``ValueError``; pydantic's ``ValidationError`` is one).
    The primary key and the version column are never changed.

    Without ``expected_version`` the last write wins: the row is locked, read
    and written. With it (optimistic locking) the write happens only over that
    version (or one of those given): the UPDATE says ``WHERE version = n``, so
    a writer that got there first makes it match nothing, and this raises
    ``VersionConflictError``. A row deleted meanwhile is None: "gone" is not
    "changed". Constraint violations raise ``db.ConstraintError``.
    """
    mapper = sa_inspect(model)
    data = _checked_changes(model, changes, schema)
    expected = _expected(model, expected_version)

    async def apply(tx: AsyncSession) -> M | None:
        # Last write wins: FOR UPDATE, so a concurrent delete waits for us, or we
        # see it already gone. Optimistic: no lock, the version guards the write.
        obj = await tx.get(model, key, with_for_update=expected is None, populate_existing=True)
        if obj is None:
            return None
        if expected is None:
            obj.sqlmodel_update(data)
            await tx.flush()  # the row is locked: nobody changed or deleted it meanwhile
            await load_server_values(tx, obj)
            return obj
        version = getattr(obj, mapper.get_property_by_column(mapper.version_id_col).key)
        if version not in expected:
            raise VersionConflictError(model.__name__, key, version, expected)
        try:
            # A savepoint of its own, begun before the change (begin_nested flushes
            # pending changes), so that the session can still read after a failure.
            async with tx.begin_nested():
                obj.sqlmodel_update(data)
                await tx.flush()  # UPDATE ... SET version = n + 1 WHERE id = ? AND version = n
        except StaleDataError:
            current = await _current_version(tx, model, key)  # deleted, or written since
            if current is None:
                return None
            raise VersionConflictError(model.__name__, key, current, expected) from None
        await load_server_values(tx, obj)
        return obj

    try:
        return await run_in_transaction(session, apply)
    except StaleDataError:
        return None  # locked, so not changed: the row vanished between our read and write
    except DBAPIError as exc:
        await session.get(model, key)  # reload what the undone change expired
        raise refused(exc, model, data) from None


@cache
def _field(model: type[SQLModel], name: str) -> TypeAdapter[Any]:
    field = model.model_fields[name]
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[field.annotation, *field.metadata])


def _checked_changes(
    model: type[SQLModel], changes: Mapping[str, Any] | BaseModel, schema: type[BaseModel] | None
) -> dict[str, Any]:
    """The changes as a dict, validated; ValueError for a field nobody may write."""
    if isinstance(changes, BaseModel):
        data = changes.model_dump(exclude_unset=True)
    elif schema is not None:
        data = schema.model_validate(changes).model_dump(exclude_unset=True)
    else:
        data = dict(changes)
        for name, value in data.items():
            if name not in model.model_fields or name not in sa_inspect(model).column_attrs:
                raise ValueError(f"{model.__name__} has no column {name!r}")
            try:
                _field(model, name).validate_python(value, strict=True)
            except ValidationError as exc:
                raise ValueError(f"{model.__name__}.{name}: {exc.errors()[0]['msg']}") from None
    mapper = sa_inspect(model)
    fixed = {mapper.get_property_by_column(c).key for c in mapper.primary_key}
    if mapper.version_id_col is not None:
        fixed.add(mapper.get_property_by_column(mapper.version_id_col).key)
    if fixed & data.keys():
        raise ValueError(f"{model.__name__}: {', '.join(sorted(fixed & data.keys()))} is read-only")
    return data


def _expected(
    model: type[SQLModel], expected_version: int | Collection[int] | None
) -> frozenset[int] | None:
    if expected_version is None:
        return None
    if sa_inspect(model).version_id_col is None:
        raise ValueError(f"{model.__name__} has no version column (version_id_col)")
    if isinstance(expected_version, int):
        return frozenset([expected_version])
    return frozenset(expected_version)


def key_where(model: type[SQLModel], key: Any) -> Any:
    """The WHERE clause for the row with this primary key (a tuple for a composite one)."""
    columns = list(sa_inspect(model).primary_key)
    keys = key if isinstance(key, tuple) else (key,)
    return sa.and_(*(column == value for column, value in zip(columns, keys, strict=True)))


async def _current_version(session: AsyncSession, model: type[SQLModel], key: Any) -> int | None:
    """The row's version as last committed (a locking read: on MySQL a plain one
    would answer from this transaction's snapshot); None if there is no such row."""
    version = sa_inspect(model).version_id_col
    now = select(version).where(key_where(model, key)).with_for_update()
    return (await session.exec(now)).first()


async def delete(
    session: AsyncSession,
    model: type[SQLModel],
    key: Any,
    *,
    expected_version: int | Collection[int] | None = None,
) -> bool:
    """Delete one row in one statement; False if there was no such row.

    With ``expected_version`` (optimistic locking), only that version of the
    row (or one of those given) is deleted, else ``VersionConflictError``: a
    client that read an older copy does not delete a change it has not seen.
    Rows pointing here with ``ON DELETE SET NULL`` are released first, with new
    versions (``bulk.release_referrers``); rows pointing here without it make
    the delete a ``db.StillReferencedError``.
    """
    expected = _expected(model, expected_version)
    where = [key_where(model, key)]
    if expected is not None:
        where.append(sa_inspect(model).version_id_col.in_(expected))

    async def delete_one(tx: AsyncSession) -> bool:
        await release_referrers(tx, model, where)
        if (await tx.exec(sa.delete(model).where(*where))).rowcount == 1:
            return True
        if expected is None or (current := await _current_version(tx, model, key)) is None:
            return False
        raise VersionConflictError(model.__name__, key, current, expected)

    try:
        return await run_in_transaction(session, delete_one)
    except DBAPIError as exc:
        raise refused(exc, model) from None


# -- The kit's User, under the seed's names: thin wrappers -----------------------------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused. (create_users and the other bulk ones are in bulk.py.)


async def create_user(session: AsyncSession, user: User) -> User:
    """``create`` for the kit's ``User``: ``DuplicateEmailError`` for a taken email,
    ``LookupError`` for a ``team_id`` with no team (also one deleted meanwhile)."""
    try:
        return await create(session, user)
    except (AlreadyExistsError, ReferenceNotFoundError) as exc:
        raise user_refusal(exc, user.team_id) from None


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    from .models import User

    return await get(session, User, user_id)


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    """The user with this email, in whatever case or Unicode form it is written."""
    from .models import EMAIL_LENGTH, User, canonical_email

    if len(canonical_email(email)) > EMAIL_LENGTH:
        return None  # longer than any stored email
    return await get_by(session, User, email=email)  # the Email column type canonicalizes


async def get_users(session: AsyncSession, skip: int = 0, limit: int = MAX_PAGE_SIZE) -> list[User]:
    """One page of users in id order. ``0 <= skip``, ``1 <= limit <= 100``."""
    from .models import User

    return await list_page(session, User, skip, limit)


async def count_users(session: AsyncSession) -> int:
    from .models import User

    return await count(session, User)


async def update_user(
    session: AsyncSession,
    user_id: int,
    user_data: Mapping[str, Any] | UserUpdate,
    expected_version: int | Collection[int] | None = None,
) -> User | None:
    """``update`` of a user through ``UserUpdate`` (name, email, is_active, team_id):
    ``DuplicateEmailError`` for another user's email, ``LookupError`` for a team
    that does not exist, ``VersionConflictError`` for a stale ``expected_version``."""
    from .models import User, UserUpdate

    try:
        return await update(
            session, User, user_id, user_data, schema=UserUpdate, expected_version=expected_version
        )
    except (AlreadyExistsError, ReferenceNotFoundError) as exc:
        team_id = exc.values.get("team_id")
        raise user_refusal(exc, team_id) from None


async def delete_user(
    session: AsyncSession, user_id: int, expected_version: int | Collection[int] | None = None
) -> bool:
    """``delete`` of a user, with optimistic locking as ``delete`` has it."""
    from .models import User

    return await delete(session, User, user_id, expected_version=expected_version)
