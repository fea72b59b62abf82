"""Where the database is, which backend it is, and how to print its URL safely.

Resolution order for the URL: the argument you pass, then ``$DATABASE_URL``,
then an embedded SQLite file (``asyncpatterns.db`` in the working directory).
Bare schemes are completed with the kit's async driver, so ``postgresql://``
becomes ``postgresql+asyncpg://`` and ``mysql://`` becomes ``mysql+aiomysql://``.

Never print a URL as it is: it may carry a password. Use ``mask_password``.
"""

from __future__ import annotations

import os
import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_URL = "sqlite+aiosqlite:///asyncpatterns.db"

# backend name -> the async driver this kit uses for it
ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg", "mysql": "aiomysql"}
# drivers that block the event loop: SQLAlchemy's async engine refuses them
_SYNC_DRIVERS = {
    "pysqlite",
    "psycopg2",
    "pg8000",
    "pymysql",
    "mysqldb",
    "mysqlconnector",
    "mariadbconnector",
}
# schemes people write, and the backend they mean
_BACKEND_ALIASES = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}


class ConfigurationError(ValueError):
    """The database URL cannot be used: bad syntax, unknown backend or missing driver."""


class DatabaseUnavailableError(ConnectionError):
    """The database server (or file) could not be reached."""


def resolve_url(url: str | URL | None = None) -> URL:
    """Return the URL to use, completed with the kit's async driver."""
    raw = url if url is not None else os.environ.get("DATABASE_URL") or DEFAULT_URL
    try:
        parsed = make_url(raw)
    except ArgumentError:
        raise ConfigurationError(
            f"Could not parse database URL {mask_password(str(raw))!r}; "
            "expected e.g. postgresql+asyncpg://user:password@host:5432/dbname"
        ) from None
    if "@" in (parsed.host or ""):  # "user:p@ss@host": the first "@" ends the password
        raise ConfigurationError(
            f"The database URL {mask_password(str(raw))!r} has more than one '@' before the "
            "host; percent-encode '@' in the user name or password as %40"
        )
    backend = _BACKEND_ALIASES.get(parsed.get_backend_name())
    if backend is None:
        raise ConfigurationError(
            f"Unknown database backend {parsed.get_backend_name()!r} in "
            f"{mask_password(parsed)}; this kit supports "
            "sqlite+aiosqlite, postgresql+asyncpg and mysql+aiomysql"
        )
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=f"{backend}+{ASYNC_DRIVERS[backend]}")
    elif parsed.get_driver_name() in _SYNC_DRIVERS:
        raise ConfigurationError(
            f"{parsed.get_driver_name()} in {mask_password(parsed)} is a synchronous driver, "
            f"which an async engine cannot use; write {backend}+{ASYNC_DRIVERS[backend]}:// "
            f"(or just {backend}://)"
        )
    if parsed.get_backend_name() == "mariadb":
        # SQLAlchemy's mariadb dialect is the same driver family; keep one name.
        parsed = parsed.set(drivername=f"mysql+{parsed.get_driver_name()}")
    return parsed


def backend_name(url: str | URL | None = None) -> str:
    """``"sqlite"``, ``"postgresql"`` or ``"mysql"`` (MariaDB included)."""
    return resolve_url(url).get_backend_name()


def mask_password(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe to print or log.

    Also hides secrets passed as query parameters (``?password=...``). A URL
    that cannot be parsed, or whose password holds an unescaped ``@``, has all
    of its user information hidden.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    if parsed is not None and "@" not in (parsed.host or ""):
        secrets = {key: "***" for key in parsed.query if _SECRET_KEY.search(key)}
        rendered = parsed.update_query_dict(secrets).render_as_string(hide_password=True)
        return rendered.replace("=%2A%2A%2A", "=***")
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return "***"  # not even a URL: it may be all secret
    authority = rest.partition("?")[0]
    if "@" not in authority:
        return f"{scheme}://{rest}"
    return f"{scheme}://***@{rest[authority.rindex('@') + 1 :]}"


_SECRET_KEY = re.compile(r"pass|secret|token|key", re.IGNORECASE)
