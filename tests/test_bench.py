"""The bench's scenarios and command, smoke-run with tiny sizes on every backend.

Timings are never asserted: only the structure of the results, the statement
counts each variant sends, and that bench leaves the user's data alone.
"""

import asyncio
import json
import os
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlmodel import select

from asyncpatterns import bench, crud
from asyncpatterns.cli import main
from asyncpatterns.db import make_engine, make_session_maker, throwaway_database
from asyncpatterns.models import Account, Team, User


def by_variant(results: list[bench.Result]) -> dict[str, bench.Result]:
    return {r.variant: r for r in results}


async def count_rows(engine, model) -> int:
    async with make_session_maker(engine)() as session:
        return len((await session.exec(select(model))).all())


async def test_bulk_insert_counts_statements_per_variant(engine, backend) -> None:
    results = by_variant(await bench.bulk_insert(engine, users=40, repeats=1))
    common = results["common: add_all, commit, refresh each"]
    add_all = results["add_all + commit"]
    # The common pattern sends what add_all sends, plus one SELECT per user.
    assert common.statements == add_all.statements + 40
    assert results["kit: crud.create_users"].statements == 1  # one INSERT ... RETURNING
    # The kit taken apart: its INSERT alone, and the ORM bookkeeping with no database.
    assert results["  of which the INSERT alone"].statements == 1
    assert results["  of which making them persistent"].statements == 0
    assert results["raw driver: executemany"].statements == 1
    assert results["Core: execute(insert(User), rows)"].kind == bench.OTHER
    assert results["raw driver: executemany"].kind == bench.RAW
    if backend == "postgresql":
        assert results["kit: crud.copy_users (COPY)"].statements == 1  # the COPY
        assert results["raw driver: copy_records_to_table"].vs_raw is not None
    else:
        assert not any("copy" in name for name in results)
    for result in results.values():
        assert len(result.runs) == 1
        assert result.seconds > 0 and result.peak_bytes > 0
        assert 0 <= result.kept_bytes <= result.peak_bytes
        assert result.vs_raw is not None and result.speedup is not None
        assert result.notes.split()[1].startswith("rows/s")
    assert common.speedup == 1
    # the kit holds less than add_all's ORM bookkeeping, however small the batch
    assert results["kit: crud.create_users"].peak_bytes < add_all.peak_bytes
    # What stays allocated is the state of the objects made persistent; raw keeps nothing.
    kit = results["kit: crud.create_users"]
    assert kit.kept_bytes > 0
    assert results["raw driver: executemany"].kept_bytes < kit.kept_bytes
    assert await count_rows(engine, User) == 0  # emptied after the scenario


async def test_eager_loading_statement_counts(engine) -> None:
    results = by_variant(await bench.eager_loading(engine, teams=6, members=3, repeats=1))
    assert results["N+1: get_teams_one_query_each"].statements == 7
    assert results["kit: get_teams_with_members"].statements == 2
    assert results["joinedload: ..._members_joined"].statements == 1
    assert results["raw driver: one JOIN"].statements == 1
    assert "the faster loader" in results["kit: get_teams_with_members"].notes
    assert await count_rows(engine, Team) == 0


async def test_pool_sweep_counts_every_query(database_url) -> None:
    results = await bench.pool_sweep(database_url, sizes=(1, 3), queries=12, tasks=6, repeats=1)
    assert [r.variant for r in results] == ["pool_size=1", "pool_size=3"]
    assert all(r.statements == 12 for r in results)
    assert results[-1].extra["vs_largest"] == 1


async def test_bulk_insert_leaves_the_row_at_a_time_variants_out_above_the_limit(
    engine, monkeypatch
) -> None:
    monkeypatch.setattr(bench.inserts, "ROW_AT_A_TIME_LIMIT", 30)
    results = by_variant(await bench.bulk_insert(engine, users=40, repeats=1))
    assert "add_all + commit" not in results and "kit: crud.create_users" in results
    assert all(r.speedup is None for r in results.values())  # no anti-pattern to compare


async def test_common_transfer_moves_money_when_alone(engine) -> None:
    await bench.reset_accounts(engine, accounts=2)
    async with make_session_maker(engine)() as session:
        await bench.common_transfer_funds(session, 1, 2, Decimal("30.00"))
        with pytest.raises(ValueError, match="Insufficient funds"):
            await bench.common_transfer_funds(session, 1, 2, Decimal("70.01"))
        balances = (await session.exec(select(Account.balance).order_by(Account.id))).all()
    assert balances == [Decimal("70.00"), Decimal("130.00")]


