"""How long a job waits for an idle worker: enqueue to start, woken by NOTIFY or by polling.

    python -m asyncpatterns.bench.pickup [--url URL] [--jobs 50] [--poll 1.0] [--workers 2]

``measure_pickup`` enqueues ``jobs`` jobs one at a time, each at a random moment of
the poll cycle, to workers with nothing else to do, and takes the time from the
``enqueue`` call (its commit included) to the handler's first line. Polling, that is
about half the poll on average and all of it at worst; woken by NOTIFY, a few round
trips. A measurement, not a test: nothing here asserts a timing. The command runs
in a scratch database of its own (``throwaway_database``), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from ..config import mask_password, resolve_url
from ..db import create_db_and_tables, make_engine, make_session_maker, throwaway_database
from ..jobs import enqueue, run_worker
from ..notify import Listener


@dataclass
class Pickup:
    """One variant: seconds from each ``enqueue`` call to its handler's start."""

    variant: str  # "notify" (a Listener) or "poll" (none)
    poll: float
    listening: bool  # the listener heard: False on SQLite/MySQL, or behind a pooler
    seconds: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        if len(self.seconds) < 2:
            return max(self.seconds)
        return statistics.quantiles(self.seconds, n=100, method="inclusive")[98]


async def measure_pickup(
    engine: AsyncEngine,
    model: type[Any],
    *,
    jobs: int = 50,
    workers: int = 2,
    poll: float = 1.0,
    listen: bool = True,
) -> Pickup:
    """Enqueue ``jobs`` jobs on ``model``'s table, one at a time, to ``workers`` idle
    workers polling every ``poll`` seconds, with one ``Listener`` if ``listen``.
    The jobs stay behind, done: use a scratch database."""
    started = asyncio.Event()

    async def start(session: AsyncSession, job: Any) -> None:
        started.set()  # the measured moment: the handler runs

    maker, stop = make_session_maker(engine), asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        listener = await stack.enter_async_context(Listener(engine, model)) if listen else None
        result = Pickup("notify" if listen else "poll", poll, bool(listener and listener.listening))
        options: dict[str, Any] = {"stop": stop, "poll": poll, "listener": listener}
        tasks = [
            asyncio.create_task(run_worker(engine, model, start, **options)) for _ in range(workers)
        ]
        try:
            for _ in range(jobs):
                await asyncio.sleep(random.uniform(0, poll))  # any moment of the poll cycle
                started.clear()
                begun = time.perf_counter()
                async with maker() as session:
                    await enqueue(session, model, {"bench": "pickup"})
                await asyncio.wait_for(started.wait(), poll + 30)
                result.seconds.append(time.perf_counter() - begun)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return result


def format_pickups(results: list[Pickup]) -> str:
    lines = [f"{'variant':<8} {'poll s':>7} {'jobs':>5} {'p50 ms':>9} {'p99 ms':>9}  listening"]
    for r in results:
        lines.append(
            f"{r.variant:<8} {r.poll:>7.2f} {len(r.seconds):>5} {r.p50 * 1000:>9.1f} "
            f"{r.p99 * 1000:>9.1f}  {'yes' if r.listening else 'no'}"
        )
    return "\n".join(lines)


async def bench_pickup(url: str | None, jobs: int, workers: int, poll: float) -> list[Pickup]:
    """Both variants on the kit's ``Job`` table, in a scratch database beside ``url``."""
    from ..models import Job

    async with throwaway_database(resolve_url(url), "asyncpatterns_bench") as scratch:
        engine = make_engine(scratch)
        try:
            await create_db_and_tables(engine)
            print(f"pickup latency on {mask_password(engine.url)}", flush=True)
            options: dict[str, Any] = {"jobs": jobs, "workers": workers, "poll": poll}
            return [
                await measure_pickup(engine, Job, listen=True, **options),
                await measure_pickup(engine, Job, listen=False, **options),
            ]
        finally:
            await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: $DATABASE_URL or SQLite)")
    parser.add_argument("--jobs", type=int, default=50, help="default: 50")
    parser.add_argument("--workers", type=int, default=2, help="default: 2")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds (default: 1)")
    args = parser.parse_args(argv)
    print(format_pickups(asyncio.run(bench_pickup(args.url, args.jobs, args.workers, args.poll))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
