"""PostgreSQL behind PgBouncer: what the settings for transaction pooling cost.

    python -m asyncpatterns bench pooler [--url postgresql://...] [--quick] [--json FILE]

Every variant runs the same work, ``clients`` at a time: a transaction that reads
one user by primary key (a checkout, BEGIN, the SELECT, COMMIT). It reports
transactions per second and the p50 and p99 of one transaction, with each
variant's throughput as a ratio of the direct engine's, measured in one run:

* ``direct`` -- ``make_engine(url)``: the kit's pool, straight to PostgreSQL;
* ``pgbouncer, app pool`` -- ``make_engine(bouncer, pooler="pgbouncer")``: the
  kit's pool in front of PgBouncer (no prepared statement kept, timeouts set per
  transaction);
* ``pgbouncer, no SET LOCAL`` -- the same without the per-transaction timeouts
  (``lock_timeout=None``): what setting them costs;
* ``pgbouncer, NullPool`` -- ``pooling.make_pooler_engine``: a new connection to
  PgBouncer for every checkout;

each on asyncpg and on psycopg. PgBouncer is Debian's, started for the run on a
port of its own (``topology.pgbouncer``); the data is in a scratch database.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import ConfigurationError, resolve_url
from ..db import create_db_and_tables, make_engine, make_session_maker, throwaway_database
from ..models import User
from ..pooling import make_pooler_engine
from ..topology.pgbouncer import installed, running_pgbouncer

USERS = 1000
FULL = {"transactions": 4000, "clients": 32}
QUICK = {"transactions": 200, "clients": 8}


async def _transactions(engine: AsyncEngine, count: int, clients: int) -> dict[str, float]:
    sessions = make_session_maker(engine)
    latencies: list[float] = []
    queue = iter(range(count))

    async def client() -> None:
        for n in queue:
            start = time.perf_counter()
            async with sessions() as session, session.begin():
                await session.scalar(select(User.name).where(User.id == n % USERS + 1))
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(client() for _ in range(clients)))  # warm the pool
    latencies.clear()
    queue = iter(range(count))
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {"tps": count / elapsed, "p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}


async def run_pooler_bench(url: str | URL | None, quick: bool = False) -> list[dict[str, Any]]:
    """Every variant on both drivers; a list of result rows (variant, driver, tps, p50, p99)."""
    resolved = resolve_url(url)
    if resolved.get_backend_name() != "postgresql":
        raise ConfigurationError("bench pooler needs a PostgreSQL URL (PgBouncer pools PostgreSQL)")
    if not installed():
        raise ConfigurationError(
            "bench pooler needs Debian's pgbouncer (apt-get install pgbouncer)"
        )
    sizes = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    async with throwaway_database(resolved, "asyncpatterns_bench") as scratch:
        setup = make_engine(scratch)
        await create_db_and_tables(setup)
        async with setup.begin() as conn:
            users = [{"name": f"u{i}", "email": f"u{i}@example.com"} for i in range(USERS)]
            await conn.execute(insert(User), users)
        await setup.dispose()
        with running_pgbouncer(scratch.host or "127.0.0.1", scratch.port or 5432) as port:
            for driver in ("asyncpg", "psycopg"):
                direct = scratch.set(drivername=f"postgresql+{driver}")
                bouncer = direct.set(host="127.0.0.1", port=port)
                variants = {
                    "direct": lambda d=direct: make_engine(d),
                    "pgbouncer, app pool": lambda b=bouncer: make_engine(b, pooler="pgbouncer"),
                    "pgbouncer, no SET LOCAL": lambda b=bouncer: make_engine(
                        b, pooler="pgbouncer", lock_timeout=None
                    ),
                    "pgbouncer, NullPool": lambda b=bouncer: make_pooler_engine(b),
                }
                for variant, build in variants.items():
                    engine = build()
                    try:
                        measured = await _transactions(
                            engine, sizes["transactions"], sizes["clients"]
                        )
                    finally:
                        await engine.dispose()
                    rows.append({"variant": variant, "driver": driver, **measured})
    for row in rows:
        base = next(r for r in rows if r["driver"] == row["driver"] and r["variant"] == "direct")
        row["x_direct"] = row["tps"] / base["tps"]
    return rows


def format_pooler_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'variant':<26}{'driver':<9}{'tx/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'x direct':>10}"]
    for r in rows:
        lines.append(
            f"{r['variant']:<26}{r['driver']:<9}{r['tps']:>8.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['x_direct']:>10.2f}"
        )
    return "\n".join(lines)


def pooler_bench_command(url: str | None, quick: bool, json_path: str | None) -> int:
    rows = asyncio.run(run_pooler_bench(url, quick))
    print(format_pooler_rows(rows))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(rows, out, indent=2)
    return 0
