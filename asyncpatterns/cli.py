"""``python -m asyncpatterns tour | bench | serve | worker | notebooks | site | migrate``.

``tour`` runs every pattern once against the embedded SQLite file (or ``--url`` /
``$DATABASE_URL``) and prints a short report (``tour.py``).

``serve`` migrates the database to the newest revision, once, then runs the FastAPI
app (``asyncpatterns.api``) with uvicorn (``--workers N`` processes), on
127.0.0.1:8000 by default; the API docs are at ``/docs``. Each worker's app checks
the schema at start-up instead of calling ``create_all``. SIGTERM (or Ctrl+C) stops
it gracefully: no new connections, the requests in flight finish (for up to
``--graceful-timeout`` seconds), the pools are closed, and the exit status is 0.

``notebooks`` re-executes the notebooks on a scratch SQLite file and stores
their outputs, the baseline nbval compares against.

``site`` renders the notebooks, with their committed outputs, as a static site in
``docs/_build/html`` (Sphinx and myst-nb, from the ``[docs]`` extra; see ``site.py``).

``worker`` runs ``--workers N`` job-queue workers (``jobs.py``) on the kit's ``Job``
table, with a demo handler, until SIGTERM or SIGINT: then no new job is claimed,
the jobs in hand get ``--grace`` seconds to finish (then they are released for
another worker), and the exit status is 0.

``migrate`` is Alembic's command line on the kit's migrations (``migrate upgrade
head``, ``migrate --url URL current``, ``migrate revision --autogenerate -m ...``),
the same as ``python -m asyncpatterns.migrations``.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from .bench import SCENARIOS, bench_command
from .config import ConfigurationError, DatabaseUnavailableError, resolve_url
from .db import make_engine
from .tour import TOUR_STEPS, tour  # noqa: F401  (TOUR_STEPS: the tests import it from cli too)

if TYPE_CHECKING:
    from .models import Job

_jobs_log = logging.getLogger("asyncpatterns.jobs")

# Seconds the requests in flight get to finish after SIGTERM; those still running
# then are cancelled (their transactions roll back, their clients get a 503:
# ``api/shutdown.py``) and the pools are closed. Below ``docker stop``'s 10 s before
# SIGKILL, above the slowest request the app lets through (3 s for a connection,
# 5 s for a lock).
GRACEFUL_SHUTDOWN = 8.0


class _Stopped(Exception):
    """SIGTERM asked the server to stop, and it has: a graceful exit, status 0."""


def _stopped(signum: int, frame: object) -> None:
    # Once: uvicorn's SIGTERM again, after its graceful shutdown. A SIGTERM after
    # that (the cleanup is stuck) stops the process at once, as Python's default does.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise _Stopped(signum)


def serve(
    url: str | None,
    host: str,
    port: int,
    workers: int = 1,
    connection_budget: int | None = None,
    *,
    graceful_timeout: float = GRACEFUL_SHUTDOWN,
) -> int:
    """Migrate the database to head once, then serve the API with uvicorn (``workers``
    processes) until SIGTERM or SIGINT, then stop gracefully (``graceful_timeout``)
    and return 0. An unreachable database, or one ``create_all`` made that needs
    adopting, fails here, in one line. ``connection_budget``: the connections all workers together
    may open, divided between them (``pooling.pool_settings_for_workers``); ``None``:
    each worker's pools keep the defaults."""
    from . import migrations
    from .api.app import BUDGET_VARIABLE, POOLS_PER_WORKER, WORKERS_VARIABLE
    from .bench.served import event_loop_name, http_parser_name
    from .pooling import pool_settings_for_workers

    # Each worker process reads these when it builds its app (api.app.migrated_app): the
    # worker count always, so that a budget exported by hand is shared too.
    os.environ[WORKERS_VARIABLE] = str(workers)
    if connection_budget is None and os.environ.get(BUDGET_VARIABLE):
        connection_budget = int(os.environ[BUDGET_VARIABLE])
    if connection_budget is not None:
        try:
            pool = pool_settings_for_workers(
                connection_budget, workers, pools_per_worker=POOLS_PER_WORKER
            )
        except ValueError as exc:
            raise ConfigurationError(f"--connection-budget: {exc}") from None
        os.environ[BUDGET_VARIABLE] = str(connection_budget)
        print(
            f"connection budget {connection_budget}: {workers} worker(s) x {POOLS_PER_WORKER} "
            f"pools x (pool_size {pool['pool_size']} + max_overflow {pool['max_overflow']})"
        )
    _run(_check_database(url))
    applied = _run(migrations.upgrade(url))  # before any worker starts: no start-up race
    print(
        f"schema: at revision {migrations.head()}"
        + (f" (applied {', '.join(applied)})" if applied else "")
    )
    loop, http = event_loop_name(), http_parser_name()
    hint = (
        ""
        if (loop, http) == ("uvloop", "httptools")
        else " (faster: pip install 'asyncpatterns[serve]')"
    )
    print(
        f"serving on http://{host}:{port}: {workers} worker(s), {loop} event loop, "
        f"{http} HTTP parser{hint}",
        flush=True,
    )
    if url is not None:  # each worker builds its app from the environment
        os.environ["DATABASE_URL"] = resolve_url(url).render_as_string(hide_password=False)
    # uvicorn stops gracefully on SIGTERM (``graceful_timeout``: see GRACEFUL_SHUTDOWN),
    # then raises the signal again, on the handler that was there before its own: with
    # Python's default the process would die of it after a clean shutdown (exit status
    # -15, a failure to a supervisor). This one makes that exit a return, status 0.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if in_main_thread else None
    try:
        # uvicorn's loop="auto" and http="auto" pick uvloop and httptools when installed.
        uvicorn.run(
            "asyncpatterns.api.app:migrated_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            timeout_graceful_shutdown=graceful_timeout,
        )
    except _Stopped:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


