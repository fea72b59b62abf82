"""Running the bench and reporting it: the command, the table, the JSON, the plot."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
import sqlmodel
from sqlalchemy.engine import URL
from tqdm import tqdm

from ..config import ConfigurationError, mask_password, resolve_url
from ..db import create_db_and_tables, make_engine, throwaway_database
from .concurrency import pool_sweep, transfers
from .inserts import bulk_insert
from .loading import eager_loading
from .measure import ANTI, DEFAULT_REPEATS, KIT, OTHER, QUICK_REPEATS, RAW, Result
from .pages import pagination_scenario
from .scenarios import FULL, QUICK, ROW_AT_A_TIME_LIMIT
from .streams import streaming_scenario
from .upserts import upsert

SCENARIOS = (
    "bulk_insert",
    "eager_loading",
    "pool_sweep",
    "transfers",
    "streaming",
    "upsert",
    "pagination",
)


@dataclass
class Report:
    backend: str
    url: str  # password masked
    quick: bool
    repeats: int
    sizes: dict[str, int]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    versions: dict[str, str] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    elapsed: dict[str, float] = field(default_factory=dict)  # wall time per scenario

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "sqlmodel": sqlmodel.__version__,
        "cpus": str(os.cpu_count()),
    }


async def _run_scenario(
    name: str, url: URL, sizes: dict[str, int], repeats: int, progress: tqdm | None
) -> list[Result]:
    if name == "pool_sweep":
        return await pool_sweep(
            url,
            queries=sizes["queries"],
            tasks=min(100, sizes["queries"] // 2),
            repeats=repeats,
            progress=progress,
        )
    engine = make_engine(url)
    try:
        await create_db_and_tables(engine)
        if name == "bulk_insert":
            return await bulk_insert(engine, sizes["users"], repeats, progress)
        if name == "eager_loading":
            return await eager_loading(engine, sizes["teams"], sizes["members"], repeats, progress)
        if name == "upsert":
            return await upsert(engine, sizes["users"], repeats, progress)
        if name == "streaming":
            return await streaming_scenario(engine, sizes["stream_rows"], repeats, progress)
        if name == "pagination":
            return await pagination_scenario(engine, sizes["page_rows"], repeats, progress)
        return await transfers(engine, sizes["transfers"], repeats=repeats, progress=progress)
    finally:
        await engine.dispose()


async def run_bench(
    url: str | URL | None = None,
    quick: bool = False,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
    progress: bool = False,
    rows: int | None = None,
    stream_rows: Sequence[int] | None = None,
) -> Report:
    """Run the scenarios in a scratch database next to ``url`` and report.

    ``repeats`` timed runs per variant: 5 by default, 3 with ``quick``.
    ``rows``: users written by ``bulk_insert`` and ``upsert`` (default 10,000;
    100 with ``quick``).
    ``stream_rows``: the table sizes ``streaming`` reads (default 10,000 and 100,000).
    """
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    if repeats < 1:
        raise ConfigurationError(f"repeats must be at least 1, not {repeats}")
    resolved = resolve_url(url)
    backend = resolved.get_backend_name()
    sizes = dict(QUICK if quick else FULL)
    if rows is not None:
        if rows < 1:
            raise ConfigurationError(f"rows must be at least 1, not {rows}")
        sizes["users"] = rows
    if stream_rows is not None:
        if not stream_rows or min(stream_rows) < 1:
            raise ConfigurationError(f"stream rows must be at least 1, not {stream_rows}")
        sizes["stream_rows"] = tuple(stream_rows)  # type: ignore[assignment]
    report = Report(
        backend,
        mask_password(resolved),
        quick,
        repeats,
        sizes,
        os.getloadavg(),
        versions=_versions(),
    )
    steps = [s for s in SCENARIOS if not only or s in only]
    with tqdm(
        total=sum(
            _rounds(n, backend, repeats, sizes["users"], len(sizes["stream_rows"]))  # type: ignore[arg-type]
            for n in steps
        ),
        disable=not progress,
        unit="run",
        leave=False,
    ) as bar:
        async with throwaway_database(resolved, "asyncpatterns_bench") as scratch:
            for name in steps:
                bar.set_description(name)
                start = time.perf_counter()
                report.results += await _run_scenario(name, scratch, sizes, repeats, bar)
                report.elapsed[name] = round(time.perf_counter() - start, 2)
    report.load_after = os.getloadavg()
    return report


def _rounds(scenario: str, backend: str, repeats: int, users: int, stream_sizes: int = 2) -> int:
    bulk = 3 + (2 if backend == "postgresql" else 0) + (2 if users <= ROW_AT_A_TIME_LIMIT else 0)
    variants = {
        "bulk_insert": bulk,
        "eager_loading": 4,
        "pool_sweep": 3,
        "transfers": 2,
        "streaming": 4 * stream_sizes,
        "upsert": 2 + (1 if users <= ROW_AT_A_TIME_LIMIT else 0),
        "pagination": 5,
    }[scenario]
    return variants * (repeats + 2)  # a warm-up round and a memory round


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:,.2f}x" if value < 100 else f"{value:,.0f}x"


def format_report(report: Report) -> str:
    """The report as a plain-text table, one block per scenario."""
    lines = [
        f"asyncpatterns bench on {report.url} ({report.backend}"
        f"{', quick' if report.quick else ''}): median of {report.repeats} runs "
        f"after a warm-up, variants interleaved",
        f"load average before {_load(report.load_before)}, after {_load(report.load_after)}",
    ]
    header = (
        f"  {'variant':<38} {'median s':>9} {'stmts':>6} {'peak MiB':>9} {'kept MiB':>9} "
        f"{'/ raw':>8} {'speed-up':>9}  notes"
    )
    for scenario in SCENARIOS:
        rows = [r for r in report.results if r.scenario == scenario]
        if rows:
            took = f"{report.elapsed[scenario]:.1f} s in all" if scenario in report.elapsed else ""
            lines += ["", f"== {scenario} {_size(rows[0])} {took}".rstrip(), header]
        for r in rows:
            lines.append(
                f"  {r.variant:<38} {r.seconds:>9.4f} {r.statements:>6} "
                f"{r.peak_bytes / 2**20:>9.1f} {r.kept_bytes / 2**20:>9.1f} "
                f"{_ratio(r.vs_raw):>8} {_ratio(r.speedup):>9}  "
                f"{r.notes}".rstrip()
            )
    lines += [
        "",
        "/ raw: time divided by the raw driver's (1.00x is the physical limit); "
        "speed-up: the anti-pattern's time divided by this one's.",
        "stmts: statements sent (sqlwatch), plus the driver calls it cannot see for "
        "raw-driver and COPY variants.",
        "peak MiB: the most Python heap a run held at once (tracemalloc, in a separate "
        "untimed run; memory drivers allocate in C is not counted); kept MiB: of which "
        "still held when the run returned (the ORM state of objects it made persistent).",
    ]
    return "\n".join(lines)


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _size(result: Result) -> str:
    extra = result.extra
    if "sizes" in extra:
        return "(" + " / ".join(f"{size:,}" for size in extra["sizes"]) + " rows)"
    if "skip" in extra:
        return f"({extra['rows']:,} users, a page of {extra['page']} after {extra['skip']:,})"
    if "existing" in extra:
        return f"({extra['users']:,} users, {extra['existing']:,} of them stored already)"
    if "users" in extra:
        return f"({extra['users']:,} users)"
    if "teams" in extra:
        return f"({extra['teams']} teams x {extra['members']} members)"
    if "queries" in extra:
        return f"({extra['queries']} queries of 5 ms from {extra['tasks']} tasks)"
    return f"({extra['transfers']} concurrent transfers among {extra['accounts']} accounts)"


def bench_command(
    url: str | None,
    quick: bool = False,
    json_file: str | None = None,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
    rows: int | None = None,
    stream_rows: Sequence[int] | None = None,
) -> int:
    """``python -m asyncpatterns bench``: run, print the table, optionally write JSON."""
    progress = not quick and sys.stderr.isatty()
    report = asyncio.run(run_bench(url, quick, only, repeats, progress, rows, stream_rows))
    print(format_report(report))
    if json_file:
        Path(json_file).write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
        print(f"\nJSON written to {json_file}")
    return 0


def summary(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One plain record per variant, for a DataFrame."""
    return [
        {
            "variant": r.variant,
            "kind": r.kind,
            "median_s": round(r.seconds, 4),
            "statements": r.statements,
            "peak_MiB": round(r.peak_bytes / 2**20, 1),
            "kept_MiB": round(r.kept_bytes / 2**20, 1),
            "vs_raw": None if r.vs_raw is None else round(r.vs_raw, 2),
            "speedup": None if r.speedup is None else round(r.speedup, 1),
        }
        for r in results
    ]


KIND_COLOURS = {ANTI: "tab:red", OTHER: "tab:gray", KIT: "tab:green", RAW: "tab:blue"}


def plot_results(results: Sequence[Result], title: str = "") -> Any:
    """A horizontal bar per variant (log scale), coloured by kind; needs matplotlib."""
    import matplotlib.pyplot as plt  # the lab/test extra, not needed to run bench

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(results) + 1))
    ax.barh(
        [r.variant for r in results],
        [r.seconds for r in results],
        color=[KIND_COLOURS[r.kind] for r in results],
    )
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("median seconds (log scale)")
    ax.set_title(title or results[0].scenario)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax.legend(handles, KIND_COLOURS, loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig
