"""Optimistic locking over HTTP: ETag on read, If-Match on write, 412 for a stale copy.

Two clients read user 5, both change it, both save: without a check the
second save silently overwrites the first (a lost update), and no lock held
between a GET and a PATCH could prevent it -- a client may take minutes.
Optimistic locking checks instead of locking:

* Every user row has a ``version`` (``User.version``, SQLAlchemy's
  ``version_id_col``): 1 when inserted, counted up by every write, and every
  ORM UPDATE says ``WHERE id = ? AND version = ?``.
* ``GET /users/5`` answers with an ``ETag`` naming that version (``etag``).
* The client sends it back in ``If-Match`` with its PATCH
  (``update_user_if_match``). The write happens only over that version; a
  client whose copy is stale gets ``crud.VersionConflictError`` -- HTTP 412
  Precondition Failed -- and reads again instead of overwriting.

The ETag is strong (``"user-5-v3"``, not ``W/"..."``): RFC 9110 compares
If-Match with the strong function, so a weak tag could never match. It may
be strong because the version changes whenever the stored row changes and the
JSON answer is a function of the row. Everything that writes users must count
the version up (``crud`` and ``relationships`` do): a write that does not
(SQL by hand, ``ON DELETE SET NULL`` alone) leaves the ETag of the old row.

Needs ``crud.py`` and ``models.py`` (and ``db.py``, ``config.py`` that crud
needs); no web framework: the answers are exceptions, mapped to status codes
by the caller (``api.py``: 400, 404, 412, 428).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from .crud import VersionConflictError, delete_user, update_user
from .models import User, UserUpdate

__all__ = [
    "IfMatch",
    "InvalidIfMatchError",
    "PreconditionRequiredError",
    "VersionConflictError",
    "delete_user_if_match",
    "etag",
    "parse_if_match",
    "update_user_if_match",
]


class InvalidIfMatchError(ValueError):
    """The If-Match header is not ``*`` nor a list of entity tags (HTTP 400)."""


class PreconditionRequiredError(Exception):
    """The write must say which version it changes, and sent no If-Match (HTTP 428)."""


def etag(user: User) -> str:
    """The user's entity tag, quotes included: ``"user-5-v3"`` for version 3 of user 5.

    The id is in it so a tag copied from another user's answer never matches.
    """
    return f'"user-{user.id}-v{user.version}"'


# RFC 9110, section 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, where
# etagc is any visible ASCII but DQUOTE, or obs-text (bytes 0x80-0xFF, which
# Starlette hands over as the Latin-1 characters U+0080-U+00FF).
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_SPACE = " \t"
# Ours: at most 10 digits (the column is a 32-bit INTEGER), so int() stays cheap.
_OUR_TAG = re.compile(r"user-([1-9][0-9]{0,9})-v([1-9][0-9]{0,9})")


@dataclass(frozen=True)
class IfMatch:
    """A parsed If-Match: ``*`` (any current version), or the tags listed."""

    any: bool = False
    tags: tuple[tuple[bool, str], ...] = ()  # (weak, opaque tag without its quotes)

    def versions(self, user_id: int) -> frozenset[int] | None:
        """The versions of ``user_id`` this If-Match accepts; None for ``*`` (any).

        Strong comparison (RFC 9110, 13.1.1): a weak tag matches nothing, nor
        does a tag that is not ours or names another user. An empty set is a
        precondition that cannot hold: the write gets 412 (or 404: no user).
        """
        if self.any:
            return None
        versions = set()
        for weak, tag in self.tags:
            ours = None if weak else _OUR_TAG.fullmatch(tag)
            if ours and int(ours[1]) == user_id:
                versions.add(int(ours[2]))
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


async def update_user_if_match(
    session: AsyncSession,
    user_id: int,
    user_data: Mapping[str, Any] | UserUpdate,
    if_match: str | None,
    *,
    required: bool = False,
) -> User | None:
    """``crud.update_user`` under an If-Match precondition, as RFC 9110 orders it.

    * No If-Match: the last write wins (``crud.update_user``), unless
      ``required``: then ``PreconditionRequiredError`` (428) and nothing is read.
    * Malformed If-Match: ``InvalidIfMatchError`` (400); nothing is read.
    * ``*``: any current version; the write happens if the user exists.
    * Tags: only over a version they name, else ``VersionConflictError`` (412).

    None (404) for a user that does not exist, whatever If-Match says: a
    precondition only decides between writing and 412 (RFC 9110, 13.2.1).
    Otherwise as ``crud.update_user`` (runs in the caller's transaction if it
    began one, else in its own; same refusals).
    """
    versions = _versions(user_id, if_match, required)
    return await update_user(session, user_id, user_data, expected_version=versions)


async def delete_user_if_match(
    session: AsyncSession, user_id: int, if_match: str | None, *, required: bool = False
) -> bool:
    """``crud.delete_user`` under an If-Match precondition: the same rules as
    ``update_user_if_match`` (428, 400, ``*``, 412), and False (404) for a user
    that does not exist. A DELETE is a write: a stale copy must not delete a
    change its client has not seen."""
    versions = _versions(user_id, if_match, required)
    return await delete_user(session, user_id, expected_version=versions)


def _versions(user_id: int, if_match: str | None, required: bool) -> frozenset[int] | None:
    """The versions a write may change; None for any (no If-Match, or ``*``)."""
    if if_match is None:
        if required:
            raise PreconditionRequiredError(
                f"Send If-Match with the ETag of the user as you read it (GET /users/{user_id}), "
                "so that your change cannot overwrite one you have not seen"
            )
        return None
    return parse_if_match(if_match).versions(user_id)
