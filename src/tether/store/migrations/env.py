"""Alembic environment: Tether always hands in an open connection (see ``store/migrate.py``)."""

from __future__ import annotations

from alembic import context

from tether.store.schema import include_object, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `tether db`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    include_object=include_object(connection.dialect.name),
)
with context.begin_transaction():
    context.run_migrations()
