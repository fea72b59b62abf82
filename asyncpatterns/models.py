"""One coherent model set for every pattern: User, Team, Account, Profile.

* Relationships are ``lazy="raise"``: touching one that was not eager-loaded
  raises at once with the attribute's name, instead of a ``MissingGreenlet``
  from deep inside the driver. Load with ``selectinload``/``joinedload``, or opt
  in per query with ``lazyload(...)`` and ``await obj.awaitable_attrs.name``.
* Deleting a team keeps its members, with ``team_id`` set to NULL by the
  database (``ondelete="SET NULL"``), identically on all three backends.
* Money is exact: ``Decimal`` in Python, integer cents in the database (the
  ``Money`` type). Floats are refused, so 0.3 - 0.1 - 0.1 is exactly 0.1.
* ``UserCreate``/``UserUpdate`` are the only way user input reaches a ``User``:
  unknown and read-only fields are rejected, types are not coerced.
* One identity per value, on every backend: an email is stored and compared
  in one canonical form (``canonical_email``) whatever path stores it, and
  unique text compares byte for byte (MySQL's default collation would call
  "José" and "jose " the same). Tables are utf8mb4 on MySQL, and SQLite never
  reuses the id of a deleted row (``AUTOINCREMENT``), like the servers.
"""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Optional

from pydantic import ConfigDict, field_validator
from sqlalchemy import JSON, CheckConstraint, Index, Text, event, false
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import declared_attr
from sqlmodel import Field, Relationship, SQLModel

from .columns import (  # noqa: F401  (the kit's callers import these from models too)
    CENT,
    EMAIL_LENGTH,
    EMAIL_PATTERN,
    MAX_CENTS,
    MAX_ID,
    TABLE_OPTIONS,
    TEXT_PATTERN,
    Email,
    ExactText,
    Money,
    UTCDateTime,
    canonical_email,
    canonical_text,
    checked_email,
    checked_name,
    to_cents,
    version_column,
    version_mapper_args,
)


class Team(AsyncAttrs, SQLModel, table=True):
    __table_args__ = TABLE_OPTIONS

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, unique=True, sa_type=ExactText(100))

    # Members survive their team: the database sets their team_id to NULL.
    members: list["User"] = Relationship(
        back_populates="team",
        passive_deletes=True,
        sa_relationship_kwargs={"lazy": "raise", "order_by": "User.id"},
    )


class UserBase(SQLModel):
    name: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})
    email: str = Field(max_length=255, schema_extra={"pattern": EMAIL_PATTERN})


class User(AsyncAttrs, UserBase, table=True):
    # (name, id): keyset pages by name start at an index seek (pagination.py)
    __table_args__ = (Index("ix_user_name_id", "name", "id"), TABLE_OPTIONS)

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=EMAIL_LENGTH, unique=True, index=True, sa_type=Email(255))
    is_active: bool = Field(default=True)
    team_id: int | None = Field(
        default=None, foreign_key="team.id", ondelete="SET NULL", index=True
    )
    # Optimistic locking (columns.VersionMixin explains it), last of the columns.
    version: int = version_column()
    __mapper_args__ = declared_attr.directive(version_mapper_args)
    team: Team | None = Relationship(
        back_populates="members", sa_relationship_kwargs={"lazy": "raise"}
    )
    profile: Optional["Profile"] = Relationship(
        back_populates="user",
        passive_deletes=True,
        sa_relationship_kwargs={"lazy": "raise", "uselist": False},
    )


class Profile(AsyncAttrs, SQLModel, table=True):
    __table_args__ = TABLE_OPTIONS

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", unique=True)
    bio: str = Field(default="", max_length=500)

    user: User | None = Relationship(
        back_populates="profile", sa_relationship_kwargs={"lazy": "raise"}
    )


