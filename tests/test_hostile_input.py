"""Hostile input, property-based: whatever a client sends, the API answers a
success or a 4xx with a JSON ``detail`` -- never a 5xx -- and stores only what
it accepted, in canonical form.

hypothesis generates every request the API takes: the bodies of POST /users/,
PATCH /users/{id}, POST /teams/, POST /accounts/ and POST /transfers/, the
``skip``/``limit`` query parameters, path ids and the ``Idempotency-Key``
header. The values cover the full Unicode range including lone surrogates
(sent as ``\\udXXX`` escapes in raw JSON text, or as their invalid UTF-8
bytes), strings at and just past every ``max_length`` (100, 255, 500), text
that lower-casing or NFC makes longer, NUL and other control characters,
whitespace-only text, numbers at and just past every bound (ids around 2**31,
amounts around 10**13 and 0.01, exponent forms, NaN and Infinity tokens),
wrong types, missing and unknown keys, malformed JSON and non-UTF-8 bytes.

After each request the database is read back: a refused request stored
nothing; an accepted one stored exactly what it answered; every stored email
is canonical (trimmed, lower-case, NFC, at most 255 characters) and every
name canonical, not blank and at most 100 characters.

hypothesis runs many examples inside one test call, so the per-test
``client`` fixture would carry one example's rows into the next. Each example
here gets the same isolation that fixture gives a test: the test's rows
(seeded once) live in a transaction that is never committed, each example runs
inside a SAVEPOINT rolled back afterwards, and each request gets its own
session joined to that transaction. The tests are async functions under
``@given``: pytest-asyncio runs each example on the session's event loop, the
one the engine lives on. Transfers are also retried: with a valid
``Idempotency-Key`` the same request gets the same answer and moves money
once, another request under that key is a 422.

The run is bounded and derandomized; to search longer, raise the number of
examples per test, e.g.

    ASYNCPATTERNS_FUZZ_EXAMPLES=1000 pytest tests/test_hostile_input.py

Each defect these properties found first also keeps an explicit regression
test at the end of this module.
"""

import email.message
import json
import math
import operator
import os
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, event, find, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.api import get_session
from asyncpatterns.models import EMAIL_LENGTH, MAX_ID, canonical_email, canonical_text

EXAMPLES = int(os.environ.get("ASYNCPATTERNS_FUZZ_EXAMPLES", "50"))

HOSTILE = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        # The fixtures hold the test's transaction; each example isolates itself in a savepoint.
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

NAME_LENGTH = 100  # User.name, Team.name, Account.owner
KEY_LENGTH = 255  # Idempotency-Key
BIO_LENGTH = 500  # Profile.bio: no endpoint writes it, but the lengths are generated anyway
LENGTHS = (NAME_LENGTH, EMAIL_LENGTH, BIO_LENGTH)

# The API's patterns are checked by pydantic's Rust regex engine, where \s is Unicode
# White_Space: U+001C..U+001F are not in it, although Python's str.strip() removes them.
RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
RUST_WHITESPACE += "\u2028\u2029\u202f\u205f\u3000"
_NOT_IN_EMAIL = re.escape("@\x00" + RUST_WHITESPACE)
EMAIL_SHAPE = re.compile(rf"[^{_NOT_IN_EMAIL}]+@[^{_NOT_IN_EMAIL}]+\.[^{_NOT_IN_EMAIL}]+")
KEY_SHAPE = re.compile(r"[\x21-\x7e]{1,255}")


# -- Requests: JSON templates with raw tokens and seeded ids, sent as bytes ------------


@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is: ``1e2``, ``NaN``, ``-Infinity``, a 5,000-digit number."""

    text: str

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


@dataclass(frozen=True)
class Seeded:
    """The id of a row seeded for the test (ids differ per backend and per test)."""

    name: str


SEEDED = ("team", "user", "other_user", "account", "rich_account", "empty_account")
DUMMY_IDS = dict.fromkeys(SEEDED, 1)
NO_BODY = object()


def to_json(value: Any, ids: dict[str, int], ascii_only: bool) -> str:
    """JSON text for ``value``. Unlike json.dumps it passes Raw tokens through and
    takes integers of any size; lone surrogates stay escapes or become raw code units."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Seeded):
        return str(ids[value.name])
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity as JSON tokens
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(to_json(item, ids, ascii_only) for item in value) + "]"
    if isinstance(value, dict):
        items = (
            f"{to_json(key, ids, ascii_only)}: {to_json(item, ids, ascii_only)}"
            for key, item in value.items()
        )
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no JSON for {value!r}")


def path_segment(value: str) -> str:
    """Any text as one percent-encoded path segment; a lone surrogate as its UTF-8 bytes."""
    return quote_from_bytes(value.encode("utf-8", "surrogatepass"), safe="")


@dataclass(frozen=True)
class Call:
    """One request. ``body`` is a JSON template (sent as JSON text), ``raw_body`` bytes sent as
    they are; ``content_type`` None sends no Content-Type header."""

    method: str
    route: str  # the endpoint, e.g. "/users/{id}"
    path_id: Any = None  # Seeded, or the text of the path segment
    query: tuple[str, ...] = ()  # "name=value" pairs, texts percent-encoded when sent
    body: Any = NO_BODY
    raw_body: bytes | None = None
    ascii_json: bool = True  # False: non-ASCII as UTF-8, lone surrogates as invalid bytes
    content_type: str | None = "application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def url(self, ids: dict[str, int]) -> str:
        path = self.route
        if "{id}" in path:
            segment = self.path_id
            text = str(ids[segment.name]) if isinstance(segment, Seeded) else segment
            path = path.replace("{id}", path_segment(text))
        if self.query:
            pairs = (pair.partition("=") for pair in self.query)
            query = "&".join(
                path_segment(name) + (f"={path_segment(value)}" if sep else "")
                for name, sep, value in pairs
            )
            path += "?" + query
        return path

    def content(self, ids: dict[str, int]) -> bytes | None:
        if self.raw_body is not None:
            return self.raw_body
        if self.body is NO_BODY:
            return None
        return to_json(self.body, ids, self.ascii_json).encode("utf-8", "surrogatepass")

    def parsed(self, ids: dict[str, int] = DUMMY_IDS) -> Any:
        """The JSON value the server reads from the body (NO_BODY if it reads none)."""
        content = self.content(ids)
        if not content or not parses_as_json(self.content_type):
            return NO_BODY
        try:
            return json.loads(content)
        except (ValueError, RecursionError):
            return NO_BODY

    def all_headers(self) -> list[tuple[bytes, bytes]]:
        headers = list(self.headers)
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        return headers