async def test_transfers_kit_never_loses_money(engine) -> None:
    results = by_variant(await bench.transfers(engine, count=30, repeats=1))
    kit = results["kit: transactions.transfer_funds"]
    for run in kit.extra["runs_detail"]:
        assert run["money_lost"] == "0.00"
        assert Decimal(run["lowest"]) >= 0
        assert run["done"] + run["refused"] + run["failed"] == 30
        assert run["failed"] == 0
    assert await count_rows(engine, Account) == 0


async def test_scratch_database_is_removed(database_url, backend) -> None:
    async with throwaway_database(database_url, "asyncpatterns_bench") as scratch:
        engine = make_engine(scratch)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()
    assert scratch.database != database_url.database
    admin = make_engine(database_url)
    try:
        async with admin.connect() as conn:
            if backend == "postgresql":
                found = await conn.scalar(
                    text("SELECT count(*) FROM pg_database WHERE datname = :n"),
                    {"n": scratch.database},
                )
            elif backend == "mysql":
                found = await conn.scalar(
                    text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :n"),
                    {"n": scratch.database},
                )
            else:
                found = await asyncio.to_thread(os.path.exists, os.path.dirname(scratch.database))
    finally:
        await admin.dispose()
    assert not found


async def test_bench_command_quick_leaves_the_users_data_alone(
    engine, database_url, tmp_path, capsys
) -> None:
    async with make_session_maker(engine)() as session:
        await crud.create_user(session, User(name="Keep", email="keep@example.com"))
    url = database_url.render_as_string(hide_password=False)
    out = tmp_path / "bench.json"
    code = await asyncio.to_thread(main, ["bench", "--url", url, "--quick", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "== bulk_insert (100 users)" in printed
    assert "== eager_loading (10 teams x 5 members)" in printed
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["repeats"] == bench.QUICK_REPEATS
    scenarios = {r["scenario"] for r in report["results"]}
    assert scenarios == set(bench.SCENARIOS)
    assert all(len(r["runs"]) == bench.QUICK_REPEATS for r in report["results"])
    assert all(r["peak_bytes"] > 0 for r in report["results"])
    async with make_session_maker(engine)() as session:
        assert [u.email for u in await crud.get_users(session)] == ["keep@example.com"]


def test_bench_command_rejects_an_unknown_scenario(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--only", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_bench_command_refuses_fewer_than_one_row(capsys) -> None:
    assert main(["bench", "--rows", "0"]) == 2
    assert "rows must be at least 1" in capsys.readouterr().err


def test_bench_command_refuses_fewer_than_one_run(capsys) -> None:
    assert main(["bench", "--repeats", "-1"]) == 2
    assert "repeats must be at least 1" in capsys.readouterr().err


async def test_streaming_scenario_reads_every_row_each_way(engine) -> None:
    results = await bench.streaming_scenario(engine, sizes=(60, 300), repeats=1)
    assert [r.extra["rows"] for r in results] == [60] * 4 + [300] * 4
    assert {r.kind for r in results} == {bench.ANTI, bench.KIT, bench.RAW}
    assert all(r.statements == 1 for r in results)  # one SELECT each, however many chunks
    for size in (60, 300):
        rows = [r for r in results if r.extra["rows"] == size]
        assert rows[0].variant == f"common: .all() @ {size}"
        assert rows[0].extra["peak_vs_all"] == 1 and rows[0].speedup == 1
        assert all(r.peak_bytes > 0 and r.vs_raw is not None for r in rows)
    assert await count_rows(engine, User) == 0  # emptied after the scenario


def test_bench_command_refuses_a_stream_size_below_one(capsys) -> None:
    assert main(["bench", "--stream-rows", "100,0"]) == 2
    assert "stream rows must be at least 1" in capsys.readouterr().err


async def test_pagination_scenario_reads_the_deep_page_each_way(engine) -> None:
    results = await bench.pagination_scenario(engine, rows=250, repeats=1)
    assert [r.variant.split(":")[0] for r in results] == [
        "offset by id",
        "keyset by id",
        "offset by name",
        "keyset by name",
        "keyset by name, page 1 (for scale)",
    ]
    assert all(r.statements == 1 for r in results)  # each page one SELECT
    assert all(r.extra == {"rows": 250, "page": 100, "skip": 150} for r in results)
    assert all("faster than its offset" in r.notes for r in results if r.kind == bench.KIT)
    assert await count_rows(engine, User) == 0  # emptied after the scenario
