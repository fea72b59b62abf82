"""Add account.is_verified, backfilled

New accounts start unverified; the accounts that exist are verified.

A NOT NULL column added to a table that has rows needs a server default: the rows
that exist get it, and so does an INSERT from the code still running during the
deploy, which does not name the column. The backfill then gives the existing rows
their real value, which is not the default: they were opened, and verified, before
verification was recorded.

On SQLite a column with an expression default cannot be added in place: batch mode
copies the table. Reflection does not see ``AUTOINCREMENT``, so the copy is told.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 15:13:46.773668
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The table as this revision needs it, not the model: models change, revisions must not.
account = sa.table("account", sa.column("is_verified", sa.Boolean()))


def upgrade() -> None:
    with op.batch_alter_table("account", table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.add_column(
            sa.Column("is_verified", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    # Backfill: every account that exists now was verified the old way.
    op.execute(account.update().values(is_verified=True))


def downgrade() -> None:
    with op.batch_alter_table("account", table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.drop_column("is_verified")
