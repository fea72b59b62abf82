"""Create the job table, for the job queue

Work queued in the database (``asyncpatterns.jobs``): a JSON payload, its state,
the attempts made, when it may run next (``run_after``) and until when the worker
running it holds it (``locked_until``, the lease). Each index serves one half of a
claim: queued jobs that are due, and running jobs whose lease has expired.

Times are UTC. On MySQL they are ``DATETIME(6)``: a plain ``DATETIME`` keeps whole
seconds, and a backoff or lease shorter than a second would round away.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 17:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc_time() -> sa.types.TypeEngine[object]:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql")


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("run_after", _utc_time(), nullable=False),
        sa.Column("locked_until", _utc_time(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        mysql_charset="utf8mb4",
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_state_run_after", "job", ["state", "run_after"], unique=False)
    op.create_index("ix_job_state_locked_until", "job", ["state", "locked_until"], unique=False)


def downgrade() -> None:
    op.drop_table("job")  # its indexes go with it
