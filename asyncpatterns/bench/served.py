"""``python -m asyncpatterns bench api``: the served app against the ladder, over HTTP.

    python -m asyncpatterns bench api [--url URL] [--quick] [--json FILE]
                                      [--rungs raw,kit] [--clients 1,32,128] [--seconds N]

Each rung of ``ladder.py`` is served by uvicorn (one worker, its own process,
a free port) on one scratch database holding 10,000 users, warmed up, then
driven by ``wrk``: per endpoint and number of concurrent connections, req/s,
p50 and p99 latency, and every answer that was not a 2xx (by status, and how
many 503s carried ``Retry-After``). ``wrk`` is C on its own thread: it is not
the bottleneck (the raw rung's req/s is the proof, shown beside the others).

Nothing here asserts a timing; the ratios (kit/raw, kit/seed) come from one run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import URL

from ..config import ConfigurationError, mask_password, resolve_url
from .ladder import RUNGS, SYNC_DRIVERS, URL_VARIABLE

ENDPOINTS = ("get", "list", "post", "patch")
CLIENTS = (1, 32, 128)
SEED_ROWS = 10_000
SECONDS, QUICK_SECONDS = 10.0, 1.0
PAGE = 50

# One Lua script drives every endpoint: wrk calls request() for each request,
# response() for each answer (statuses counted per thread), done() once at the end.
WRK_SCRIPT = """
local endpoint, rows, tag = "%(endpoint)s", %(rows)d, "%(tag)s"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  counter, counts, retry_after = 0, {}, 0
  math.randomseed(tid * 7919 + os.time())
end
function request()
  counter = counter + 1
  local id = math.random(1, rows)
  if endpoint == "get" then
    return wrk.format("GET", "/users/" .. id)
  elseif endpoint == "list" then
    local skip = math.random(0, rows - %(page)d)
    return wrk.format("GET", "/users/?skip=" .. skip .. "&limit=%(page)d")
  elseif endpoint == "post" then
    local body = '{"name": "Bench user", "email": "' .. tag .. "-" .. tid .. "-" .. counter ..
      '@bench.example"}'
    return wrk.format("POST", "/users/", {["Content-Type"] = "application/json"}, body)
  else
    return wrk.format("PATCH", "/users/" .. id,
      {["Content-Type"] = "application/json", ["If-Match"] = "*"},
      '{"name": "Renamed ' .. counter .. '"}')
  end
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if status == 503 and (headers["retry-after"] or headers["Retry-After"]) then
    retry_after = retry_after + 1
  end
end
function done(summary, latency, requests)
  local statuses, with_retry_after = {}, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      statuses[tostring(status)] = (statuses[tostring(status)] or 0) + n
    end
    with_retry_after = with_retry_after + thread:get("retry_after")
  end
  local parts = {}
  for status, n in pairs(statuses) do table.insert(parts, '"' .. status .. '": ' .. n) end
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "seconds": %%.3f, "p50_us": %%d, "p99_us": %%d, ' ..
    '"socket_errors": %%d, "timeouts": %%d, "retry_after": %%d, "statuses": {%%s}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write, e.timeout, with_retry_after, table.concat(parts, ", ")))
