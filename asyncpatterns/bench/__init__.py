"""Pattern vs anti-pattern vs raw driver: what the kit's patterns cost, measured.

    python -m asyncpatterns bench [--url URL] [--quick] [--rows N] [--json FILE] [--only SCENARIO]
                                  [--stream-rows N,N,...]

Three parts, each readable on its own: the scenarios (what is compared: the
common pattern, the kit's, the raw driver; one module per group, ``inserts``,
``upserts``, ``loading``, ``concurrency``, ``streams``, on ground they share in
``scenarios``), ``measure`` (how: interleaved rounds, statements counted, peak
memory, median time), ``report`` (running it in a scratch database, the table,
JSON and plot).

A benchmark is not a test: nothing here asserts a timing. Your data is safe:
``run_bench`` works in a database of its own. On a server it creates
``asyncpatterns_bench_<random>`` and drops it at the end (the URL's user needs
CREATE DATABASE); on SQLite it uses a scratch file in a temporary directory
beside the given file, deleted at the end.
"""

from .concurrency import common_transfer_funds, pool_sweep, reset_accounts, transfer_plan, transfers
from .inserts import bulk_insert, common_create_users, make_users, raw_copy, raw_executemany
from .loading import eager_loading
from .measure import (
    ANTI,
    DEFAULT_REPEATS,
    KIT,
    OTHER,
    QUICK_REPEATS,
    RAW,
    Result,
    Variant,
    add_ratios,
    measure,
)
from .pages import pagination_scenario
from .report import (
    SCENARIOS,
    Report,
    bench_command,
    format_report,
    plot_results,
    run_bench,
    summary,
)
from .scenarios import FULL, QUICK
from .streams import raw_stream, streaming_scenario
from .upserts import common_upsert_users, raw_upsert, upsert

__all__ = [
    "ANTI",
    "DEFAULT_REPEATS",
    "FULL",
    "KIT",
    "OTHER",
    "QUICK",
    "QUICK_REPEATS",
    "RAW",
    "SCENARIOS",
    "Report",
    "Result",
    "Variant",
    "add_ratios",
    "bench_command",
    "bulk_insert",
    "common_create_users",
    "common_transfer_funds",
    "common_upsert_users",
    "eager_loading",
    "format_report",
    "make_users",
    "measure",
    "pagination_scenario",
    "plot_results",
    "pool_sweep",
    "raw_copy",
    "raw_executemany",
    "raw_stream",
    "raw_upsert",
    "reset_accounts",
    "run_bench",
    "streaming_scenario",
    "summary",
    "transfer_plan",
    "transfers",
    "upsert",
]
