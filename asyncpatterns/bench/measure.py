"""How the bench measures: variants run interleaved, timed, counted and weighed.

Every variant of a scenario runs once as a warm-up (its statements counted
with ``sqlwatch``), once more with ``tracemalloc`` on (its peak memory, and
what its objects still hold at the end), then
``repeats`` timed rounds, interleaved in a rotating order so that no variant
always runs first. Its time is the median of the timed rounds.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from tqdm import tqdm

from ..sqlwatch import watch_sql

# What a variant is, for the ratios: the common pattern's code, the kit's pattern,
# another way people write it, or the driver used directly (the physical limit).
ANTI, KIT, OTHER, RAW = "anti-pattern", "kit", "alternative", "raw driver"

DEFAULT_REPEATS = 5
QUICK_REPEATS = 3  # --quick is a smoke run, not a measurement


@dataclass
class Result:
    """One variant of one scenario: its median time, what it sent, what it held."""

    scenario: str
    variant: str
    kind: str
    seconds: float
    statements: int
    runs: list[float]
    peak_bytes: int = 0  # the most Python heap the run held at once (tracemalloc)
    kept_bytes: int = 0  # of which still held when it returned (e.g. the ORM state of its objects)
    vs_raw: float | None = None  # this variant's time / the raw driver's
    speedup: float | None = None  # the anti-pattern's time / this variant's
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


Run = Callable[[Any], Awaitable[int | None]]
Prepare = Callable[[], Awaitable[Any]]


@dataclass
class Variant:
    """``run(payload)`` is timed; it returns the statements it sent that
    ``sqlwatch`` cannot see (raw-driver calls), or None. ``engine`` is the one
    to watch, when it is not the scenario's."""

    name: str
    kind: str
    run: Run
    engine: AsyncEngine | None = None


async def measure(
    scenario: str,
    engine: AsyncEngine,
    variants: Sequence[Variant],
    prepare: Prepare,
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
    after: Callable[[Variant], Awaitable[None]] | None = None,
) -> list[Result]:
    """Warm-up round (statements counted), memory round, ``repeats`` timed rounds.

    ``prepare()`` runs untimed before every variant's run (e.g. empty a table)
    and its return value is the run's input; ``after(variant)`` runs untimed
    after it (e.g. check an invariant).
    """
    statements: dict[str, int] = {}
    peaks: dict[str, list[int]] = {}
    runs: dict[str, list[float]] = {v.name: [] for v in variants}
    with _clean_heap_per_run():
        for round_number in range(repeats + 2):
            shift = round_number % len(variants)  # nobody always goes first
            for variant in [*variants[shift:], *variants[:shift]]:
                payload = await prepare()
                if round_number == 0:
                    with watch_sql(variant.engine or engine) as sql:
                        unseen = await variant.run(payload)
                    statements[variant.name] = sql.count + (unseen or 0)
                elif round_number == 1:
                    with _peak_memory() as peaks[variant.name]:
                        await variant.run(payload)
                else:
                    gc.collect()  # the garbage of earlier runs is not this run's cost
                    start = time.perf_counter()
                    await variant.run(payload)
                    runs[variant.name].append(time.perf_counter() - start)
                if after is not None:
                    await after(variant)
                if progress is not None:
                    progress.update()
    results = [
        Result(
            scenario,
            v.name,
            v.kind,
            statistics.median(runs[v.name]),
            statements[v.name],
            runs[v.name],
            *peaks[v.name],
        )
        for v in variants
    ]
    return add_ratios(results)


@contextmanager
def _peak_memory() -> Iterator[list[int]]:
    """``[peak, kept]``: the most Python heap allocated at once inside the block,
    and how much of what it allocated is still held at its end, in bytes.

    Counted from the block's start, so the run's input (made by ``prepare``)
    is not charged to it, but what the run attaches to that input is (the
    session's bookkeeping on objects it made persistent). Memory the drivers
    allocate in C is not seen.
    """
    gc.collect()
    sizes = [0, 0]
    tracemalloc.start()
    try:
        yield sizes
    finally:
        gc.collect()  # what is only garbage is not kept
        current, peak = tracemalloc.get_traced_memory()
        sizes[:] = [peak, current]
        tracemalloc.stop()


@contextmanager
def _clean_heap_per_run() -> Iterator[None]:
    """Freeze what exists now (modules, the caller's data), so that the
    collection before each run only sweeps what the runs left behind: ORM
    objects hold reference cycles, and a collection of them that falls inside
    a later run would be charged to whichever variant happened to trigger it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def add_ratios(results: list[Result]) -> list[Result]:
    """Fill ``vs_raw`` (time / the first raw variant's) and ``speedup`` (anti / time)."""
    raw = next((r.seconds for r in results if r.kind == RAW), None)
    anti = next((r.seconds for r in results if r.kind == ANTI), None)
    for result in results:
        if raw:
            result.vs_raw = result.seconds / raw
        if anti:
            result.speedup = anti / result.seconds
    return results
