"""The recorder's tables, as SQLAlchemy Core objects (queries are built from these, never
from strings). The migrations in ``migrations/versions`` create the same schema; a test
compares the two."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
)

# SQLite only makes an INTEGER PRIMARY KEY an alias of its rowid (autoincrementing, compact);
# PostgreSQL gets 64-bit keys, as observations add up. Tracks and events are addressed by id
# (the API's URLs, cursors, the live feed), so on SQLite they are AUTOINCREMENT: the id of a
# deleted newest row is never handed to the next one (PostgreSQL's sequences never reuse).
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

streams = Table(
    "streams",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("first_seen", Float, nullable=False),  # capture times, Unix seconds
    Column("last_seen", Float, nullable=False),
    Column("frames", BigInteger, nullable=False, server_default="0"),
)

tracks = Table(
    "tracks",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("stream", String(128), nullable=False),
    Column("track", String(32), nullable=False),  # the tracker's id: restarts at "1"
    Column("start", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("end", Float),  # set by track_ended
    Column("label", String(16), nullable=False),  # the latest smoothed label
    Column("dominant", String(16)),  # from the track_ended summary
    Column("frames", Integer),
    Column("mean_scores", JSON),
    Column("shares", JSON),
    Column("model", String(128), nullable=False, server_default=""),
    UniqueConstraint("stream", "track", "start", name="uq_tracks_stream_track_start"),
    Index("ix_tracks_stream_start", "stream", "start"),
    Index("ix_tracks_stream_last_seen", "stream", "last_seen"),
    Index("ix_tracks_last_seen", "last_seen"),
    sqlite_autoincrement=True,
)

observations = Table(
    "observations",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("track_id", BigId, ForeignKey("tracks.id", ondelete="CASCADE"), nullable=False),
    Column("time", Float, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("x", SmallInteger, nullable=False),
    Column("y", SmallInteger, nullable=False),
    Column("w", SmallInteger, nullable=False),
    Column("h", SmallInteger, nullable=False),
    Column("label", String(16), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("smoothed_label", String(16), nullable=False),
    Column("scores", JSON, nullable=False),
    Column("smoothed_scores", JSON, nullable=False),
    Index("ix_observations_track_time", "track_id", "time"),
    Index("ix_observations_time", "time"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("stream", String(128), nullable=False),
    Column("track_id", BigId, ForeignKey("tracks.id", ondelete="CASCADE")),
    Column("track", String(32), nullable=False),
    Column("name", String(32), nullable=False),
    Column("time", Float, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("label", String(16), nullable=False),
    Column("previous", String(16)),
    Index("ix_events_stream_time", "stream", "time"),
    Index("ix_events_track_time", "track_id", "time"),
    Index("ix_events_time", "time"),
    sqlite_autoincrement=True,
)

# --- authentication (services/auth): users, API tokens and the audit log ---

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password", String(255), nullable=False),  # argon2 hash
    Column("role", String(16), nullable=False),
    Column("streams", JSON),  # a list of stream ids; NULL: every stream
    Column("generation", Integer, nullable=False, server_default="1"),  # +1 ends its sessions
    Column("created", Float, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),  # SHA-256 of the token, hex
    Column("role", String(16), nullable=False),
    Column("streams", JSON),
    Column("created", Float, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("revoked", Float),  # when; NULL while valid
)

audit = Table(
    "audit",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("target", String(255), nullable=False, server_default=""),
    Column("client", String(64), nullable=False, server_default=""),
    Column("detail", String(1000), nullable=False, server_default=""),
    Index("ix_audit_time", "time"),
)
