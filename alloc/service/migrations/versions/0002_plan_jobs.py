"""Plan jobs: a job may make a plan on the model (check, refine); it records the plan it made.

Revision ID: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bitalloc_jobs") as batch:          # batch: SQLite alters by copying the table
        batch.add_column(sa.Column("plan_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bitalloc_jobs") as batch:
        batch.drop_column("plan_id")
