"""Streams, tracks, sampled observations and track events.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "streams",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("frames", sa.BigInteger, nullable=False, server_default="0"))
    op.create_table(
        "tracks",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("track", sa.String(32), nullable=False),
        sa.Column("start", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("end", sa.Float),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("dominant", sa.String(16)),
        sa.Column("frames", sa.Integer),
        sa.Column("mean_scores", sa.JSON),
        sa.Column("shares", sa.JSON),
        sa.Column("model", sa.String(128), nullable=False, server_default=""),
        sa.UniqueConstraint("stream", "track", "start", name="uq_tracks_stream_track_start"))
    op.create_index("ix_tracks_stream_start", "tracks", ["stream", "start"])
    op.create_index("ix_tracks_stream_last_seen", "tracks", ["stream", "last_seen"])
    op.create_index("ix_tracks_last_seen", "tracks", ["last_seen"])
    op.create_table(
        "observations",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("track_id", BigId, sa.ForeignKey("tracks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("x", sa.SmallInteger, nullable=False),
        sa.Column("y", sa.SmallInteger, nullable=False),
        sa.Column("w", sa.SmallInteger, nullable=False),
        sa.Column("h", sa.SmallInteger, nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("smoothed_label", sa.String(16), nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("smoothed_scores", sa.JSON, nullable=False))
    op.create_index("ix_observations_track_time", "observations", ["track_id", "time"])
    op.create_index("ix_observations_time", "observations", ["time"])
    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("track_id", BigId, sa.ForeignKey("tracks.id", ondelete="CASCADE")),
        sa.Column("track", sa.String(32), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("previous", sa.String(16)))
    op.create_index("ix_events_stream_time", "events", ["stream", "time"])
    op.create_index("ix_events_track_time", "events", ["track_id", "time"])
    op.create_index("ix_events_time", "events", ["time"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("observations")
    op.drop_table("tracks")
    op.drop_table("streams")
