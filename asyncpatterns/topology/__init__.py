"""Production shapes on one machine, to learn and test them: a PgBouncer in
transaction mode (``pgbouncer.py``) and PostgreSQL clusters of your own with a
streaming standby (``clusters.py``), started and removed by Debian's tools.

Not a pattern to copy into an app: these stand in for the pooler and the replica
your platform runs. Notebook 13 and the tests use them; the README's "Deploying"
section gives the commands.
"""

from __future__ import annotations

import socket

from sqlalchemy.engine import URL


def missing(postgres: URL) -> str | None:
    """What this machine lacks to run the topology against the PostgreSQL server at
    ``postgres`` (a PgBouncer, clusters of its own, the server): None when nothing."""
    # Imported here: ``python -m asyncpatterns.topology.pgbouncer`` runs that module.
    from . import clusters, pgbouncer

    if not pgbouncer.installed():
        return "Debian's pgbouncer (apt-get install pgbouncer)"
    try:
        clusters.installed_version()
    except clusters.ClustersUnavailable as exc:
        return str(exc)
    try:
        socket.create_connection((postgres.host or "127.0.0.1", postgres.port or 5432), 2).close()
    except OSError as exc:
        return f"a PostgreSQL server at {postgres.host}:{postgres.port or 5432} ({exc})"
    return None
