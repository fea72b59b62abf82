"""Fuzz the API from its own OpenAPI schema: no input may produce a 5xx.

schemathesis generates requests for every operation -- valid ones, and ones
that break the schema on purpose -- and sends them to the app in-process
(ASGI), with its lifespan, against the test database of each backend. The
run is bounded and derandomized so the suite stays fast and repeatable; to
search longer, raise the number of examples per operation, e.g.

    ASYNCPATTERNS_FUZZ_EXAMPLES=1000 pytest tests/test_api_fuzz.py

The text it generates is as hostile as schemathesis allows: the whole of
Unicode in bodies, path and query (the "utf-8" codec: every code point but
lone surrogates), NUL included, and in the requests that break the schema
header values with any Latin-1 character but CR and LF (which the HTTP client
refuses to send). Lone surrogates cannot be generated that way, so a hook
puts them, and other hostile text, into JSON bodies: the client escapes them
as ``\\udXXX``. tests/test_hostile_input.py generates hostile input by hand.
"""

import copy
import os
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncpatterns import api

# No 5xx; and every answer is documented: its status code, content type and body schema.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = int(os.environ.get("ASYNCPATTERNS_FUZZ_EXAMPLES", "25"))


# The operations come from the schema; the app they are sent to is made per backend.
schema = schemathesis.openapi.from_dict(api.app.openapi())
schema.config.generation.update(
    allow_x00=True,  # NUL in strings: PostgreSQL cannot store it, so the API must refuse it
    codec="utf-8",  # every code point that can be sent (all but lone surrogates)
    allow_extra_parameters=True,  # undeclared headers and query parameters, in negative cases
    exclude_header_characters="\r\n",  # the only characters the client cannot send
)

# Hostile text for one string of a JSON body: lone surrogates, NUL and other control
# characters, text that lower-casing lengthens, and lengths just past every max_length.
HOSTILE_TEXT = st.one_of(
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
    st.text(st.characters(exclude_categories=()), min_size=1, max_size=12),
    st.sampled_from(
        [
            "\ud800",
            "a\udfff",
            "\x00",
            "\x01\x7f\x9f",
            "İ" * 128 + "@example.com",  # 140 characters, 268 once lower-cased
            "a" * 101,
            "a" * 256,
            "a" * 501,
        ]
    ),
)


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where the strings are in a JSON value, as paths of keys and indexes."""
    if isinstance(value, str):
        return [path]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in string_paths(item, (*path, key))]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in string_paths(item, (*path, i))]
    return []


def with_text_at(body: Any, path: tuple[Any, ...], text: str) -> Any:
    changed = copy.deepcopy(body)
    container = changed
    for step in path[:-1]:
        container = container[step]
    container[path[-1]] = text
    return changed


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """The body as generated, or with one of its strings replaced by hostile text."""
    paths = [path for path in string_paths(body) if path]
    if not paths:
        return st.just(body)
    hostile = st.builds(with_text_at, st.just(body), st.sampled_from(paths), HOSTILE_TEXT)
    return st.one_of(st.just(body), hostile)


@pytest.fixture
def fuzzed_app(database_url: URL, engine: AsyncEngine) -> FastAPI:
    # `engine` only for its cleanup: the rows the fuzzer commits are deleted afterwards.
    # schemathesis runs the app's lifespan, and ends it when the test ends.
    return api.create_app(database_url)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_is_a_server_error(fuzzed_app: FastAPI, case: schemathesis.Case) -> None:
    case.call_and_validate(app=fuzzed_app, checks=CHECKS)