end
"""


@dataclass
class Cell:
    """One rung, endpoint and number of connections, as wrk measured it."""

    rung: str
    endpoint: str
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    socket_errors: int
    timeouts: int
    retry_after: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def not_2xx(self) -> int:
        bad = sum(n for status, n in self.statuses.items() if not status.startswith("2"))
        return bad + self.socket_errors + self.timeouts


@dataclass
class ApiReport:
    backend: str
    url: str
    seconds: float
    loop: str
    http: str
    cells: list[Cell] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def cell(self, rung: str, endpoint: str, clients: int) -> Cell | None:
        for cell in self.cells:
            if (cell.rung, cell.endpoint, cell.clients) == (rung, endpoint, clients):
                return cell
        return None

    def ratio(self, rung: str, base: str, endpoint: str, clients: int) -> float | None:
        top, bottom = self.cell(rung, endpoint, clients), self.cell(base, endpoint, clients)
        if top is None or bottom is None or not bottom.rps:
            return None
        return top.rps / bottom.rps

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for cell, raw in zip(self.cells, data["cells"], strict=True):
            raw.update(rps=round(cell.rps, 1), not_2xx=cell.not_2xx)
        data["ratios"] = {
            f"kit/{base} {endpoint} @{clients}": round(ratio, 3)
            for base in ("raw", "seed")
            for endpoint in ENDPOINTS
            for clients in CLIENTS
            if (ratio := self.ratio("kit", base, endpoint, clients)) is not None
        }
        return data


def event_loop_name() -> str:
    """The loop uvicorn picks by default (``--loop auto``): uvloop when installed."""
    return "uvloop" if _importable("uvloop") else "asyncio"


def http_parser_name() -> str:
    """The HTTP parser uvicorn picks by default (``--http auto``): httptools when installed."""
    return "httptools" if _importable("httptools") else "h11"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _why_not(rung: str, url: URL) -> str | None:
    """Why ``rung`` cannot run here, or None."""
    if rung == "sync":
        driver = SYNC_DRIVERS[url.get_backend_name()]
        module = {"postgresql+psycopg": "psycopg", "mysql+pymysql": "pymysql"}.get(driver)
        if module and not _importable(module):
            return f"{module} is not installed (pip install 'asyncpatterns[bench]')"
    return None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Server:
    """One rung under uvicorn in a process of its own, stopped on exit."""

    def __init__(self, rung: str, url: URL) -> None:
        self.rung, self.port = rung, _free_port()
        env = {**os.environ, URL_VARIABLE: url.render_as_string(hide_password=False)}
        # The server's errors go to a file: a pipe nobody reads fills up under load, and
        # the server then hangs on its next log line.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- closed by __exit__
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                f"asyncpatterns.bench.ladder:{rung.replace('-', '_')}",
            ]
            + ["--host", "127.0.0.1", "--port", str(self.port)]
            + ["--log-level", "warning", "--no-access-log"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def settle(self, patience: float = 60.0) -> None:
        """Wait until the requests still queued from the last cell are answered (wrk
        stops sending, not the server serving): a read and a write, each answered
        within half a second. A read alone says nothing of queued writes: on SQLite
        (WAL) it is not held up by them, and the next cell's writes were."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            start = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):  # a dead server shows in the cells
                httpx.get(f"{self.base}/users/1", timeout=patience)
                read = time.monotonic()
                httpx.patch(
                    f"{self.base}/users/1",
                    json={"name": "Settled"},
                    headers={"If-Match": "*"},
                    timeout=patience,
                )
                if read - start < 0.5 and time.monotonic() - read < 0.5:
                    return
        # Still busy after a minute: the next cells will show it (few or no answers).

    def errors(self) -> str:
        """What the server wrote to stderr so far."""
        self.log.seek(0)
        return self.log.read()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        deadline, last = time.monotonic() + 60, "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.rung} did not start:\n{self.errors()}")
            try:
                answer = httpx.get(f"{self.base}/users/1", timeout=2)
            except httpx.HTTPError as exc:
                last = repr(exc)
            else:
                if answer.status_code == 200:
                    return self
                last = f"{answer.status_code} {answer.text[:200]}"
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"{self.rung} did not answer GET /users/1 within 60 s: {last}")

    def __exit__(self, *_: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def wrk(base: str, endpoint: str, clients: int, seconds: float, tag: str) -> dict[str, Any]:
    """One wrk run; its done() line, parsed."""
    script = WRK_SCRIPT % {"endpoint": endpoint, "rows": SEED_ROWS, "tag": tag, "page": PAGE}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        threads = min(2, clients)
        finished = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(seconds))}s"]
            + ["--timeout", "10s", "-s", file.name, base],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        Path(file.name).unlink()
    line = next(line for line in finished.stdout.splitlines() if line.startswith("WRK "))
    return json.loads(line[4:])


async def _seed(url: URL) -> None:
    from ..crud import create_users
    from ..db import create_db_and_tables, make_engine, make_session_maker
    from ..models import User

    engine = make_engine(url)
    try:
        await create_db_and_tables(engine)
        async with make_session_maker(engine)() as session:
            await create_users(
                session,
                [User(name=f"User {i}", email=f"user{i}@seed.example") for i in range(SEED_ROWS)],
            )
    finally:
        await engine.dispose()


def run_api_bench(
    url: str | URL | None = None,
    *,
    quick: bool = False,
    rungs: list[str] | None = None,
    clients: list[int] | None = None,
    seconds: float | None = None,
    progress: Any = None,
) -> ApiReport:
    """Serve each rung on a scratch copy of ``url``'s database and drive it with wrk."""
    import asyncio

    from ..db import throwaway_database

    if shutil.which("wrk") is None:
        raise ConfigurationError("bench api needs wrk on PATH (Debian: apt-get install wrk)")
    resolved = resolve_url(url)
    seconds = seconds or (QUICK_SECONDS if quick else SECONDS)
    report = ApiReport(
        resolved.get_backend_name(),
        mask_password(resolved),
        seconds,
        event_loop_name(),
        http_parser_name(),
    )

    async def scratch() -> None:
        async with throwaway_database(resolved, "asyncpatterns_bench") as scratch_url:
            await _seed(scratch_url)
            await asyncio.to_thread(_drive, report, scratch_url, rungs, clients, progress)

    asyncio.run(scratch())
    return report