def parses_as_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body with this Content-Type as JSON (as it decides it)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


# -- Strategies: text ---------------------------------------------------------------------

# The whole code space, lone surrogates (category Cs) included.
ANY_CHARACTER = st.characters(exclude_categories=())
# Text a name or an email part may hold: anything but NUL and lone surrogates.
STORABLE = st.characters(exclude_characters="\x00")
SURROGATES = st.characters(categories=["Cs"])
WHITESPACE = RUST_WHITESPACE + "\x1c\x1d\x1e\x1f"  # everything str.strip() removes
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"  # not whitespace to str.strip()
CONTROLS = "".join(map(chr, range(0x20))) + "".join(map(chr, range(0x7F, 0xA0)))
# Lower-casing makes "İ" two characters; NFC makes U+0958, U+2ADC and U+1D15E two, U+FB2C three.
GROWING = "İ\u0958\u2adc\ufb2c\U0001d15e"
# Repeated to a length: characters of 1 to 4 bytes in UTF-8, ones that grow, a combining
# sequence and an emoji ZWJ sequence (cut wherever the length falls).
UNITS = ("a", "é", "\u20ac", "\U0001f600", "İ", "\u0958", "e\u0301", "\U0001f469\u200d\U0001f467")
SPECIAL_TEXT = (
    "",
    "İ",
    "ß",
    "ﬃ",
    "ǅ",
    "\u212a",  # KELVIN SIGN: lower-cases to "k"
    "\u2126",  # OHM SIGN: NFC is the Greek capital omega
    "\ufffd",
    "\ufffe",
    "\uffff",
    "\U0010ffff",
    "\ud800",
    "\udfff",
    "\udbff\udfff",  # a surrogate pair spelled as two escapes: one valid character
    "\udfff\udbff",  # the same two, reversed: two lone surrogates
    "a\x00b",
    "\x00",
    "null",
    "NaN",
    "0",
    "' OR 1=1 --",
    "\\",
    '"',
    "%00",
    "\u202eevil",  # right-to-left override
)


def exactly(length: int) -> st.SearchStrategy[str]:
    """Text of exactly ``length`` code points, from one repeated unit."""
    return st.sampled_from(UNITS).map(lambda unit: (unit * length)[:length])


def around(limit: int) -> st.SearchStrategy[str]:
    """Text at and just past ``limit`` code points, some of it padded with whitespace."""
    sized = st.sampled_from([limit - 1, limit, limit + 1]).flatmap(exactly)
    padded = st.tuples(st.sampled_from(" \t\x1c\u3000"), exactly(limit)).map(
        lambda pad_text: pad_text[0] + pad_text[1][1:] + pad_text[0]
    )
    return st.one_of(sized, padded)


