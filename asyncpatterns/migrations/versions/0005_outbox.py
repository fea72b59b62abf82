"""Create the outbox table, for the transactional outbox

Events written in the transaction of the change they announce
(``asyncpatterns.outbox``): a topic, a key (the aggregate's id), a JSON payload,
when it was written, when a relay published it (``sent_at``, null until then),
the claims made, until when a relay holds it (``locked_until``: the lease, or the
backoff after a failed publish) and the last failure. One index, on ``(sent_at,
id)``, serves both of the relay's reads: the oldest unsent events (``sent_at IS
NULL``, in id order) and the purge of those sent before a cutoff.

Times are UTC, ``DATETIME(6)`` on MySQL, as in 0004.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc_time() -> sa.types.TypeEngine[object]:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("topic", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc_time(), nullable=False),
        sa.Column("sent_at", _utc_time(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("locked_until", _utc_time(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        mysql_charset="utf8mb4",
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outbox_sent_at_id", "outbox", ["sent_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_table("outbox")  # its index goes with it
