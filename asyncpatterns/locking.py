"""Optimistic locking over HTTP: ETag on read, If-Match on write, 412 for a stale copy.

Two clients read user 5, both change it, both save: without a check the
second save silently overwrites the first (a lost update), and no lock held
between a GET and a PATCH could prevent it -- a client may take minutes.
Optimistic locking checks instead of locking:

* Every row of a versioned model has a version column (SQLAlchemy's
  ``version_id_col``; the kit's ``User.version``, ``models.VersionMixin``):
  1 when inserted, counted up by every write, and every ORM UPDATE says
  ``WHERE id = ? AND version = ?``.
* ``GET /users/5`` answers with an ``ETag`` naming that version (``etag``).
* The client sends it back in ``If-Match`` with its PATCH (``update_if_match``).
  The write happens only over that version; a client whose copy is stale gets
  ``crud.VersionConflictError`` -- HTTP 412 Precondition Failed -- and reads
  again instead of overwriting.

The ETag is strong (``"user-5-v3"``, not ``W/"..."``): RFC 9110 compares
If-Match with the strong function, so a weak tag could never match. It may
be strong because the version changes whenever the stored row changes and the
JSON answer is a function of the row. Everything that writes users must count
the version up (``crud`` and ``bulk`` do): a write that does not (SQL by hand,
``ON DELETE SET NULL`` alone) leaves the ETag of the old row.

Works on any model with a version column. Needs ``crud.py`` (with what it
needs); no web framework: the answers are exceptions, mapped to status codes
by the caller (``api``: 400, 404, 412, 428).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel
from sqlalchemy import inspect as sa_inspect
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .crud import VersionConflictError, delete, update, update_user

if TYPE_CHECKING:
    from .models import User, UserUpdate

M = TypeVar("M", bound=SQLModel)

__all__ = [
    "IfMatch",
    "InvalidIfMatchError",
    "PreconditionRequiredError",
    "VersionConflictError",
    "delete_if_match",
    "delete_user_if_match",
    "etag",
    "parse_if_match",
    "update_if_match",
    "update_user_if_match",
]


class InvalidIfMatchError(ValueError):
    """The If-Match header is not ``*`` nor a list of entity tags (HTTP 400)."""


class PreconditionRequiredError(Exception):
    """The write must say which version it changes, and sent no If-Match (HTTP 428)."""


def etag(obj: SQLModel) -> str:
    """The row's entity tag, quotes included: ``"user-5-v3"`` for version 3 of user 5.

    The table and the key are in it, so a tag copied from another row's answer
    never matches.
    """
    mapper = sa_inspect(type(obj))
    if mapper.version_id_col is None:
        raise ValueError(f"{type(obj).__name__} has no version column: no ETag to give")
    key = mapper.primary_key_from_instance(obj)
    version = getattr(obj, mapper.get_property_by_column(mapper.version_id_col).key)
    return f'"{_tag_name(mapper.local_table.name, key)}-v{version}"'


def _tag_name(table: str, key: Any) -> str:
    keys = key if isinstance(key, tuple | list) else (key,)
    return quote(table, safe="") + "-" + ",".join(quote(str(k), safe="") for k in keys)


# RFC 9110, section 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, where
# etagc is any visible ASCII but DQUOTE, or obs-text (bytes 0x80-0xFF, which
# Starlette hands over as the Latin-1 characters U+0080-U+00FF).
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_SPACE = " \t"
# A version: at most 10 digits (the column is a 32-bit INTEGER), so int() stays cheap.
_VERSION = re.compile(r"[1-9][0-9]{0,9}")


@dataclass(frozen=True)
class IfMatch:
    """A parsed If-Match: ``*`` (any current version), or the tags listed."""

    any: bool = False
    tags: tuple[tuple[bool, str], ...] = ()  # (weak, opaque tag without its quotes)

    def versions(self, model: type[SQLModel], key: Any) -> frozenset[int] | None:
        """The versions of the ``model`` row with this key that this If-Match
        accepts; None for ``*`` (any).

        Strong comparison (RFC 9110, 13.1.1): a weak tag matches nothing, nor
        does a tag that is not ours or names another row. An empty set is a
        precondition that cannot hold: the write gets 412 (or 404: no row).
        """
        if self.any:
            return None
        name = _tag_name(sa_inspect(model).local_table.name, key)
        versions = set()
        for weak, tag in self.tags:
            head, _, version = tag.rpartition("-v")
            if not weak and head == name and _VERSION.fullmatch(version):
                versions.add(int(version))
        return frozenset(versions)


def parse_if_match(value: str) -> IfMatch:
    """Parse an If-Match field value (several header lines: joined with ", ").

    ``*`` alone, or a comma-separated list of entity tags, each ``"..."`` or
    ``W/"..."``; empty list elements are skipped, as RFC 9110 (5.6.1) asks, so
    an empty value is a list of no tags, which nothing matches. Anything else
    -- an unquoted tag, ``*`` in a list, ``w/`` in lower case, a stray
    character -- is ``InvalidIfMatchError``. One pass, no backtracking: a
    megabyte of header costs a megabyte of scanning, no more.
    """
    if value.strip(_SPACE) == "*":
        return IfMatch(any=True)
    tags = []
    position, end = 0, len(value)
    while True:
        while position < end and value[position] in _SPACE + ",":
            position += 1  # whitespace and empty list elements
        if position == end:
            return IfMatch(tags=tuple(tags))
        tag = _ENTITY_TAG.match(value, position)
        if tag is None:
            raise InvalidIfMatchError(
                f"If-Match must be * or a list of entity tags such as {_EXAMPLE}; "
                f"character {position + 1} is not the start of one"
            )
        tags.append((tag[1] is not None, tag[2]))
        position = tag.end()
        while position < end and value[position] in _SPACE:
            position += 1
        if position < end and value[position] != ",":
            raise InvalidIfMatchError(
                f"If-Match entity tags are separated by commas; character {position + 1} "
                "follows a tag and is not one"
            )


_EXAMPLE = '"user-5-v3"'


async def update_if_match(
    session: AsyncSession,
    model: type[M],
    key: Any,
    changes: Mapping[str, Any] | BaseModel,
    if_match: str | None,
    *,
    required: bool = False,
    schema: type[BaseModel] | None = None,
) -> M | None:
    """``crud.update`` under an If-Match precondition, as RFC 9110 orders it.

    * No If-Match: the last write wins (``crud.update``), unless ``required``:
      then ``PreconditionRequiredError`` (428) and nothing is read.
    * Malformed If-Match: ``InvalidIfMatchError`` (400); nothing is read.
    * ``*``: any current version; the write happens if the row exists.
    * Tags: only over a version they name, else ``VersionConflictError`` (412).

    None (404) for a row that does not exist, whatever If-Match says: a
    precondition only decides between writing and 412 (RFC 9110, 13.2.1).
    Otherwise as ``crud.update`` (runs in the caller's transaction if it
    began one, else in its own; same refusals).
    """
    versions = _versions(model, key, if_match, required)
    return await update(session, model, key, changes, schema=schema, expected_version=versions)


async def delete_if_match(
    session: AsyncSession,
    model: type[SQLModel],
    key: Any,
    if_match: str | None,
    *,
    required: bool = False,
) -> bool:
    """``crud.delete`` under an If-Match precondition: the same rules as
    ``update_if_match`` (428, 400, ``*``, 412), and False (404) for a row that
    does not exist. A DELETE is a write: a stale copy must not delete a change
    its client has not seen."""
    versions = _versions(model, key, if_match, required)
    return await delete(session, model, key, expected_version=versions)


def _versions(
    model: type[SQLModel], key: Any, if_match: str | None, required: bool
) -> frozenset[int] | None:
    """The versions a write may change; None for any (no If-Match, or ``*``)."""
    if if_match is None:
        if required:
            raise PreconditionRequiredError(
                "Send If-Match with the ETag of the row as you read it (its GET), "
                "so that your change cannot overwrite one you have not seen"
            )
        return None
    return parse_if_match(if_match).versions(model, key)


# -- The kit's users, under the seed's names: thin wrappers -----------------------------


async def update_user_if_match(
    session: AsyncSession,
    user_id: int,
    user_data: Mapping[str, Any] | UserUpdate,
    if_match: str | None,
    *,
    required: bool = False,
) -> User | None:
    """``update_if_match`` of a user through ``UserUpdate``, with ``crud.update_user``'s
    refusals (``DuplicateEmailError``, ``LookupError``)."""
    from .models import User

    versions = _versions(User, user_id, if_match, required)
    return await update_user(session, user_id, user_data, expected_version=versions)


async def delete_user_if_match(
    session: AsyncSession, user_id: int, if_match: str | None, *, required: bool = False
) -> bool:
    """``delete_if_match`` of a user."""
    from .models import User

    return await delete_if_match(session, User, user_id, if_match, required=required)
