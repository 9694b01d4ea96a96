"""Alembic's entry point: migrate the connection the store hands over (never a URL from a file)."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=context.config.get_main_option("version_table"))
with context.begin_transaction():
    context.run_migrations()
