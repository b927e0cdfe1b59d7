"""Alembic environment of the collector store: run by fleet.db.migrate on the connection it passes."""
from alembic import context

from fleet.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata(), render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
