"""Index user (name, id), for keyset pages by name

``pagination.keyset_page(..., order_by=User.name)`` (``GET /users/?sort=name``)
starts each page at ``name >= :name AND (name > :name OR id > :id)``: with this
index that is a seek, and page 1,000 costs what page 1 does; without it every page
sorts the whole table. The id in the index breaks the ties between equal names,
in the order the pages use.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 12:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_user_name_id", "user", ["name", "id"])


def downgrade() -> None:
    op.drop_index("ix_user_name_id", table_name="user")
