"""Alembic environment: runs on the connection the recorder hands over (``connection`` in
the config's attributes), or on ``sqlalchemy.url`` when used from the alembic command line."""

from alembic import context
from sqlalchemy import create_engine

from services.recorder.schema import metadata

config = context.config


def run(connection) -> None:
    context.configure(
        connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite"
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).connect() as conn:
        run(conn)
