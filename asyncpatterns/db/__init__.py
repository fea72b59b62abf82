"""The database layer every pattern stands on: engines, units of work, errors.

* ``engine.py`` -- ``make_engine`` (per-backend defaults: SQLite's foreign keys
  and write lock, lock timeouts, pre-ping), ``make_read_engine`` (reads of one
  statement, one round trip each), ``make_session_maker``, tables,
  throw-away databases for tests.
* ``unit_of_work.py`` -- ``run_in_transaction``: whoever begins a transaction
  ends it; ``session_scope``; ``lock_for_writing``.
* ``pool.py`` -- ``FairAsyncQueuePool``: waiting tasks get connections in arrival order.
* ``attached.py`` -- rows written by Core statements, made known to the session.
* ``timeouts.py`` -- ``statement_timeout``: how long a statement may run, per block.
* ``errors.py`` -- what a database error means, from each backend's own code.
* ``constraints.py`` -- a refused write, named from the table's constraints.

Copy the whole folder (with ``config.py`` beside it): the pattern modules
import it as ``.db``.
"""

from .attached import attach_inserted, changed_behind_the_orm
from .constraints import (
    AlreadyExistsError,
    CheckFailedError,
    ConstraintError,
    MissingValueError,
    ReferenceNotFoundError,
    StillReferencedError,
    constraint_error,
    is_unique_violation,
)
from .engine import (
    LOCK_TIMEOUT,
    SERVER_POOL_DEFAULTS,
    SQLITE_BEGIN,
    create_db_and_tables,
    drop_db_and_tables,
    in_memory_sqlite,
    make_engine,
    make_read_engine,
    make_session_maker,
    throwaway_database,
)
from .errors import (
    CONNECTION_LOST_CODES,
    LOCK_TIMEOUT_CODES,
    RETRYABLE_CODES,
    STATEMENT_TIMEOUT_CODES,
    error_code,
    is_connection_lost,
    is_foreign_key_violation,
    is_lock_timeout,
    is_retryable,
    is_statement_timeout,
)
from .pool import FairAsyncQueuePool
from .replica import COMMIT_LSN, Pin, ReadRouter, RoutingSession
from .timeouts import statement_timeout
from .unit_of_work import (
    TransactionOwnershipError,
    lock_for_writing,
    run_in_transaction,
    session_scope,
)

__all__ = [
    "COMMIT_LSN",
    "CONNECTION_LOST_CODES",
    "LOCK_TIMEOUT",
    "LOCK_TIMEOUT_CODES",
    "RETRYABLE_CODES",
    "SERVER_POOL_DEFAULTS",
    "SQLITE_BEGIN",
    "STATEMENT_TIMEOUT_CODES",
    "AlreadyExistsError",
    "CheckFailedError",
    "ConstraintError",
    "FairAsyncQueuePool",
    "MissingValueError",
    "Pin",
    "ReadRouter",
    "ReferenceNotFoundError",
    "RoutingSession",
    "StillReferencedError",
    "TransactionOwnershipError",
    "attach_inserted",
    "changed_behind_the_orm",
    "constraint_error",
    "create_db_and_tables",
    "drop_db_and_tables",
    "error_code",
    "in_memory_sqlite",
    "is_connection_lost",
    "is_foreign_key_violation",
    "is_lock_timeout",
    "is_retryable",
    "is_statement_timeout",
    "is_unique_violation",
    "lock_for_writing",
    "make_engine",
    "make_read_engine",
    "make_session_maker",
    "run_in_transaction",
    "session_scope",
    "statement_timeout",
    "throwaway_database",
]
