"""Add user.version, for optimistic locking

Every ORM UPDATE of a user now sends ``... WHERE id = ? AND version = ?`` and
counts the version up; a row changed meanwhile matches nothing.

NOT NULL with a server default of 1: the rows that exist get 1, their first
version, and so does an INSERT from code that does not name the column (the
code still running during the deploy, and INSERTs written by hand).

On SQLite a NOT NULL column is added in place when it has a constant default,
but batch mode is used for symmetry with the downgrade (SQLite before 3.35
cannot drop a column in place); reflection does not see ``AUTOINCREMENT``, so
the copy is told.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 16:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user", table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.add_column(
            sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("user", table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.drop_column("version")
