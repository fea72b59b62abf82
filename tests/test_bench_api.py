"""The served-app bench: every rung of the ladder answers the four endpoints
correctly on every backend (a yardstick that answers wrong would make the ratios
lie), and the report reads wrk's numbers as they are. Timings are never asserted.
"""

import importlib.util

import httpx
import pytest

from asyncpatterns.bench import ladder
from asyncpatterns.bench.served import (
    ENDPOINTS,
    ApiReport,
    Cell,
    _why_not,
    check_report,
    format_api_report,
)


@pytest.mark.parametrize("rung", list(ladder.RUNGS))
async def test_each_rung_answers_the_four_endpoints(
    rung, engine, database_url, monkeypatch
) -> None:
    if (reason := _why_not(rung, database_url)) is not None:
        pytest.skip(reason)
    monkeypatch.setenv(ladder.URL_VARIABLE, database_url.render_as_string(hide_password=False))
    app = ladder.RUNGS[rung]()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        created = []
        for i in range(3):
            answer = await client.post(
                "/users/", json={"name": f"N{i}", "email": f"r{i}@b.example"}
            )
            assert answer.status_code == 201, answer.text
            created.append(answer.json())
        assert [user["version"] for user in created] == [1, 1, 1]
        first = created[0]

        answer = await client.get(f"/users/{first['id']}")
        assert answer.status_code == 200
        assert {k: answer.json()[k] for k in ("id", "name", "email", "is_active", "version")} == {
            "id": first["id"],
            "name": "N0",
            "email": "r0@b.example",
            "is_active": True,
            "version": 1,
        }
        assert (await client.get(f"/users/{first['id'] + 1000}")).status_code == 404

        answer = await client.get("/users/", params={"skip": 1, "limit": 50})
        assert [user["email"] for user in answer.json()] == ["r1@b.example", "r2@b.example"]

        answer = await client.patch(
            f"/users/{first['id']}", json={"name": "Renamed"}, headers={"If-Match": "*"}
        )
        assert answer.status_code == 200, answer.text
        assert (answer.json()["name"], answer.json()["version"]) == ("Renamed", 2)
        assert (await client.get(f"/users/{first['id']}")).json()["name"] == "Renamed"


def test_the_sync_rung_names_what_it_lacks(monkeypatch) -> None:
    from sqlalchemy.engine import make_url

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a)
    )
    assert "pip install" in _why_not("sync", make_url("postgresql+asyncpg://u@h/db"))
    assert _why_not("sync", make_url("sqlite+aiosqlite:///x.db")) is None


def _cell(rung: str, endpoint: str, requests: int, statuses: dict[str, int], **extra) -> Cell:
    fields = {"socket_errors": 0, "timeouts": 0, "retry_after": 0, **extra}
    return Cell(rung, endpoint, 32, requests, 2.0, 1.0, 9.0, statuses, **fields)


def test_the_report_counts_every_answer_that_is_not_2xx_and_gives_ratios() -> None:
    report = ApiReport("sqlite", "sqlite+aiosqlite:///x.db", 2.0, "uvloop", "httptools")
    report.cells = [
        _cell("raw", "get", 8000, {"200": 8000}),
        _cell("seed", "get", 1000, {"200": 990, "500": 10}),
        _cell("kit", "get", 4000, {"200": 3900, "503": 100}, retry_after=100, timeouts=3),
    ]
    assert [cell.rps for cell in report.cells] == [4000, 500, 2000]
    assert [cell.not_2xx for cell in report.cells] == [0, 10, 103]
    ratios = report.as_json()["ratios"]
    assert ratios == {"kit/raw get @32": 0.5, "kit/seed get @32": 4.0}
    text = format_api_report(report)
    assert "503 with Retry-After: 100" in text and "kit/raw get @32 0.50x" in text
    assert set(ENDPOINTS) == {"get", "list", "post", "patch"}


def test_the_ci_check_finds_a_rung_without_answers_and_a_kit_answer_not_2xx_or_503() -> None:
    report = ApiReport("sqlite", "sqlite+aiosqlite:///x.db", 1.0, "asyncio", "h11")
    report.cells = [_cell(rung, e, 10, {"200": 10}) for rung in ladder.RUNGS for e in ENDPOINTS]
    report.cells.append(_cell("kit", "get", 10, {"200": 8, "503": 2}, retry_after=2))
    assert check_report(report.as_json()) == []  # overload answered as it should be
    report.cells[0] = _cell("raw", "get", 0, {})
    report.cells[-1] = _cell("kit", "post", 10, {"201": 9, "500": 1})
    report.cells[-2] = _cell("kit", "get", 10, {"200": 9, "503": 1}, socket_errors=1)
    report.skipped["sync"] = "psycopg is not installed"
    assert check_report(report.as_json()) == [
        "raw get: no answers",
        "kit get @32: 2 answers neither 2xx nor 503 with Retry-After {'200': 9, '503': 1}",
        "kit post @32: 1 answers neither 2xx nor 503 with Retry-After {'201': 9, '500': 1}",
    ]
