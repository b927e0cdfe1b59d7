"""Baseline: the schema of the raw-sqlite3 collector (reports, hard examples, devices, registry, enrolments,
rollouts). A store made before migrations has all or part of it (an older collector had no registry tables):
tables and indexes that exist are kept as they are, the missing ones are created.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

T, F, I = sa.Text, sa.Float, sa.Integer


def _cols(spec: str, pk=()):
    """'name:T!' -> Column(name, Text, nullable=False); '?' nullable."""
    out = []
    for item in spec.split():
        name, typ = item.split(":")
        kind = {"T": T, "F": F, "I": I}[typ[0]]
        out.append(sa.Column(name, kind, primary_key=name in pk, nullable=typ.endswith("?") and name not in pk))
    return out


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())

    def create_table(name, *cols, **kw):
        if name not in have:
            op.create_table(name, *cols, **kw)

    def create_index(name, tbl, cols):
        if name not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(tbl)}:
            op.create_index(name, tbl, cols)

    create_table("reports", *_cols("id:T! device_id:T! line:T! bundle_version:T! window_start:T! window_end:T! "
                                      "frames:I! ng:I! drift_state:T! alarm:I! received_at:F! body:T!", pk=("id",)))
    create_index("reports_line_device", "reports", ["line", "device_id", "received_at"])
    create_table("hard_examples", *_cols("id:T! device_id:T! line:T! bundle_version:T! time:T! max_score:F! "
                                            "image_path:T! image_sha256:T! image_bytes:I! received_at:F! meta:T!",
                                            pk=("id",)))
    create_table("devices", *_cols("device_id:T! token_sha256:T? line:T? first_seen:F? last_seen:F?",
                                      pk=("device_id",)),
                    sa.Column("reports", I, nullable=False, server_default="0"))
    create_table("registry_versions", *_cols(
        "line:T! version:T! seq:I! sha256:T! length:I! path:T! state:T! parent_version:T? created:T? pushed_at:F! "
        "gates_passed:I! canary_at:F? activated_at:F? retired_at:F? hardware_targets:T! lineage:T! note:T?",
        pk=("line", "version")))
    create_table("registry_events", sa.Column("id", I, primary_key=True, autoincrement=True),
                    *_cols("line:T! version:T? at:F! kind:T! detail:T!"))
    create_table("enrolments", *_cols("device_id:T! line:T! token_lookup:T! token_salt:T! token_hash:T! tags:T! "
                                         "enrolled_at:F! rotated_at:F? revoked_at:F? last_target:T? "
                                         "last_target_at:F?", pk=("device_id",)))
    create_index("enrolments_lookup", "enrolments", ["token_lookup"])
    create_table("rollouts", sa.Column("id", I, primary_key=True, autoincrement=True),
                    *_cols("line:T! version:T! from_version:T! canary:T! window_s:F! policy:T! started_at:F! "
                           "state:T! ended_at:F? reason:T?"))
    create_table("rollout_decisions", sa.Column("id", I, primary_key=True, autoincrement=True),
                    *_cols("rollout_id:I! at:F! action:T! reason:T! figures:T!"))


def downgrade() -> None:
    for name in ("rollout_decisions", "rollouts", "enrolments", "registry_events", "registry_versions", "devices",
                 "hard_examples", "reports"):
        op.drop_table(name)
