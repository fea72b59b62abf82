"""``python -m asyncpatterns bench jobs``, smoke-run with ``--quick`` on every backend.

Timings are not asserted (beyond one generous bound: a listener that hears
nothing would leave a poll's latency). What is: the report's shape, that every
strategy ran every job exactly once, and that the accounting catches a claim
that runs jobs twice.
"""

import asyncio
import json
import os
from collections import Counter
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns import jobs
from asyncpatterns.bench import jobs as bench_jobs
from asyncpatterns.cli import main
from asyncpatterns.db.pooler import resolve_pooler
from asyncpatterns.models import Job
from asyncpatterns.notify import DIRECT_URL


async def test_quick_bench_runs_every_job_once_with_every_claim(
    database_url: URL, backend: str, tmp_path: Any, capsys: Any
) -> None:
    url = database_url.render_as_string(hide_password=False)
    out = tmp_path / "jobs.json"
    code = await asyncio.to_thread(
        main, ["bench", "jobs", "--url", url, "--quick", "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"== claim throughput ({bench_jobs.QUICK['jobs']} jobs" in printed
    assert "== enqueue to start" in printed
    report = json.loads(out.read_text())
    assert (report["backend"], report["quick"]) == (backend, True)

    rows = report["throughput"]
    names = [name for name, _, _ in bench_jobs.STRATEGIES]
    assert [(r["workers"], r["strategy"]) for r in rows] == [
        (workers, name) for workers in bench_jobs.WORKERS for name in names
    ]
    for r in rows:
        assert r["jobs"] == bench_jobs.QUICK["jobs"] and r["jobs_per_s"] > 0
        assert (r["ran_twice"], r["never_ran"], r["not_done"]) == (0, 0, 0), r
        assert 0 < r["claim_p50_ms"] <= r["claim_p99_ms"]
        assert (r["row_lock_waits"] is not None) == (backend == "mysql")
        if r["kind"] == "kit":
            assert r["vs_kit"] == 1 and r["lost_races"] == 0
    alone = {r["strategy"]: r for r in rows if r["workers"] == 1}
    assert alone[names[2]]["lost_races"] == 0  # one worker has nobody to lose a race to

    wakeups = report["wakeups"]
    listens = backend == "postgresql" and (resolve_pooler() is None or DIRECT_URL in os.environ)
    assert [w["worker"].startswith("LISTEN") for w in wakeups] == [False, True][: 1 + listens]
    assert all(w["jobs"] == bench_jobs.QUICK["wakeups"] and w["poll"] == 1.0 for w in wakeups)
    if listens:  # woken by NOTIFY, not by the next poll (a generous bound: ~10 ms expected)
        assert wakeups[1]["p50_ms"] < 500, wakeups
    elif backend == "postgresql":
        assert "LISTEN/NOTIFY left out" in report["notes"][0]


async def claim_racily(sessions: async_sessionmaker[AsyncSession], tally: Counter[str]) -> Any:
    """The race the kit's claim exists to prevent: read the oldest queued job, then
    mark it running by its id alone. Workers that read it meanwhile all run it."""
    async with sessions() as session:
        oldest = select(Job).where(col(Job.state) == jobs.QUEUED).order_by(col(Job.id)).limit(1)
        job = (await session.exec(oldest)).first()
        await session.commit()
    if job is None:
        return None
    await asyncio.sleep(0.05)  # the other workers read the same job meanwhile
    async with sessions() as session:
        mark = update(Job).where(col(Job.id) == job.id)
        await session.exec(mark.values(state=jobs.RUNNING, attempts=col(Job.attempts) + 1))
        await session.commit()
    job.state, job.attempts = jobs.RUNNING, job.attempts + 1
    return job


async def test_drain_reports_jobs_run_twice(engine: AsyncEngine) -> None:
    run = await bench_jobs.drain(engine, "racy", "anti-pattern", claim_racily, 4, 12)
    assert run.ran_twice > 0 and run.violations > 0, run
    kit_name, kind, kit_claim = bench_jobs.STRATEGIES[0]
    kit = await bench_jobs.drain(engine, kit_name, kind, kit_claim, 4, 12)
    assert kit.violations == 0, kit