def grown(limit: int) -> st.SearchStrategy[str]:
    """Up to ``limit`` characters that lower-casing or NFC lengthens (one repeated), most
    often just over half the limit or at it, so that the longer form is past it."""
    counts = st.sampled_from([limit // 2 + 1, limit - 1, limit])
    return st.builds(
        operator.mul, st.sampled_from(GROWING), st.one_of(counts, st.integers(1, limit))
    )


EDGE_CHARACTERS = WHITESPACE + INVISIBLE + CONTROLS + GROWING


def pieces() -> st.SearchStrategy[str]:
    """A short run of ordinary or hostile text, to be joined with others."""
    return st.one_of(
        st.text(STORABLE, min_size=1, max_size=8),
        st.text(st.sampled_from(EDGE_CHARACTERS), min_size=1, max_size=4),
        # Whitespace to str.strip(), not to the \s of the API's patterns.
        st.text(st.sampled_from("\x1c\x1d\x1e\x1f"), min_size=1, max_size=2),
        st.text(SURROGATES, min_size=1, max_size=2),
        st.sampled_from(SPECIAL_TEXT),
    )


def hostile_text(limit: int) -> st.SearchStrategy[str]:
    """Text for a field of at most ``limit`` characters: any Unicode, lone surrogates
    included, mixtures of the edge cases, and lengths at and past every bound."""
    return st.one_of(
        st.lists(pieces(), min_size=1, max_size=4).map("".join),
        st.text(ANY_CHARACTER, max_size=24),
        st.text(st.sampled_from(WHITESPACE), min_size=1, max_size=6),
        st.text(st.sampled_from(WHITESPACE + INVISIBLE), min_size=1, max_size=6),
        st.text(st.sampled_from(CONTROLS), min_size=1, max_size=6),
        grown(limit),
        st.sampled_from(LENGTHS).flatmap(around),
        around(limit),
    )


def mutated(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A value with a hostile piece put before it, after it, in its middle, or instead."""

    def mutate(value: str, piece: str, where: str) -> str:
        middle = len(value) // 2
        return {
            "before": piece + value,
            "after": value + piece,
            "middle": value[:middle] + piece + value[middle:],
            "instead": piece,
        }[where]

    return st.builds(
        mutate, values, pieces(), st.sampled_from(["before", "after", "middle", "instead"])
    )


def acceptable_names() -> st.SearchStrategy[str]:
    """Names the API should take: any script, padded, up to exactly 100 characters."""
    text = st.text(STORABLE, min_size=1, max_size=30)
    padding = st.text(st.sampled_from(WHITESPACE), max_size=2)
    padded = st.tuples(padding, text, padding).map("".join)
    return st.one_of(
        st.sampled_from(["Ada", "Zoë", "  Bob  ", "e\u0301", "東京", "\U0001f600", "İ" * 100]),
        text,
        padded,
        exactly(NAME_LENGTH),
    ).filter(lambda name: len(name) <= NAME_LENGTH and canonical_text(name))


def names() -> st.SearchStrategy[str]:
    """Anything for a name: acceptable, mutated with hostile characters, or hostile."""
    return st.one_of(acceptable_names(), mutated(acceptable_names()), hostile_text(NAME_LENGTH))


SEEDED_EMAILS = ("ada@example.com", "zoë.kay@example.com")


def email_variants(address: str) -> list[str]:
    """Other spellings of ``address``: the same canonical email, or padded with spaces."""
    nfd = unicodedata.normalize("NFD", address)
    kelvin = address.replace("k", "\u212a")  # KELVIN SIGN lower-cases to "k"
    return [address.upper(), nfd, nfd.upper(), kelvin, f"\x1c{address}\x1f", f" {address}\t"]


def acceptable_emails() -> st.SearchStrategy[str]:
    """Emails the API should take (unless taken): any script and case, NFD, padded with
    what trimming removes, up to 255 characters before and after lower-casing."""
    part = st.one_of(
        st.text(STORABLE.filter(lambda c: not c.isspace() and c != "@"), min_size=1, max_size=12),
        st.sampled_from(["ada", "ADA", "İ", "ß", "e\u0301", "\u212a", "x" * 64]),
    )
    shaped = st.builds("{}@{}.{}".format, part, part, part)
    # The pattern refuses whitespace, but not U+001C..U+001F, which str.strip() removes.
    padding = st.text(st.sampled_from("\x1c\x1d\x1e\x1f"), max_size=2)
    return st.one_of(
        shaped,
        st.tuples(padding, shaped, padding).map("".join),
        st.sampled_from([124, 125]).map(lambda n: "İ" * n + "@x.io"),  # 253, 255 lower-cased
        st.just("a" * 247 + "@x.co.uk"),  # exactly 255
    ).filter(lambda address: len(address) <= EMAIL_LENGTH)


def emails() -> st.SearchStrategy[str]:
    """Anything for an email: acceptable, too long once lower-cased, another spelling of
    a seeded user's email, blank or hostile parts, mutated, or hostile."""
    # 'İ' lower-cases to two characters: 126 of them and "@x.io" fit in 255, not once lower.
    too_long = st.one_of(
        st.sampled_from([126, 127]).map(lambda n: "İ" * n + "@x.io"),
        st.sampled_from([256, 257]).map(lambda n: "a" * (n - 8) + "@x.co.uk"),
    )
    seeded = st.sampled_from(SEEDED_EMAILS).flatmap(
        lambda address: st.sampled_from(email_variants(address))
    )
    # Shaped like an email, but one part is blank, an edge character or a hostile piece.
    # U+001C..U+001F: whitespace to str.strip(), not to the \s of the email pattern.
    edges = ["", " ", "\u3000", "\x1c", "\x1d", "\x1e", "\x1f", "\x00", "@", "İ", "\ud800"]
    misshaped = st.builds(
        lambda parts, at, part: "{}@{}.{}".format(*parts[:at], part, *parts[at + 1 :]),
        st.sampled_from([("ada", "example", "com"), ("x", "y", "z")]),
        st.integers(0, 2),
        st.one_of(st.sampled_from(edges), pieces()),
    )
    others = st.one_of(acceptable_emails(), too_long, seeded, hostile_text(EMAIL_LENGTH))
    return st.one_of(misshaped, mutated(acceptable_emails()), others)


# -- Strategies: numbers, ids, wrong types --------------------------------------------------

INTEGER_BOUNDS = (
    0,
    1,
    2,
    -1,
    MAX_ID,
    MAX_ID + 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
)
NUMBER_TOKENS = (
    Raw("1e2"),
    Raw("1E+2"),
    Raw("1e-2"),
    Raw("-0"),
    Raw("-0.0"),
    Raw("1.0"),
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1e-400"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1" + "0" * 5000),  # more digits than Python converts to int by default
    Raw("0." + "0" * 5000 + "1"),
)


def wrong_types() -> st.SearchStrategy[Any]:
    """JSON values of every type, for a field that expects another one."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # NaN and infinities included, sent as JSON tokens
        st.text(max_size=5),
        st.sampled_from(NUMBER_TOKENS),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(max_size=3), children, max_size=3),
        ),
        max_leaves=5,
    )


def json_ids(*seeded: str) -> st.SearchStrategy[Any]:
    """An id in a JSON body: a seeded row's, one near a bound, or not an integer at all."""
    as_text = st.sampled_from(INTEGER_BOUNDS).map(str)
    return st.one_of(
        st.sampled_from([Seeded(name) for name in seeded]) if seeded else st.nothing(),
        st.sampled_from(INTEGER_BOUNDS),
        st.integers(),
        as_text,
        st.sampled_from([1.0, 1.5, -0.0, True, False, None, [], {}]),
        st.sampled_from(NUMBER_TOKENS),
    )


MONEY_TEXT = (
    "0",
    "0.00",
    "0.001",
    "0.005",
    "0.01",
    "0.1",
    "9999999999999.99",
    "9999999999999.999",
    "10000000000000",
    "10000000000000.00",
    "-0",
    "-0.00",
    "-0.01",
    "-1",
    "1e2",
    "1E-2",
    "1e-400",
    "1E+999999999",
    "0E+999999999",
    "0E-999999999",
    "NaN",
    "-NaN",
    "sNaN",
    "Infinity",
    "-Infinity",
    "inf",
    " 1 ",
    "1_000",
    "\u0661\u0662",  # Arabic-Indic digits
    "\uff11\uff12",  # full-width digits
    "0x10",
    "",
    "1,00",
    "1.",
    ".5",
    "1" + "0" * 5000,
)
MONEY_NUMBERS = (
    0,
    0.001,
    0.01,
    0.1,
    1,
    9999999999999.99,
    10**13,
    10**13 - 1,
    -0.01,
    -1,
    2**63,
    *(Raw(text) for text in ("1e2", "1E-2", "9999999999999.99", "10000000000000.00")),
    *NUMBER_TOKENS,
)


# Zero as JSON numbers and strings, signed or not: an opening balance may be zero.
ZEROS = (0, -0.0, Raw("-0"), Raw("-0.0"), Raw("0e5"), "0", "-0", "0.00", "-0.00", "0E-5")


def acceptable_amounts() -> st.SearchStrategy[Any]:
    """Money the API should take: whole cents from 0.01 to 10**13 - 0.01, as JSON numbers
    or strings, some in exponent form."""
    cents = st.one_of(
        st.integers(min_value=1, max_value=10**15 - 1),
        st.sampled_from([1, 99, 100, 10**15 - 1]),
    ).map(lambda c: Decimal(c).scaleb(-2))
    return st.one_of(
        cents.map(str),
        cents.map(lambda amount: Raw(str(amount))),
        cents.map(lambda amount: f"{amount:E}"),
        st.sampled_from(["1e2", Raw("1e2"), Raw("1E-2"), 1, 10, "0.1", Raw("0.10")]),
    )


def amounts() -> st.SearchStrategy[Any]:
    """Anything for money: at and just past 0, 0.01 and 10**13, as numbers, strings and
    exponent forms, NaN and infinities, and other types."""
    cents = st.integers(min_value=-(10**16), max_value=10**16).map(lambda c: Decimal(c) / 100)
    return st.one_of(
        acceptable_amounts(),
        st.sampled_from(ZEROS),
        st.sampled_from(MONEY_TEXT),
        st.sampled_from(MONEY_NUMBERS),
        cents.map(str),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.floats(),
        wrong_types(),
    )


# -- Strategies: bodies -----------------------------------------------------------------


# A field of a schema: (values it should take, anything at all for it).
Fields = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]
UNKNOWN = "<unknown keys>"


@st.composite
def objects(draw: st.DrawFn, fields: Fields, required: frozenset[str]) -> dict[str, Any]:
    """A JSON object for one schema: all of it acceptable; acceptable but for one field
    (hostile, of another type, missing) or some unknown keys; or hostile throughout."""
    mode = draw(st.sampled_from(["acceptable", "acceptable", "one", "one", "one", "hostile"]))
    target = draw(st.sampled_from([*fields, UNKNOWN])) if mode == "one" else None
    body: dict[str, Any] = {}
    for name, (acceptable, hostile) in fields.items():
        if mode == "acceptable" or (mode == "one" and name != target):
            if name in required or draw(st.booleans()):
                body[name] = draw(acceptable)
            continue
        choice = draw(st.sampled_from(["value", "value", "value", "wrong", "missing"]))
        if choice == "value":
            body[name] = draw(hostile)
        elif choice == "wrong":
            body[name] = draw(wrong_types())
    if target == UNKNOWN or (mode == "hostile" and draw(st.booleans())):
        unknown = st.one_of(
            st.sampled_from(["id", "is_active", "members", "balance", "NAME", "email ", ""]),
            hostile_text(20),
        )
        body.update(draw(st.dictionaries(unknown, wrong_types(), min_size=1, max_size=2)))
    return body


def user_fields() -> Fields:
    return {
        "name": (acceptable_names(), names()),
        "email": (acceptable_emails(), emails()),
        "team_id": (st.sampled_from([Seeded("team"), None]), json_ids("team")),
    }


def patch_fields() -> Fields:
    return {
        **user_fields(),
        "is_active": (st.booleans(), st.sampled_from([0, 1, "true", None])),
        "team_id": (st.sampled_from([Seeded("team"), None]), json_ids("team")),
    }


def team_fields() -> Fields:
    return {"name": (acceptable_names(), names())}


def account_fields() -> Fields:
    return {
        "owner": (acceptable_names(), names()),
        "balance": (st.one_of(st.sampled_from(ZEROS), acceptable_amounts()), amounts()),
    }


ACCOUNTS = ("account", "rich_account", "empty_account")


def transfer_fields() -> Fields:
    # Mostly two different accounts: the one with 100.00 or the rich one, to any of the three.
    source = st.sampled_from([Seeded("account"), Seeded("rich_account")])
    target = st.sampled_from([Seeded(name) for name in reversed(ACCOUNTS)])
    return {
        "from_id": (source, json_ids(*ACCOUNTS)),
        "to_id": (target, json_ids(*ACCOUNTS)),
        "amount": (acceptable_amounts(), amounts()),
    }


def bodies(method: str, route: str, fields: Fields, required: set[str]) -> st.SearchStrategy[Call]:
    """Requests to one endpoint with a JSON object for its schema, sent as ASCII (lone
    surrogates as escapes) or as UTF-8 (lone surrogates as invalid bytes)."""
    return st.builds(
        Call,
        method=st.just(method),
        route=st.just(route),
        path_id=path_ids("user", "other_user") if "{id}" in route else st.none(),
        body=objects(fields, frozenset(required)),
        ascii_json=st.sampled_from([True, True, False]),
    )


# -- Strategies: path ids, query parameters, headers, malformed documents ---------------

ID_TEXT = (
    "",
    " 1",
    "1 ",
    "+1",
    "01",
    "1.0",
    "1e2",
    "0x1",
    "1_0",
    "-0",
    "NaN",
    "\u0661",
    "\uff11",
    "9" * 5000,
    "%",
    "..",
    "1/2",
    "1?x=1",
    "1#x",
)


def id_text() -> st.SearchStrategy[str]:
    """The text of an id in a path or a query: numbers near the bounds, and anything else."""
    return st.one_of(
        st.sampled_from(INTEGER_BOUNDS).map(str),
        st.integers().map(str),
        st.sampled_from(ID_TEXT),
        hostile_text(20),
    )


def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` about four times in five, ``other`` the rest."""
    return st.integers(0, 4).flatmap(lambda draw: other if draw == 4 else usual)


def path_ids(*seeded: str) -> st.SearchStrategy[Any]:
    """Mostly a seeded row's id, else any text."""
    return mostly(st.sampled_from([Seeded(name) for name in seeded]), id_text())


def queries() -> st.SearchStrategy[tuple[str, ...]]:
    """skip/limit near their bounds, repeated, valueless, or under other names."""
    pages = st.one_of(
        st.sampled_from(["0", "1", "99", "100", "101", str(MAX_ID), str(MAX_ID + 1)]),
        id_text(),
    )
    pair = st.one_of(
        st.builds("skip={}".format, pages),
        st.builds("limit={}".format, pages),
        st.sampled_from(["skip", "limit", "skip=", "=1", "Skip=1"]),
        st.builds("{}={}".format, hostile_text(10), hostile_text(10)),
    )
    return st.lists(pair, max_size=3).map(tuple)


def idempotency_keys() -> st.SearchStrategy[tuple[tuple[bytes, bytes], ...]]:
    """Mostly no key or a valid one; else one at and past 255 characters, any bytes at
    all, or the header twice."""
    printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
    valid = st.text(printable, min_size=1, max_size=16).map(str.encode)
    hostile = st.one_of(
        st.sampled_from([KEY_LENGTH - 1, KEY_LENGTH, KEY_LENGTH + 1]).map(lambda n: b"k" * n),
        st.binary(max_size=24),  # NUL, CR and LF, bytes that are not UTF-8
        hostile_text(KEY_LENGTH).map(lambda text: text.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b" ", b" key ", b"key\x00", b"\xff", "é".encode("latin-1")]),
    )
    name = st.sampled_from([b"Idempotency-Key", b"idempotency-key", b"IDEMPOTENCY-KEY"])
    header = st.tuples(name, mostly(valid, hostile))
    return st.one_of(
        st.just(()),
        header.map(lambda one: (one,)),
        header.map(lambda one: (one,)),
        st.tuples(header, header),
    )


CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/merge-patch+json",
    "APPLICATION/JSON",
    "application/json\x00",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    "*/*",
)
MALFORMED = (
    b"",
    b"{",
    b"}",
    b'{"name": ',
    b"null",
    b"[]",
    b"[1, 2]",
    b'"text"',
    b"1",
    b"true",
    b"{}",
    b'{"a": 1,}',
    b"{'name': 'x'}",
    b'{"name": "x"} trailing',
    b'{"name": "x"}{"name": "y"}',
    b"\xef\xbb\xbf{}",  # UTF-8 byte order mark
    '{"owner": "x"}'.encode("utf-16"),
    '{"owner": "x"}'.encode("utf-32"),
    b"[" * 100_000,
    b'{"name": ' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"name": "\\ud800"}',
    b'{"\\ud800": 1}',
    b'{"name": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes: invalid UTF-8
    b'{"name": "\xff"}',
    b"\x00",
    b"NaN",
    b"-Infinity",
    b'{"name": "a", "name": 1}',
    b'{"__proto__": {"admin": true}}',
    b'{"from_id": 1, "to_id": 2, "amount": 1' + b"0" * 5000 + b"}",
)
BODY_ROUTES = (
    ("POST", "/users/"),
    ("PATCH", "/users/{id}"),
    ("POST", "/teams/"),
    ("POST", "/accounts/"),
    ("POST", "/transfers/"),
)


def malformed_calls() -> st.SearchStrategy[Call]:
    """Documents that are not the JSON object an endpoint takes, under any Content-Type."""
    raw = st.one_of(
        st.sampled_from(MALFORMED),
        st.binary(max_size=48),
        st.text(ANY_CHARACTER, max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
    return st.builds(
        lambda route, content, content_type: Call(
            route[0],
            route[1],
            path_id=Seeded("user") if "{id}" in route[1] else None,
            raw_body=content,
            content_type=content_type,
        ),
        st.sampled_from(BODY_ROUTES),
        raw,
        st.sampled_from(CONTENT_TYPES),
    )


READ_ROUTES = (
    ("GET", "/users/{id}", ("user", "other_user")),
    ("DELETE", "/users/{id}", ("user", "other_user")),
    ("GET", "/teams/{id}", ("team",)),
    ("GET", "/accounts/{id}", ("account", "rich_account")),
)


def read_calls() -> st.SearchStrategy[Call]:
    by_id = st.sampled_from(READ_ROUTES).flatmap(
        lambda route: st.builds(
            Call, st.just(route[0]), st.just(route[1]), path_id=path_ids(*route[2])
        )
    )
    pages = st.builds(
        Call, st.just("GET"), st.sampled_from(["/users/", "/teams/"]), query=queries()
    )
    return st.one_of(by_id, pages)


# -- The sandbox: the test's seeded rows, one savepoint per example ----------------------

Rows = dict[str, dict[tuple[Any, ...], dict[str, Any]]]
# Per table that changed: (rows added, rows removed, (old, new) rows updated).
Changes = dict[str, tuple[list[Any], list[Any], list[Any]]]


@dataclass
class Sandbox:
    client: httpx.AsyncClient
    connection: AsyncConnection
    ids: dict[str, int] = field(default_factory=dict)

    @asynccontextmanager
    async def example(self) -> AsyncIterator[None]:
        savepoint = await self.connection.begin_nested()
        try:
            yield
        finally:
            await savepoint.rollback()

    async def send(self, call: Call) -> httpx.Response:
        return await self.client.request(
            call.method,
            call.url(self.ids),
            content=call.content(self.ids),
            headers=call.all_headers(),
        )

    async def rows(self) -> Rows:
        """Every stored row of every table, by primary key, as the database holds it."""
        tables: Rows = {}
        for table in SQLModel.metadata.sorted_tables:
            key = list(table.primary_key.columns)
            result = await self.connection.execute(select(table).order_by(*key))
            tables[table.name] = {
                tuple(row[column.name] for column in key): dict(row)
                for row in result.mappings().all()
            }
        return tables


@pytest_asyncio.fixture(loop_scope="session")
async def sandbox(app: FastAPI, engine: AsyncEngine) -> AsyncIterator[Sandbox]:
    """The app on one connection whose transaction is rolled back after the test; every
    request gets its own session, joined to that transaction through a savepoint."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        sessions = async_sessionmaker(
            bind=connection,
            class_=AsyncSession,
            expire_on_commit=False,
            join_transaction_mode="create_savepoint",
        )

        async def request_session() -> AsyncIterator[AsyncSession]:
            async with sessions() as session:
                yield session

        app.dependency_overrides[get_session] = request_session
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                box = Sandbox(client, connection)
                await seed(box)
                yield box
        finally:
            app.dependency_overrides.pop(get_session, None)
            await transaction.rollback()


async def seed(box: Sandbox) -> None:
    async def create(name: str, path: str, body: dict[str, Any]) -> None:
        response = await box.client.post(path, json=body)
        assert response.status_code == 201, response.text
        box.ids[name] = response.json()["id"]

    await create("team", "/teams/", {"name": "Analysts"})
    team = box.ids["team"]
    await create("user", "/users/", {"name": "Ada", "email": SEEDED_EMAILS[0], "team_id": team})
    await create("other_user", "/users/", {"name": "Zoë", "email": SEEDED_EMAILS[1]})
    await create("account", "/accounts/", {"owner": "Ada", "balance": "100.00"})
    await create("rich_account", "/accounts/", {"owner": "Zoë", "balance": "9999999999999.99"})
    await create("empty_account", "/accounts/", {"owner": "Nobody", "balance": "0"})


# -- The properties -----------------------------------------------------------------------


def describe(call: Call, response: httpx.Response) -> str:
    return f"{call!r}\n-> {response.status_code} {response.text[:500]}"


def check_answer(call: Call, response: httpx.Response) -> Any:
    """No 5xx; every answer is JSON, and every 4xx has a detail. Returns the JSON."""
    event(f"{call.method} {call.route} -> {response.status_code}")  # --hypothesis-show-statistics
    assert response.status_code < 500, describe(call, response)
    try:
        answer = response.json()
    except ValueError:
        raise AssertionError("not JSON: " + describe(call, response)) from None
    if response.status_code >= 400:
        assert isinstance(answer, dict), describe(call, response)
        assert answer.get("detail"), describe(call, response)
    return answer


def check_stored(rows: Rows) -> None:
    """What any stored row must look like, whatever request stored it."""
    for user in rows["user"].values():
        address = user["email"]
        assert address == canonical_email(address), user
        assert len(address) <= EMAIL_LENGTH, user
        assert EMAIL_SHAPE.fullmatch(address), user
        check_name(user["name"])
        assert user["team_id"] is None or (user["team_id"],) in rows["team"], user
    emails = [user["email"] for user in rows["user"].values()]
    assert len(emails) == len(set(emails)), emails
    for team in rows["team"].values():
        check_name(team["name"])
    for account in rows["account"].values():
        check_name(account["owner"])
        balance = account["balance"]
        assert balance >= 0 and balance == balance.quantize(Decimal("0.01")), account
    for record in rows["idempotencykey"].values():
        assert KEY_SHAPE.fullmatch(record["key"]), record
        assert record["status_code"] in (200, 404, 409), record
        assert json.loads(record["response"]), record


def check_name(name: str) -> None:
    assert 0 < len(name) <= NAME_LENGTH, name
    assert name == canonical_text(name), name
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in name), name


def changes(before: Rows, after: Rows) -> Changes:
    changed = {}
    for table, old in before.items():
        new = after[table]
        added = [new[key] for key in new.keys() - old.keys()]
        removed = [old[key] for key in old.keys() - new.keys()]
        updated = [(old[key], new[key]) for key in old.keys() & new.keys() if old[key] != new[key]]
        if added or removed or updated:
            changed[table] = (added, removed, updated)
    return changed


def as_read(user: dict[str, Any]) -> dict[str, Any]:
    return {key: user[key] for key in ("id", "name", "email", "is_active", "team_id", "version")}


def money(value: Any) -> Decimal:
    return Decimal(str(value.text if isinstance(value, Raw) else value).strip())


def account_answer(account: dict[str, Any]) -> dict[str, Any]:
    return {"id": account["id"], "owner": account["owner"], "balance": str(account["balance"])}


async def exercise(box: Sandbox, call: Call) -> None:
    """Send ``call`` and check the answer and what the database holds afterwards."""
    async with box.example():
        before = await box.rows()
        response = await box.send(call)
        answer = check_answer(call, response)
        after = await box.rows()
        check_stored(after)
        changed = changes(before, after)
        if response.status_code >= 400:
            assert not changed, f"refused, yet stored {changed}\n{describe(call, response)}"
            return
        expect = EXPECTATIONS.get((call.method, call.route), expect_nothing_stored)
        expect(call.parsed(box.ids), answer, before, changed)


def only_added(changed: Changes, table: str) -> dict[str, Any]:
    """The one row a create stored: nothing else may have changed."""
    assert changed.keys() == {table}, changed
    added, removed, updated = changed[table]
    assert len(added) == 1 and not removed and not updated, changed
    return added[0]


def expect_nothing_stored(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    assert not changed, changed


def expect_user_created(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    # One user.created event, in the user's transaction (outbox.py): ids only.
    events = changed.pop("outbox", ([], [], []))
    assert [(e["topic"], e["payload"]) for e in events[0]] == [
        ("user.created", {"id": answer["id"], "team_id": answer["team_id"]})
    ] and events[1:] == ([], []), events
    user = only_added(changed, "user")
    assert as_read(user) == answer
    assert user["email"] == canonical_email(body["email"])
    assert user["name"] == canonical_text(body["name"])
    assert user["team_id"] == body.get("team_id") and user["is_active"] is True


CANONICAL = {"email": canonical_email, "name": canonical_text}


def expect_user_updated(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    (old,) = [row for row in before["user"].values() if row["id"] == answer["id"]]
    wanted = dict(old)
    for key, value in body.items():
        wanted[key] = CANONICAL[key](value) if key in CANONICAL else value
    if wanted != old:  # a change is a new version (optimistic locking)
        wanted["version"] = old["version"] + 1
    assert as_read(wanted) == answer
    assert changed.keys() <= {"user"}, changed
    if changed:
        added, removed, updated = changed["user"]
        assert not added and not removed and updated == [(old, wanted)], changed


def expect_team_created(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    team = only_added(changed, "team")
    assert answer == {"id": team["id"], "name": team["name"], "members": []}
    assert team["name"] == canonical_text(body["name"])


def expect_account_opened(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    account = only_added(changed, "account")
    assert answer == account_answer(account)
    assert account["owner"] == canonical_text(body["owner"])
    assert account["balance"] == money(body["balance"])


def expect_money_moved(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    """Both balances changed by the amount, and nothing else."""
    assert changed.keys() == {"account"}, changed
    amount = money(body["amount"])
    accounts = {row["id"]: row for row in before["account"].values()}
    source, target = accounts[body["from_id"]], accounts[body["to_id"]]
    added, removed, updated = changed["account"]
    assert not added and not removed and len(updated) == 2, changed
    new = {row["id"]: row for _, row in updated}
    assert new[source["id"]]["balance"] == source["balance"] - amount
    assert new[target["id"]]["balance"] == target["balance"] + amount
    assert answer == {
        "from_account": account_answer(new[source["id"]]),
        "to_account": account_answer(new[target["id"]]),
    }


def expect_user_deleted(body: Any, answer: Any, before: Rows, changed: Changes) -> None:
    assert answer == {"ok": True}
    assert changed.keys() <= {"user", "profile"}, changed
    added, removed, updated = changed["user"]
    assert not added and not updated and len(removed) == 1, changed


EXPECTATIONS: dict[tuple[str, str], Callable[[Any, Any, Rows, Changes], None]] = {
    ("POST", "/users/"): expect_user_created,
    ("PATCH", "/users/{id}"): expect_user_updated,
    ("POST", "/teams/"): expect_team_created,
    ("POST", "/accounts/"): expect_account_opened,
    ("POST", "/transfers/"): expect_money_moved,
    ("DELETE", "/users/{id}"): expect_user_deleted,
}


@HOSTILE
@given(call=bodies("POST", "/users/", user_fields(), {"name", "email"}))
async def test_creating_a_user(sandbox: Sandbox, call: Call) -> None:
    await exercise(sandbox, call)


@HOSTILE
@given(call=bodies("PATCH", "/users/{id}", patch_fields(), set()))
async def test_updating_a_user(sandbox: Sandbox, call: Call) -> None:
    await exercise(sandbox, call)


@HOSTILE
@given(call=bodies("POST", "/teams/", team_fields(), {"name"}))
async def test_creating_a_team(sandbox: Sandbox, call: Call) -> None:
    await exercise(sandbox, call)


@HOSTILE
@given(call=bodies("POST", "/accounts/", account_fields(), {"owner", "balance"}))
async def test_opening_an_account(sandbox: Sandbox, call: Call) -> None:
    await exercise(sandbox, call)


@HOSTILE
@given(call=read_calls())
async def test_reading_and_deleting_by_id_and_page(sandbox: Sandbox, call: Call) -> None:
    await exercise(sandbox, call)


@HOSTILE
@given(call=malformed_calls())
async def test_malformed_documents(sandbox: Sandbox, call: Call) -> None:
    await exercise(sandbox, call)


@st.composite
def transfers(draw: st.DrawFn) -> tuple[Call, Call | None]:
    """A transfer with hostile Idempotency-Key headers, and maybe a second request with
    the same headers: the same body again (a retry) or another body (a reused key)."""
    fields = transfer_fields()
    first = draw(bodies("POST", "/transfers/", fields, {"from_id", "to_id", "amount"}))
    headers = draw(idempotency_keys())
    first = replace(first, headers=headers)
    second = draw(st.sampled_from(["none", "retry", "other"]))
    if second == "none":
        return first, None
    if second == "retry":
        return first, first
    other = draw(bodies("POST", "/transfers/", fields, {"from_id", "to_id", "amount"}))
    return first, replace(other, headers=headers)


def check_transfer(
    box: Sandbox, call: Call, response: httpx.Response, before: Rows, after: Rows
) -> None:
    """Money moved exactly as answered; the answer kept under a valid key, if one was sent."""
    answer = check_answer(call, response)
    check_stored(after)
    changed = changes(before, after)
    key = idempotency_key(call)
    if key is not None and response.status_code in (200, 404, 409):
        # Answered: the key is stored with the answer, so that a retry gets it again.
        added, removed, updated = changed.pop("idempotencykey")
        assert [row["key"] for row in added] == [key] and not removed and not updated
    if response.status_code >= 400:
        assert not changed, f"refused, yet stored {changed}\n{describe(call, response)}"
    else:
        expect_money_moved(call.parsed(box.ids), answer, before, changed)


@HOSTILE
@given(calls=transfers())
async def test_transferring_money_with_idempotency_keys(
    sandbox: Sandbox, calls: tuple[Call, Call | None]
) -> None:
    first, second = calls
    async with sandbox.example():
        before = await sandbox.rows()
        response = await sandbox.send(first)
        after = await sandbox.rows()
        check_transfer(sandbox, first, response, before, after)
        if second is None:
            return
        again = await sandbox.send(second)
        final = await sandbox.rows()
        if idempotency_key(first) is None or response.status_code not in (200, 404, 409):
            check_transfer(sandbox, second, again, after, final)  # nothing kept: a new request
            return
        # The key has an answer: the same request gets it again, another one is refused.
        check_answer(second, again)
        assert again.status_code in (response.status_code, 422), describe(second, again)
        if again.status_code == response.status_code:
            assert again.json() == response.json(), describe(second, again)
        assert not changes(after, final), changes(after, final)


def idempotency_key(call: Call) -> str | None:
    """The key the app reads from ``call``: the first header, if it is a valid key."""
    values = [value for name, value in call.headers if name.lower() == b"idempotency-key"]
    if not values:
        return None
    text = values[0].decode("latin-1")
    return text if KEY_SHAPE.fullmatch(text) else None


# -- Defects these properties found first, kept as regression tests ------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain"])
async def test_a_non_utf8_body_without_a_json_content_type_is_a_4xx(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/teams/", content=b"\xff", headers=headers)
    assert 400 <= response.status_code < 500
    assert response.json()["detail"]


@pytest.mark.parametrize("route", ["POST /users/", "PATCH /users/{id}", "POST /teams/"])
async def test_a_name_that_normalization_lengthens_past_100_is_422(
    client: httpx.AsyncClient, route: str
) -> None:
    name = "\u0958" * 60  # DEVANAGARI LETTER QA: NFC makes it two characters
    assert len(name) == 60 and len(canonical_text(name)) == 120
    response = await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})
    user = response.json()
    if route == "POST /users/":
        response = await client.post("/users/", json={"name": name, "email": "qa@example.com"})
    elif route == "PATCH /users/{id}":
        response = await client.patch(f"/users/{user['id']}", json={"name": name})
    else:
        response = await client.post("/teams/", json={"name": name})
    assert response.status_code == 422, response.text
    assert (await client.get("/users/")).json() == [user]
    assert (await client.get("/teams/")).json() == []


@pytest.mark.parametrize("address", ["\x1c@example.com", "ada@example.\x1f"])
async def test_an_email_that_trimming_makes_invalid_is_422(
    client: httpx.AsyncClient, address: str
) -> None:
    response = await client.post("/users/", json={"name": "Ada", "email": address})
    assert response.status_code == 422, response.text
    assert (await client.get("/users/")).json() == []


async def test_a_blank_team_name_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/teams/", json={"name": "   "})
    assert response.status_code == 422, response.text
    assert (await client.get("/teams/")).json() == []


async def test_an_opening_balance_of_minus_zero_is_answered_as_stored(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/accounts/", json={"owner": "Ada", "balance": "-0"})
    assert response.status_code == 201, response.text
    stored = (await client.get(f"/accounts/{response.json()['id']}")).json()
    assert stored["balance"] == "0.00"
    assert response.json() == stored


def test_requests_are_sent_as_described() -> None:
    call = Call("POST", "/users/", body={"name": "\ud800", "email": Raw("NaN"), "n": 10**30})
    assert (
        call.content(DUMMY_IDS)
        == b'{"name": "\\ud800", "email": NaN, "n": ' + b"1" + b"0" * 30 + b"}"
    )
    raw = Call("POST", "/users/", body={"name": "\udfff"}, ascii_json=False)
    assert raw.content(DUMMY_IDS) == b'{"name": "\xed\xbf\xbf"}'  # invalid UTF-8
    assert Call("GET", "/users/{id}", path_id="\ud800/").url(DUMMY_IDS) == "/users/%ED%A0%80%2F"
    paging = Call("GET", "/users/", query=("skip=\x00", "limit"))
    assert paging.url(DUMMY_IDS) == "/users/?skip=%00&limit"
    assert math.isnan(json.loads(to_json(float("nan"), DUMMY_IDS, True)))


def is_surrogate(character: str) -> bool:
    return 0xD800 <= ord(character) <= 0xDFFF


def not_utf8(content: bytes | None) -> bool:
    try:
        (content or b"").decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# What the module promises to generate, each checked against the strategy that must reach it.
EDGES: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], bool]]] = {
    "lone surrogate in a name": (names(), lambda name: any(map(is_surrogate, name))),
    "NUL in a name": (names(), lambda name: "\x00" in name),
    "control character in a name": (names(), lambda name: any(c in CONTROLS[1:] for c in name)),
    "whitespace-only name": (names(), lambda name: name and not name.strip()),
    "name of 101 characters": (names(), lambda name: len(name) == NAME_LENGTH + 1),
    "name past 100 once NFC": (
        names(),
        lambda name: len(name) <= NAME_LENGTH < len(unicodedata.normalize("NFC", name)),
    ),
    "text of 256 characters": (hostile_text(20), lambda text: len(text) == EMAIL_LENGTH + 1),
    "text of 501 characters": (hostile_text(20), lambda text: len(text) == BIO_LENGTH + 1),
    "email past 255 once lower-cased": (
        emails(),
        lambda address: len(address) <= EMAIL_LENGTH < len(address.lower()),
    ),
    "email of another case and form": (
        emails(),
        lambda address: (
            address != SEEDED_EMAILS[1] and canonical_email(address) == SEEDED_EMAILS[1]
        ),
    ),
    "id 0": (json_ids(), lambda value: value == 0 and not isinstance(value, (bool, float))),
    "id 2**31 - 1": (json_ids(), lambda value: value == MAX_ID),
    "id 2**31": (json_ids(), lambda value: value == MAX_ID + 1),
    "id of 5,000 digits": (
        json_ids(),
        lambda value: isinstance(value, Raw) and len(value.text) > 4300,
    ),
    "id as a string": (json_ids(), lambda value: isinstance(value, str)),
    "amount 0.001": (amounts(), lambda value: value in ("0.001", 0.001)),
    "amount 10**13 - 0.01": (amounts(), lambda value: str(value) == "9999999999999.99"),
    "amount 10**13": (amounts(), lambda value: value == 10**13),
    "negative amount": (amounts(), lambda value: value in (-1, -0.01, "-0.01")),
    "amount in exponent form": (amounts(), lambda value: value == "1e2" or value == Raw("1e2")),
    "NaN token": (amounts(), lambda value: value == Raw("NaN")),
    "Infinity token": (amounts(), lambda value: value == Raw("Infinity")),
    "unknown key": (
        objects(user_fields(), frozenset({"name", "email"})),
        lambda body: bool(body.keys() - {"name", "email", "team_id"}),
    ),
    "missing key": (
        objects(user_fields(), frozenset({"name", "email"})),
        lambda body: "email" not in body,
    ),
    "wrong type": (
        objects(user_fields(), frozenset({"name", "email"})),
        lambda body: not isinstance(body.get("name", ""), str),
    ),
    "skip past 2**31 - 1": (queries(), lambda query: f"skip={MAX_ID + 1}" in query),
    "limit 101": (queries(), lambda query: "limit=101" in query),
    "path id 2**31": (path_ids("user"), lambda value: value == str(MAX_ID + 1)),
    "Idempotency-Key of 256 characters": (
        idempotency_keys(),
        lambda headers: any(len(value) == KEY_LENGTH + 1 for _, value in headers),
    ),
    "Idempotency-Key with NUL": (
        idempotency_keys(),
        lambda headers: any(b"\x00" in value for _, value in headers),
    ),
    "Idempotency-Key not UTF-8": (
        idempotency_keys(),
        lambda headers: any(not_utf8(value) for _, value in headers),
    ),
    "malformed JSON": (malformed_calls(), lambda call: call.parsed() is NO_BODY),
    "body not UTF-8": (malformed_calls(), lambda call: not_utf8(call.raw_body)),
}


@pytest.mark.parametrize("edge", EDGES)
def test_the_strategies_reach(edge: str) -> None:
    strategy, reached = EDGES[edge]
    no_shrinking = settings(
        max_examples=5000, database=None, derandomize=True, phases=[Phase.generate]
    )
    find(strategy, reached, settings=no_shrinking)