def _drive(
    report: ApiReport,
    url: URL,
    rungs: list[str] | None,
    clients: list[int] | None,
    progress: Any,
) -> None:
    tag = f"r{os.getpid()}-{int(time.time())}"
    for rung in rungs or list(RUNGS):
        if (reason := _why_not(rung, url)) is not None:
            report.skipped[rung] = reason
            continue
        with Server(rung, url) as server:
            wrk(server.base, "get", 32, 1, tag)  # warm up: connections, caches, JIT-less paths
            for endpoint in ENDPOINTS:
                for n in clients or CLIENTS:
                    raw = wrk(server.base, endpoint, n, report.seconds, f"{tag}-{rung}-{n}")
                    cell = Cell(
                        rung,
                        endpoint,
                        n,
                        raw["requests"],
                        raw["seconds"],
                        raw["p50_us"] / 1000,
                        raw["p99_us"] / 1000,
                        raw["statuses"],
                        raw["socket_errors"],
                        raw["timeouts"],
                        raw["retry_after"],
                    )
                    report.cells.append(cell)
                    if progress:
                        progress(cell)
                    server.settle()  # the next cell starts on an idle server


def format_api_report(report: ApiReport) -> str:
    """The table: one line per rung, endpoint and number of connections, then the ratios."""
    lines = [
        f"bench api on {report.backend} ({report.url}), uvicorn 1 worker, "
        f"{report.loop} + {report.http}, wrk {report.seconds:g} s per cell, {SEED_ROWS:,} users",
        f"{'rung':<13} {'endpoint':<6} {'conns':>5} {'req/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'not 2xx':>8}  statuses",
    ]
    for cell in report.cells:
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(cell.statuses.items()))
        lines.append(
            f"{cell.rung:<13} {cell.endpoint:<6} {cell.clients:>5} {cell.rps:>8.0f} "
            f"{cell.p50_ms:>8.1f} {cell.p99_ms:>8.1f} {cell.not_2xx:>8}  {statuses}"
            + (f" (503 with Retry-After: {cell.retry_after})" if cell.retry_after else "")
        )
    for rung, reason in report.skipped.items():
        lines.append(f"{rung}: skipped, {reason}")
    ratios = report.as_json()["ratios"]
    if ratios:
        lines.append(
            "ratios (req/s, one run): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        )
    return "\n".join(lines)


def api_bench_command(
    url: str | None,
    quick: bool,
    json_path: str | None,
    rungs: list[str] | None,
    clients: list[int] | None,
    seconds: float | None,
) -> int:
    unknown = sorted(set(rungs or ()) - set(RUNGS))
    if unknown:
        raise ConfigurationError(
            f"unknown rung {', '.join(unknown)}; choose from {', '.join(RUNGS)}"
        )
    report = run_api_bench(
        url,
        quick=quick,
        rungs=rungs,
        clients=clients,
        seconds=seconds,
        progress=lambda cell: print(
            f"  {cell.rung} {cell.endpoint} @{cell.clients}: {cell.rps:.0f} req/s", flush=True
        ),
    )
    print(format_api_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0


def check_report(data: dict[str, Any]) -> list[str]:
    """What a bench api JSON lacks: a rung or endpoint without answers, or a kit answer
    that is neither a 2xx nor a 503 with ``Retry-After`` (a 500, a dropped connection)."""
    problems = []
    seen = {(c["rung"], c["endpoint"]) for c in data["cells"] if c["requests"]}
    for rung in RUNGS:
        if rung in data["skipped"]:
            continue
        problems += [f"{rung} {e}: no answers" for e in ENDPOINTS if (rung, e) not in seen]
    for cell in data["cells"]:
        if cell["rung"] != "kit":
            continue
        refused = cell["not_2xx"] - cell["retry_after"]  # overload may be a 503 + Retry-After
        if refused:
            problems.append(
                f"kit {cell['endpoint']} @{cell['clients']}: {refused} answers neither 2xx nor "
                f"503 with Retry-After {cell['statuses']}"
            )
    return problems


if __name__ == "__main__":  # python -m asyncpatterns.bench.served --check FILE (CI)
    if sys.argv[1:2] != ["--check"] or len(sys.argv) != 3:
        sys.exit("usage: python -m asyncpatterns.bench.served --check FILE")
    problems = check_report(json.loads(Path(sys.argv[2]).read_text()))
    print(
        "\n".join(problems)
        or f"{sys.argv[2]}: every rung and endpoint answered; the kit only 2xx or 503 + Retry-After"
    )
    sys.exit(1 if problems else 0)
