"""The tests' own PostgreSQL clusters (``asyncpatterns.topology.clusters``),
skipped or failed as the ``backend`` fixture's postgresql is.

Tests import it as ``from clusters import ...`` (pytest puts ``tests/`` on
``sys.path``, as for ``served_load``). They run when the postgresql backend
does (``ASYNCPATTERNS_BACKENDS`` unset or naming it, and
``ASYNCPATTERNS_POSTGRES_URL`` set, though clusters of their own are not that
server); without the tools, or run by a user who cannot use them, they are
skipped, or fail when ``ASYNCPATTERNS_REQUIRE_BACKENDS`` names postgresql.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager

import pytest

from asyncpatterns.testing import SERVER_URL_VARIABLES, required_backends
from asyncpatterns.topology import clusters
from asyncpatterns.topology.clusters import Cluster, standby_of

__all__ = ["Cluster", "postgres_cluster", "standby_of"]


def _unavailable(message: str) -> None:
    if "postgresql" in required_backends():
        pytest.fail(message + " (postgresql is listed in ASYNCPATTERNS_REQUIRE_BACKENDS)")
    pytest.skip(message)


def _require_postgresql() -> None:
    selected = {n.strip() for n in os.environ.get("ASYNCPATTERNS_BACKENDS", "").split(",")}
    if selected - {""} and "postgresql" not in selected:
        pytest.skip("postgresql: not selected (ASYNCPATTERNS_BACKENDS)")
    variable = SERVER_URL_VARIABLES["postgresql"]
    if not os.environ.get(variable):
        _unavailable(f"postgresql: set {variable} to a server URL to test this backend")


def postgres_cluster(
    settings: Mapping[str, object] | None = None,
) -> AbstractContextManager[Cluster]:
    """A throw-away cluster of the test's own (``topology.clusters.postgres_cluster``)."""
    _require_postgresql()
    try:
        clusters.installed_version()
    except clusters.ClustersUnavailable as exc:
        _unavailable(f"postgresql clusters of the tests' own: {exc}")
    return clusters.postgres_cluster(settings)
