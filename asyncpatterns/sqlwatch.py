"""Count the SQL an engine sends inside a block of code.

    with watch_sql(engine) as sql:
        await create_users(session, users)
    sql.count        # statements sent to the database
    sql.parameter_sets  # parameter sets they carried (an executemany counts each)

Transaction control (BEGIN, COMMIT, SAVEPOINT, ..., and the timeouts an engine
behind PgBouncer sets as each transaction begins) is left out: drivers send it in
different ways, so leaving it out makes counts comparable across backends.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

# The last: the timeouts a pooler engine sets as each transaction begins (db/pooler.py).
_TRANSACTION_CONTROL = (
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "/* TRANSACTION SETTINGS */",
)


@dataclass
class Statement:
    sql: str
    parameter_sets: int


@dataclass
class SQLLog:
    statements: list[Statement] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements)

    @property
    def parameter_sets(self) -> int:
        return sum(s.parameter_sets for s in self.statements)

    def first_words(self, words: int = 2) -> list[str]:
        """Each statement's opening words ("SELECT user.id,"), to show what ran."""
        return [" ".join(s.sql.split()[:words]) for s in self.statements]


@contextmanager
def watch_sql(engine: AsyncEngine) -> Iterator[SQLLog]:
    """Record every statement ``engine`` executes while the block runs."""
    log = SQLLog()

    def record(_conn: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        if sql.lstrip().upper().startswith(_TRANSACTION_CONTROL):
            return
        # A driver-level executemany carries a list of parameter sets; a batched
        # multi-row INSERT is one statement with one (long) parameter set.
        batched = (
            many
            and isinstance(params, (list, tuple))
            and params
            and isinstance(params[0], (tuple, list, dict))
        )
        log.statements.append(Statement(sql, len(params) if batched else 1))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield log
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