class Account(SQLModel, table=True):
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        TABLE_OPTIONS,
    )

    id: int | None = Field(default=None, primary_key=True)
    owner: str = Field(max_length=100)
    balance: Decimal = Field(default=Decimal("0.00"), sa_type=Money)
    # New accounts start unverified. Accounts opened before this column existed were
    # verified the old way: migration 0002 marks them verified.
    is_verified: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class IdempotencyKey(SQLModel, table=True):
    """The answer to a money-moving request, kept under the key the client sent.

    Stored in the same transaction as the transfer, so a retry with the same
    key finds either nothing (the transfer did not happen) or this answer.
    It expires ``created_at`` + the TTL later (``api.idempotency``): then the key
    is new again, and the purge deletes the row.
    """

    __table_args__ = TABLE_OPTIONS

    key: str = Field(primary_key=True, max_length=255, sa_type=ExactText(255))
    request: str = Field(max_length=64)  # SHA-256 of the request, to refuse a reused key
    status_code: int
    response: str = Field(sa_type=Text)  # the JSON answered
    # UTC (stored without a zone on SQLite and MySQL, to the second on MySQL).
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


# The column types store canonical values whatever the path; these keep the Python
# object equal to what the database holds after a flush (or a bulk insert).
@event.listens_for(User, "before_insert")
@event.listens_for(User, "before_update")
def _canonical_email(_mapper: Any, _connection: Any, user: User) -> None:
    email = user.email
    if email is not None and (canonical := Email.canonical(email)) != email:
        user.email = canonical  # an assignment is an attribute event: only when it changes


@event.listens_for(Team, "before_insert")
@event.listens_for(Team, "before_update")
def _canonical_name(_mapper: Any, _connection: Any, team: Team) -> None:
    name = team.name
    if name is not None and (canonical := canonical_text(name)) != name:
        team.name = canonical


class _StrictInput(SQLModel):
    # Unknown keys are an error, and "123" is not silently an int (nor 123 a str).
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("email", check_fields=False)
    @classmethod
    def _canonical_email(cls, email: str | None) -> str | None:
        return None if email is None else checked_email(email)

    @field_validator("name", check_fields=False)
    @classmethod
    def _canonical_name(cls, name: str | None) -> str | None:
        return None if name is None else checked_name(name)


class UserCreate(_StrictInput, UserBase):
    team_id: int | None = Field(default=None, ge=1, le=MAX_ID)


class UserRead(UserBase):
    id: int
    is_active: bool
    team_id: int | None
    version: int


class UserUpdate(_StrictInput):
    """Only these fields can change; omit a field to leave it as it is.

    ``name``, ``email`` and ``is_active`` may be omitted but not set to null;
    ``team_id`` may be null (leave the team).
    """

    name: str | None = Field(
        default=None, min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN}
    )
    email: str | None = Field(default=None, max_length=255, schema_extra={"pattern": EMAIL_PATTERN})
    is_active: bool | None = None
    team_id: int | None = Field(default=None, ge=1, le=MAX_ID)

    @field_validator("name", "email", "is_active")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may be omitted but not null")
        return value


class Job(SQLModel, table=True):
    """A unit of background work, claimed by one worker at a time under a lease (``jobs.py``).

    ``state``: queued -> running (claimed; ``locked_until`` is the lease) -> done, or
    back to queued after a failure (``run_after``: the backoff), or dead after the
    last attempt (``last_error`` says why). ``attempts`` counts claims, the one
    running included. Any table with these columns works with ``jobs.py``.
    """

    __table_args__ = (
        Index("ix_job_state_run_after", "state", "run_after"),
        Index("ix_job_state_locked_until", "state", "locked_until"),
        TABLE_OPTIONS,
    )

    id: int | None = Field(default=None, primary_key=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    state: str = Field(default="queued", max_length=16)
    attempts: int = Field(default=0)
    run_after: datetime = Field(default_factory=lambda: datetime.now(UTC), sa_type=UTCDateTime)
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, sa_type=Text)


class Outbox(SQLModel, table=True):
    """An event to publish, written in the transaction of the change it announces (``outbox.py``).

    ``sent_at`` is null until a relay has published it. ``locked_until``: the relay's
    lease while it publishes, or the backoff after a failed publish (``last_error``
    says why); ``attempts`` counts claims. The index serves the relay's claim (the
    oldest unsent events: ``sent_at IS NULL``, in id order) and the purge (sent
    before a cutoff). Any table with these columns works with ``outbox.py``.
    """

    __table_args__ = (Index("ix_outbox_sent_at_id", "sent_at", "id"), TABLE_OPTIONS)

    id: int | None = Field(default=None, primary_key=True)
    topic: str = Field(max_length=100)
    key: str | None = Field(default=None, max_length=255)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC), sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    attempts: int = Field(default=0)
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, sa_type=Text)
