"""The first schema: models, tables, plans, exports, jobs.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bitalloc_models",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("architecture", sa.String(128), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("n_params", sa.Integer, nullable=False),
        sa.Column("units", sa.JSON, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False))
    op.create_table(
        "bitalloc_tables",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False, unique=True),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("bitalloc_models.id"), nullable=False),
        sa.Column("model_hash", sa.String(64), nullable=False),
        sa.Column("probe", sa.String(64), nullable=False),
        sa.Column("quantizer", sa.String(32), nullable=False),
        sa.Column("key_inputs", sa.JSON, nullable=False),
        sa.Column("sidecar", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False))
    op.create_table(
        "bitalloc_plans",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("bitalloc_models.id"), nullable=False),
        sa.Column("table_id", sa.String(32), sa.ForeignKey("bitalloc_tables.id"), nullable=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("true_bpw", sa.Float, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False))
    op.create_table(
        "bitalloc_exports",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("plan_id", sa.String(32), sa.ForeignKey("bitalloc_plans.id"), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False))
    op.create_table(
        "bitalloc_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("request_key", sa.String(64), nullable=False, unique=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("bitalloc_models.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("table_id", sa.String(32), sa.ForeignKey("bitalloc_tables.id"), nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("started", sa.DateTime, nullable=True),
        sa.Column("heartbeat", sa.DateTime, nullable=True),
        sa.Column("finished", sa.DateTime, nullable=True))
    op.create_index("ix_bitalloc_plans_model", "bitalloc_plans", ["model_id"])
    op.create_index("ix_bitalloc_jobs_state", "bitalloc_jobs", ["state"])


def downgrade() -> None:
    for name in ("bitalloc_jobs", "bitalloc_exports", "bitalloc_plans", "bitalloc_tables", "bitalloc_models"):
        op.drop_table(name)
