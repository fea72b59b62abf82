"""Fuzz the API from its own OpenAPI schema: no input may produce a 5xx.

schemathesis generates requests for every operation -- valid ones, and ones
that break the schema on purpose -- and sends them to the app in-process
(ASGI), with its lifespan, against the test database of each backend. The
run is bounded and derandomized so the suite stays fast and repeatable; to
search longer, raise the number of examples per operation, e.g.

    ASYNCPATTERNS_FUZZ_EXAMPLES=1000 pytest tests/test_api_fuzz.py
"""

import os

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
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