async def _check_database(url: str | None) -> None:
    engine = make_engine(url)
    try:
        async with engine.connect():
            pass
    finally:
        await engine.dispose()


def _run(coroutine: Awaitable[int | None]) -> int | None:
    """``asyncio.run``, but after a failed connection the loop stays open a moment:
    aiosqlite stops its worker thread after a failed connect without waiting for
    it, and a thread that finds its loop closed prints a stray traceback."""

    async def run() -> int | None:
        try:
            return await coroutine
        except DatabaseUnavailableError:
            await asyncio.sleep(0.05)
            raise

    return asyncio.run(run())


async def _demo_job(session: object, job: "Job") -> None:
    """The worker command's handler: logs the job (its payload's keys, not its
    values: they may be personal data). ``{"sleep": s}`` takes ``s`` seconds,
    ``{"fail": "why"}`` raises, to watch a retry and a dead job."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    _jobs_log.info("job %s, attempt %s: keys %s", job.id, job.attempts, sorted(payload))
    if isinstance(payload.get("sleep"), int | float):
        await asyncio.sleep(min(float(payload["sleep"]), 3600.0))
    if "fail" in payload:
        raise RuntimeError(str(payload["fail"]))


async def work_jobs(
    url: str | None, workers: int = 4, lease: float = 30.0, grace: float = 10.0, poll: float = 1.0
) -> int:
    """Run ``workers`` job workers on one engine until SIGTERM or SIGINT; return 0.
    Each finishes (or, after ``grace`` seconds, releases) the job in hand first. On
    PostgreSQL one ``notify.Listener`` wakes them when a job is enqueued."""
    from .config import mask_password
    from .jobs import run_worker
    from .models import Job
    from .notify import Listener

    if workers < 1:
        raise ConfigurationError("--workers: at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine = make_engine(url, pool_size=max(5, workers))
    print(f"worker: {workers} worker(s) on {mask_password(engine.url)}", flush=True)
    try:
        options = {"lease": lease, "grace": grace, "poll": poll}
        async with Listener(engine, Job) as listener:  # PostgreSQL: NOTIFY wakes idle workers
            ran = await asyncio.gather(
                *(
                    run_worker(engine, Job, _demo_job, stop=stop, listener=listener, **options)
                    for _ in range(workers)
                )
            )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await engine.dispose()
    print(f"worker: stopped, {sum(ran)} job(s) run", flush=True)
    return 0


def _sizes(text: str) -> list[int]:
    """``10000,100000`` (or ``10_000,100_000``) -> [10000, 100000]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of row counts: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncpatterns")
    commands = parser.add_subparsers(dest="command", required=True)
    tour_parser = commands.add_parser("tour", help="run every pattern once and report")
    tour_parser.add_argument("--url", help="database URL (default: $DATABASE_URL or SQLite)")
    bench_parser = commands.add_parser("bench", help="time patterns against anti-patterns")
    bench_parser.add_argument(
        "target",
        nargs="?",
        choices=["api", "pooler", "jobs"],
        help="api: the served app against the ladder of hand-written apps, over HTTP; "
        "pooler: PostgreSQL behind PgBouncer, each driver and pool; "
        "jobs: the job queue's claim against the common ones, and wake-up latency",
    )
    bench_parser.add_argument("--url", help="server or SQLite URL; bench uses a scratch database")
    bench_parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    bench_parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench_parser.add_argument(
        "--only", action="append", choices=SCENARIOS, help="only this one; repeatable"
    )
    bench_parser.add_argument("--repeats", type=int, help="timed runs (default 5, quick 3)")
    bench_parser.add_argument(
        "--rows", type=int, help="users bulk_insert inserts (default 10,000; quick 100)"
    )
    bench_parser.add_argument(
        "--stream-rows",
        type=_sizes,
        metavar="N,N,...",
        help="table sizes streaming reads (default 10000,100000; e.g. 10000,100000,1000000)",
    )
    bench_parser.add_argument(
        "--rungs", type=lambda text: text.split(","), help="bench api: e.g. raw,kit (default: all)"
    )
    bench_parser.add_argument(
        "--clients", type=_sizes, metavar="N,N,...", help="bench api: default 1,32,128"
    )
    bench_parser.add_argument(
        "--seconds", type=float, help="bench api: wrk's time per cell (default 10, quick 1)"
    )
    serve_parser = commands.add_parser("serve", help="serve the FastAPI app with uvicorn")
    serve_parser.add_argument("--url", help="database URL (default: $DATABASE_URL or SQLite)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve_parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (default: 1)"
    )
    serve_parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=GRACEFUL_SHUTDOWN,
        metavar="SECONDS",
        help="after SIGTERM, how long requests in flight may take to finish (default: 8)",
    )
    serve_parser.add_argument(
        "--connection-budget",
        type=int,
        metavar="N",
        help="database connections all workers together may open, divided between them "
        "(default: no budget, each pool 5 + 10)",
    )
    notebooks_parser = commands.add_parser(
        "notebooks", help="re-execute notebooks on scratch SQLite and store their outputs"
    )
    notebooks_parser.add_argument("paths", nargs="*", help="default: notebooks/*.ipynb")
    site_parser = commands.add_parser(
        "site", help="render the notebooks with their stored outputs as a static site"
    )
    site_parser.add_argument("--out", default="docs/_build/html", help="default: %(default)s")
    worker_parser = commands.add_parser(
        "worker", help="run job-queue workers (jobs.py) until SIGTERM"
    )
    worker_parser.add_argument("--url", help="database URL (default: $DATABASE_URL or SQLite)")
    worker_parser.add_argument("--workers", type=int, default=4, help="default: 4")
    worker_parser.add_argument(
        "--lease", type=float, default=30.0, metavar="SECONDS", help="default: 30"
    )
    worker_parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after SIGTERM, how long the jobs in hand may take to finish (default: 10)",
    )
    worker_parser.add_argument(
        "--poll", type=float, default=1.0, metavar="SECONDS", help="idle wait (default: 1)"
    )
    commands.add_parser(
        "migrate",
        help="schema migrations: upgrade head, downgrade base, current, check, revision ...",
        add_help=False,  # --help goes to the migrations' own command line
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "migrate":
        from .migrations import main as migrate  # Alembic's command line, on the kit's migrations

        return migrate(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "tour":
            return _run(tour(args.url))
        if args.command == "bench" and args.target == "api":
            from .bench.served import api_bench_command

            return api_bench_command(
                args.url, args.quick, args.json, args.rungs, args.clients, args.seconds
            )
        if args.command == "bench" and args.target == "pooler":
            from .bench.pooler import pooler_bench_command

            return pooler_bench_command(args.url, args.quick, args.json)
        if args.command == "bench" and args.target == "jobs":
            from .bench.jobs import jobs_bench_command

            return jobs_bench_command(args.url, args.quick, args.json)
        if args.command == "bench":
            return bench_command(
                args.url,
                args.quick,
                args.json,
                args.only,
                args.repeats,
                args.rows,
                args.stream_rows,
            )
        if args.command == "serve":
            return serve(
                args.url,
                args.host,
                args.port,
                args.workers,
                args.connection_budget,
                graceful_timeout=args.graceful_timeout,
            )
        if args.command == "worker":
            return _run(work_jobs(args.url, args.workers, args.lease, args.grace, args.poll))
        if args.command == "notebooks":
            from .notebook import regenerate  # needs the [lab] extra

            regenerate(args.paths or sorted(Path("notebooks").glob("*.ipynb")))
        if args.command == "site":
            from .site import build  # needs the [docs] extra

            return build(args.out)
    except (ConfigurationError, DatabaseUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
