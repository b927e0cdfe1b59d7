"""Indexes for the dashboard (reports over time), the per-device storage quota (hard-example bytes per device
over time) and hard examples per line.

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("reports_received", "reports", ["received_at"])
    op.create_index("hard_examples_device", "hard_examples", ["device_id", "received_at"])
    op.create_index("hard_examples_line", "hard_examples", ["line", "received_at"])


def downgrade() -> None:
    op.drop_index("hard_examples_line", "hard_examples")
    op.drop_index("hard_examples_device", "hard_examples")
    op.drop_index("reports_received", "reports")
