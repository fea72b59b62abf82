"""Column types and mixins for your own models: import them without the kit's tables.

``models.py`` builds the kit's tables from these; importing this module
registers no table in your metadata. What each one is for:

* ``Email``, ``ExactText`` -- unique text that means one thing on every
  backend: stored canonical (trimmed, NFC; emails lower-case) and compared
  byte for byte. MySQL's default collation would call "José" and "jose " the
  same, and a unique email there would refuse what PostgreSQL accepts.
* ``Money`` -- an exact ``Decimal`` stored as integer cents: SQLite has no
  exact decimal type, and a float turns 0.3 - 0.1 - 0.1 into 0.0999...
* ``VersionMixin`` -- a version column the ORM counts on every UPDATE
  (``version_id_col``): optimistic locking (``locking.py``, ``crud.update``).
* ``TimestampMixin`` -- ``created_at`` and ``updated_at`` set by the server.
* ``UTCDateTime`` -- a time the application sets (a job's ``run_after``), read
  back as an aware UTC ``datetime`` on every backend, to the microsecond.
* ``MutableJSON`` -- a JSON object whose changes in place are saved:
  ``doc.data["k"] = v`` on a plain ``JSON`` column changes the dict the session
  holds, marks nothing, and the commit writes nothing. On a row loaded from the
  database only: SQLModel (0.0.50) keeps the plain ``dict`` of an object you
  construct or assign to, so its in-place changes stay unseen until it is loaded
  again (``flag_modified`` works on both). One level deep only:
  ``doc.data["k"]["x"] = 1`` is still unseen (assign a new value, or
  ``flag_modified(doc, "data")``), and build the new value from a copy: after an
  in-place change, ``doc.data = {**doc.data}`` equals what the session holds, and
  is not written either. ``json_key(Doc.data, "kind")`` addresses a key in a
  query on every backend, or refuses one that cannot be.
* ``TABLE_OPTIONS`` -- utf8mb4 on MySQL, and SQLite ids never reused.
* ``NAMING_CONVENTION`` -- names for unnamed constraints, so an error names
  the same constraint on every backend (``db.constraint_error``): set it on
  your metadata before you declare tables.
"""

import re
import unicodedata
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, String, func, text
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import declared_attr
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

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
    if value.isascii():  # NFC leaves ASCII as it is
        return value.strip()
    return unicodedata.normalize("NFC", value.strip())


def canonical_email(email: str) -> str:
    """The one form an email is stored and looked up in: trimmed, lower-case, NFC.

    Lower-casing can lengthen text ("İ" becomes two characters): check the
    length of the result, not of the input.
    """
    if email.isascii():  # NFC leaves ASCII as it is, and lower() cannot grow it
        return email.strip().lower()
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


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def version_column() -> Any:
    """The field of a version column: 1 for a new row, from the ORM and from the
    server alike (so an INSERT written by hand agrees)."""
    return Field(default=1, sa_column_kwargs={"server_default": text("1")})


def version_mapper_args(cls: Any) -> dict[str, Any]:
    """``__mapper_args__`` naming the table's ``version`` column as the ORM's
    ``version_id_col``. SQLModel makes the Column after the class body runs, so
    this runs later (``declared_attr``), when the table exists."""
    return {"version_id_col": cls.__table__.c.version}


class VersionMixin(SQLModel):
    """A ``version`` column for optimistic locking. Every ORM UPDATE sends
    ``SET version = n + 1 ... WHERE id = ? AND version = n``; no row matched means
    someone else changed (or deleted) it first, and the flush raises
    ``StaleDataError`` (``crud.update`` answers ``VersionConflictError``). The
    column comes first in the table; to place it elsewhere, declare
    ``version: int = version_column()`` and
    ``__mapper_args__ = declared_attr.directive(version_mapper_args)`` yourself,
    as the kit's ``User`` does."""

    version: int = version_column()
    __mapper_args__ = declared_attr.directive(version_mapper_args)


class TimestampMixin(SQLModel):
    """``created_at`` and ``updated_at``, set by the database's clock (not each
    client's): on INSERT, and ``updated_at`` again on every ORM UPDATE. The kit's
    functions load them back after a write (MySQL returns nothing by itself)."""

    created_at: datetime | None = Field(
        default=None,
        sa_type=DateTime(timezone=True),
        sa_column_kwargs={"server_default": func.now()},
    )
    updated_at: datetime | None = Field(
        default=None,
        sa_type=DateTime(timezone=True),
        sa_column_kwargs={"server_default": func.now(), "onupdate": func.now()},
    )


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, written and read as an aware UTC ``datetime`` on every backend.

    PostgreSQL keeps the zone (``timestamptz``); SQLite and MySQL store the UTC
    wall time without one, to the microsecond (MySQL's ``DATETIME(6)``: a plain
    ``DATETIME`` drops the fraction, and a one-second backoff would round away).
    A naive ``datetime`` is refused: which zone it meant is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("a time must be an aware datetime, e.g. datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# A JSON object whose top-level changes mark the row changed (see the module docstring).
MutableJSON = MutableDict.as_mutable(JSON)


def json_key(column: Any, key: str) -> Any:
    """``column[key]`` in a query (then ``.as_string()``, ``.as_integer()``...), for a
    key every backend's JSON path can address. SQLAlchemy writes the key into the
    path unescaped (``$."a"b"``) on SQLite and MySQL: a quote or a backslash makes
    MySQL's path invalid (an error, a 500) and SQLite's match nothing. MariaDB
    (10.11) finds no key that begins with ``-``, quoted or not. Such a key, and an
    empty one or one with NUL, is a ``ValueError`` here."""
    if (
        not isinstance(key, str)
        or not key
        or key.startswith("-")
        or any(c in key for c in '"\\\x00')
    ):
        raise ValueError(
            "a JSON key to query by must be text without quotes or backslashes, "
            f"not beginning with '-': {key!r}"
        )
    return column[key]
