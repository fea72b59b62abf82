"""Throw-away PostgreSQL clusters of your own, made with Debian's postgresql-common.

For learning and testing production shapes on one machine (notebook 13, the
tests): a primary with the settings you choose (a low ``max_connections``,
say) and a streaming standby of it. A cluster is what these commands make
(run as root; the cluster belongs to the ``postgres`` user)::

    pg_createcluster 15 NAME -p PORT --start-conf=manual -o fsync=off ... \\
        -- --auth-local=trust --auth-host=trust
    pg_ctlcluster 15 NAME start
    pg_dropcluster --stop 15 NAME

and a streaming standby of it is a second cluster whose data directory is
replaced by a base backup of the first (``-R`` writes ``standby.signal`` and
``primary_conninfo``)::

    pg_createcluster 15 STANDBY -p PORT2 --start-conf=manual
    rm -rf /var/lib/postgresql/15/STANDBY/*
    sudo -u postgres pg_basebackup -h 127.0.0.1 -p PORT -U postgres \\
        -D /var/lib/postgresql/15/STANDBY -R -X stream -c fast
    pg_ctlcluster 15 STANDBY start

Here the server is started with ``pg_ctl -w`` itself: ``pg_ctlcluster start``
polls every half second and then checks again, about 2 s a start, where
``pg_ctl -w`` returns as soon as the server accepts connections (a cluster
is made and started in under a second). ``fsync=off``: the data is thrown away.

Names are ``asyncpatterns_<random hex>`` and ports are free ones, so parallel
runs do not collide. The context managers drop their cluster on the way out,
an error included, and an ``atexit`` hook drops what an interrupted run left.
Without the tools, or for a user who cannot use them, ``ClustersUnavailable``
says which is missing.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

LIB = Path("/usr/lib/postgresql")
SOCKETS = Path("/var/run/postgresql")
# Settings of every throw-away cluster: fast (the data is thrown away), no TLS. (pg_createcluster
# writes an -o value that looks like a number unquoted: "127.0.0.1" would not parse.)
FAST = {
    "fsync": "off",
    "ssl": "off",
}


class ClustersUnavailable(RuntimeError):
    """This machine cannot make clusters: the tools are missing, or the user may not."""


def installed_version() -> str:
    """The newest installed PostgreSQL major version, or ``ClustersUnavailable``."""
    versions = sorted(
        (p.name for p in LIB.glob("*") if (p / "bin" / "postgres").exists()), key=float
    )
    if shutil.which("pg_createcluster") is None or not versions:
        raise ClustersUnavailable(
            "pg_createcluster or a PostgreSQL server is missing (Debian: postgresql)"
        )
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "postgres":
        raise ClustersUnavailable("making a cluster needs root or the postgres user")
    return versions[-1]


@dataclass
class Cluster:
    version: str
    name: str
    port: int

    @property
    def data_dir(self) -> Path:
        return Path("/var/lib/postgresql") / self.version / self.name

    @property
    def log_path(self) -> Path:
        return Path("/var/log/postgresql") / f"postgresql-{self.version}-{self.name}.log"

    def url(self, driver: str = "asyncpg", user: str = "postgres") -> URL:
        return URL.create(
            f"postgresql+{driver}", user, host="127.0.0.1", port=self.port, database="postgres"
        )

    def start(self) -> None:
        config = f"/etc/postgresql/{self.version}/{self.name}/postgresql.conf"
        _run(
            [_bin(self.version, "pg_ctl"), "start", "-w", "-t", "60", "-s"]
            + [
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-o",
                f"-c config_file={config}",
            ],
            as_postgres=True,
            log=self.log_path,
        )

    def stop(self) -> None:
        _run(["pg_ctlcluster", self.version, self.name, "stop", "-m", "fast"])

    def psql(self, sql: str) -> str:
        """Run ``sql`` as the superuser; its output, one row a line (``|`` between values)."""
        command = [_bin(self.version, "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1"]
        command += ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", sql]
        return _run(command).strip()

    def drop(self) -> None:
        _run(["pg_dropcluster", "--stop", self.version, self.name], check=False)
        atexit.unregister(self.drop)


def make_cluster(settings: Mapping[str, object] | None = None) -> Cluster:
    """A new cluster of the installed version on a free port, started; drop() it."""
    version = installed_version()
    for attempt in range(3):
        cluster = _create(version, {**FAST, **(settings or {})})
        try:
            cluster.start()
            return cluster
        except RuntimeError as exc:  # the port was taken meanwhile: once more, on another
            cluster.drop()
            if attempt == 2 or "could not bind" not in str(exc):
                raise
    raise AssertionError("not reached")


def make_standby(primary: Cluster, settings: Mapping[str, object] | None = None) -> Cluster:
    """A hot standby of ``primary``, streaming from it, started; drop() it."""
    standby = _create(primary.version, {**FAST, **(settings or {})})
    try:
        for entry in standby.data_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        _run(
            [_bin(primary.version, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port)]
            + ["-U", "postgres", "-D", str(standby.data_dir), "-R", "-X", "stream", "-c", "fast"],
            as_postgres=True,
        )
        standby.start()
        deadline = time.monotonic() + 30
        while standby.psql("SELECT status FROM pg_stat_wal_receiver") != "streaming":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{standby.name} is not streaming from {primary.name}")
            time.sleep(0.02)
    except BaseException:
        standby.drop()
        raise
    return standby


@contextmanager
def postgres_cluster(settings: Mapping[str, object] | None = None) -> Iterator[Cluster]:
    cluster = make_cluster(settings)
    try:
        yield cluster
    finally:
        cluster.drop()


@contextmanager
def standby_of(primary: Cluster, settings: Mapping[str, object] | None = None) -> Iterator[Cluster]:
    standby = make_standby(primary, settings)
    try:
        yield standby
    finally:
        standby.drop()


def _create(version: str, settings: Mapping[str, object]) -> Cluster:
    cluster = Cluster(version, f"asyncpatterns_{uuid.uuid4().hex[:12]}", _free_port())
    options = [f"--pgoption={key}={value}" for key, value in settings.items()]
    atexit.register(cluster.drop)
    try:
        _run(
            ["pg_createcluster", version, cluster.name, "-p", str(cluster.port), "--quiet"]
            + ["--start-conf=manual", "--locale=C.UTF-8", *options]
            + ["--", "--auth-local=trust", "--auth-host=trust", "--no-sync"]
        )
    except BaseException:
        cluster.drop()
        raise
    return cluster


def _free_port() -> int:
    """A TCP port nothing listens on, with no PostgreSQL socket file of that number."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not (SOCKETS / f".s.PGSQL.{port}").exists():
            return port


def _bin(version: str, program: str) -> str:
    return str(LIB / version / "bin" / program)


def _run(
    command: list[str], *, as_postgres: bool = False, check: bool = True, log: Path | None = None
) -> str:
    """Run a PostgreSQL tool (as the postgres user if asked and we are root); its stdout.
    A failure raises RuntimeError with the tool's own message (and the end of ``log``)."""
    user = "postgres" if as_postgres and os.geteuid() == 0 else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        command, capture_output=True, text=True, user=user, cwd="/", env=env, timeout=120
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:4])} ... failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
            + (f"\n{log}:\n{_tail(log)}" if log is not None else "")
        )
    return result.stdout


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
