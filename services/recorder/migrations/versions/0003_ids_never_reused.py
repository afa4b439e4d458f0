"""On SQLite, track and event ids are never handed out twice: AUTOINCREMENT.

Without it SQLite gives a new row the largest id + 1, so after the newest track was deleted
the next track got its id, and a URL or cursor kept from before pointed at another person's
track. Each table is rebuilt (create, copy, drop, rename) with the recorder's foreign-key
checks off for the migration (store.migrate), so dropping the old table cascades nothing.
PostgreSQL's sequences never reuse an id: nothing to do there.

Revision ID: 0003_ids_never_reused
Revises: 0002_auth
"""
from alembic import op

revision = "0003_ids_never_reused"
down_revision = "0002_auth"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in ("tracks", "events"):
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in ("tracks", "events"):
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
