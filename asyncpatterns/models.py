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

import re
import unicodedata
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Optional

from pydantic import ConfigDict, field_validator
from sqlalchemy import BigInteger, CheckConstraint, String, Text, event, false, text
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import declared_attr
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Relationship, SQLModel

CENT = Decimal("0.01")
# PostgreSQL cannot store NUL characters in text: refuse them on input, everywhere.
TEXT_PATTERN = r"^[^\x00]*$"
EMAIL_PATTERN = r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$"
# Primary and foreign keys are 32-bit INTEGER columns on PostgreSQL and MySQL.
MAX_ID = 2**31 - 1
EMAIL_LENGTH = 255
# Money is stored as cents in a signed 64-bit BIGINT.
MAX_CENTS = 2**63 - 1
# Every table: utf8mb4 on MySQL whatever the database's default charset, and
# AUTOINCREMENT on SQLite so a deleted row's id is never handed out again.
TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "sqlite_autoincrement": True}


def canonical_text(value: str) -> str:
    """One Unicode form for text compared for identity: NFC, no outer whitespace."""
    return unicodedata.normalize("NFC", value.strip())


def canonical_email(email: str) -> str:
    """The one form an email is stored and looked up in: trimmed, lower-case, NFC.

    Lower-casing can lengthen text ("İ" becomes two characters): check the
    length of the result, not of the input.
    """
    return canonical_text(email.strip().lower())


def checked_name(name: str, max_length: int = 100) -> str:
    """A name as it will be stored (``canonical_text``), checked after the change:
    not blank, and at most ``max_length`` characters once normalized (NFC can
    lengthen text: "\u0958" becomes two characters)."""
    name = canonical_text(name)
    if not name:
        raise ValueError("may not be blank")
    if len(name) > max_length:
        raise ValueError(f"at most {max_length} characters once normalized")
    return name


def checked_email(email: str) -> str:
    """An email as it will be stored (``canonical_email``), checked after the change:
    still email-shaped (trimming can remove a whole part: "\x1c@example.com"),
    and at most 255 characters once lower-cased."""
    email = canonical_email(email)
    if not re.fullmatch(EMAIL_PATTERN, email):
        raise ValueError("not an email address once trimmed")
    if len(email) > EMAIL_LENGTH:
        raise ValueError(f"at most {EMAIL_LENGTH} characters once lower-cased")
    return email


class ExactText(TypeDecorator[str]):
    """Text equal only to itself on every backend, stored in canonical form.

    MySQL's default collations ignore case, accents and trailing spaces, so a
    unique column there refuses values PostgreSQL and SQLite accept: here it
    uses the binary collation. Values are stored as ``canonical_text`` gives them.
    """

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "mysql":
            binary = mysql.VARCHAR(self.impl.length, charset="utf8mb4", collation="utf8mb4_bin")
            return dialect.type_descriptor(binary)
        return dialect.type_descriptor(String(self.impl.length))

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else self.canonical(value)

    @staticmethod
    def canonical(value: str) -> str:
        return canonical_text(value)


class Email(ExactText):
    """An email column: compared exactly, stored as ``canonical_email`` gives it."""

    cache_ok = True

    @staticmethod
    def canonical(value: str) -> str:
        email = canonical_email(value)
        if len(email) > EMAIL_LENGTH:
            raise ValueError(f"email is longer than {EMAIL_LENGTH} characters once lower-cased")
        return email


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
    """``Decimal("12.34")`` -> 1234, exactly. Raises ``TypeError`` for float,
    ``ValueError`` for a fraction of a cent (however far down), NaN, infinity,
    or more than a BIGINT of cents.

    Integer arithmetic on the digits: ``Decimal`` arithmetic would first round
    to 28 digits, so 12.3400000000000000000000000001 would pass as 12.34.
    """
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, int)):
        raise TypeError(f"money must be Decimal or int, not {type(amount).__name__}")
    amount = Decimal(amount)
    if not amount.is_finite():
        raise ValueError(f"{amount} is not a finite amount of money")
    if not amount:
        return 0
    if amount.adjusted() > 17:
        raise ValueError(f"{amount} is too large an amount of money")
    sign, digits, exponent = amount.as_tuple()
    coefficient, shift = int("".join(map(str, digits))), int(exponent) + 2
    if shift >= 0:
        cents = coefficient * 10**shift
    elif -shift > len(digits) or coefficient % 10**-shift:
        raise ValueError(f"{amount} is not a whole number of cents")
    else:
        cents = coefficient // 10**-shift
    if cents > MAX_CENTS:
        raise ValueError(f"{amount} is too large an amount of money")
    return -cents if sign else cents


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
    __table_args__ = TABLE_OPTIONS

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=EMAIL_LENGTH, unique=True, index=True, sa_type=Email(255))
    is_active: bool = Field(default=True)
    team_id: int | None = Field(
        default=None, foreign_key="team.id", ondelete="SET NULL", index=True
    )
    # Optimistic locking: 1 for a new row (the ORM's default and the server's, so
    # an INSERT written by hand agrees), and every ORM UPDATE sends
    # ``SET version = n + 1 ... WHERE id = ? AND version = n``. No row matched:
    # someone else changed (or deleted) it first, and the flush raises StaleDataError.
    version: int = Field(default=1, sa_column_kwargs={"server_default": text("1")})

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        # SQLModel makes the Column after the class body runs: name it here, when
        # the table exists. The ORM then counts versions itself.
        return {"version_id_col": cls.__table__.c.version}

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
    """

    __table_args__ = TABLE_OPTIONS

    key: str = Field(primary_key=True, max_length=255, sa_type=ExactText(255))
    request: str = Field(max_length=64)  # SHA-256 of the request, to refuse a reused key
    status_code: int
    response: str = Field(sa_type=Text)  # the JSON answered
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


@event.listens_for(User, "before_insert")
@event.listens_for(User, "before_update")
@event.listens_for(Team, "before_insert")
@event.listens_for(Team, "before_update")
def _keep_objects_canonical(_mapper: Any, _connection: Any, target: Any) -> None:
    # The column types store canonical values whatever the path; this keeps the
    # Python object equal to what the database holds after a flush.
    if isinstance(target, User) and target.email is not None:
        target.email = Email.canonical(target.email)
    elif isinstance(target, Team) and target.name is not None:
        target.name = canonical_text(target.name)


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
