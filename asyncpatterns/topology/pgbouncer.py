"""A PgBouncer of our own, in transaction mode, in front of a PostgreSQL server.

Debian's ``pgbouncer`` package, started on a port of its own with a config in a
folder of its own, never the system's. Notebook 13 and the tests through a
pooler use ``running_pgbouncer``; CI starts one for the suite run through it::

    python -m asyncpatterns.topology.pgbouncer --folder DIR [--port 6432] [--upstream-port 5432]

which prints the ``postgresql+psycopg://`` URL and leaves PgBouncer running in
the background (``--stop`` with the same folder stops it; the port defaults to
a free one).
"""

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONFIG = """\
[databases]
* = host={upstream_host} port={upstream_port}
; every client shares one server connection: what transaction pooling does, every time
asyncpatterns_one_server = host={upstream_host} port={upstream_port} dbname=postgres pool_size=1

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
admin_users = {user}
stats_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""


def installed() -> bool:
    return shutil.which("pgbouncer") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(
    folder: Path,
    port: int,
    *,
    upstream_host: str = "127.0.0.1",
    upstream_port: int = 5432,
    user: str = "postgres",
    pool_size: int = 20,
) -> None:
    """Write the config into ``folder`` and start PgBouncer as a daemon; wait until
    it accepts connections."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        CONFIG.format(
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            port=port,
            folder=folder,
            user=user,
            pool_size=pool_size,
        )
    )
    command = ["pgbouncer", "-d", "-q", str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        account = pwd.getpwnam(user)
        os.chown(folder, account.pw_uid, account.pw_gid)
        for child in folder.iterdir():
            os.chown(child, account.pw_uid, account.pw_gid)
        command[1:1] = ["-u", user]
    subprocess.run(command, check=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    log = folder / "pgbouncer.log"
    raise RuntimeError(f"PgBouncer did not start: {log.read_text() if log.exists() else ''}")


@contextmanager
def running_pgbouncer(
    upstream_host: str = "127.0.0.1", upstream_port: int = 5432, *, pool_size: int = 20
) -> Iterator[int]:
    """A PgBouncer in front of the server at ``upstream_host:upstream_port``, in
    transaction mode, on a free port (yielded); stopped and removed afterwards."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="asyncpatterns-pgbouncer-") as folder:
        start(
            Path(folder),
            port,
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            pool_size=pool_size,
        )
        try:
            yield port
        finally:
            stop(Path(folder))


def stop(folder: Path) -> None:
    """Stop the PgBouncer started in ``folder`` and wait until it has gone."""
    pidfile = folder / "pgbouncer.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGINT)  # SIGINT: safe shutdown (SIGTERM waits for clients)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--upstream-port", type=int, default=5432)
    parser.add_argument("--stop", action="store_true")
    args = parser.parse_args()
    if args.stop:
        stop(args.folder)
        return 0
    port = args.port or free_port()
    start(args.folder.resolve(), port, upstream_port=args.upstream_port)
    print(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    return 0


if __name__ == "__main__":
    sys.exit(main())
