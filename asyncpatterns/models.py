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
  unknown and read-only fields are rejected, types are not coerced, emails are
  stored lower-case so uniqueness does not depend on the backend's collation.
"""

from decimal import Decimal
from typing import Any, Optional

from pydantic import ConfigDict, field_validator
from sqlalchemy import BigInteger, CheckConstraint
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Relationship, SQLModel

CENT = Decimal("0.01")
# PostgreSQL cannot store NUL characters in text: refuse them on input, everywhere.
TEXT_PATTERN = r"^[^\x00]*$"
EMAIL_PATTERN = r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$"
# Primary and foreign keys are 32-bit INTEGER columns on PostgreSQL and MySQL.
MAX_ID = 2**31 - 1


class Money(TypeDecorator[Decimal]):
    """A ``Decimal`` amount stored as whole cents in a BIGINT column.

    Exact on every backend (SQLite has no exact decimal type), and the same
    SQL everywhere. Floats and fractions of a cent are refused, not rounded.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> int | None:
        return None if value is None else to_cents(value)

    def process_result_value(self, value: Any, dialect: Any) -> Decimal | None:
        return None if value is None else (Decimal(value) * CENT).quantize(CENT)


def to_cents(amount: Decimal | int) -> int:
    """``Decimal("12.34")`` -> 1234. Raises ``TypeError`` for float, ``ValueError``
    for a fraction of a cent or a non-finite number."""
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, int)):
        raise TypeError(f"money must be Decimal or int, not {type(amount).__name__}")
    cents = Decimal(amount) * 100
    if not cents.is_finite() or cents != cents.to_integral_value():
        raise ValueError(f"{amount} is not a whole number of cents")
    return int(cents)


class Team(AsyncAttrs, SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, unique=True)

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
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=255, unique=True, index=True)
    is_active: bool = Field(default=True)
    team_id: int | None = Field(
        default=None, foreign_key="team.id", ondelete="SET NULL", index=True
    )

    team: Team | None = Relationship(
        back_populates="members", sa_relationship_kwargs={"lazy": "raise"}
    )
    profile: Optional["Profile"] = Relationship(
        back_populates="user",
        passive_deletes=True,
        sa_relationship_kwargs={"lazy": "raise", "uselist": False},
    )


class Profile(AsyncAttrs, SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", unique=True)
    bio: str = Field(default="", max_length=500)

    user: User | None = Relationship(
        back_populates="profile", sa_relationship_kwargs={"lazy": "raise"}
    )


class Account(SQLModel, table=True):
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    id: int | None = Field(default=None, primary_key=True)
    owner: str = Field(max_length=100)
    balance: Decimal = Field(default=Decimal("0.00"), sa_type=Money)


class _StrictInput(SQLModel):
    # Unknown keys are an error, and "123" is not silently an int (nor 123 a str).
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("email", check_fields=False)
    @classmethod
    def _lower_case_email(cls, email: str | None) -> str | None:
        return None if email is None else email.strip().lower()


class UserCreate(_StrictInput, UserBase):
    team_id: int | None = Field(default=None, ge=1, le=MAX_ID)


class UserRead(UserBase):
    id: int
    is_active: bool
    team_id: int | None


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
