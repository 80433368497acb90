"""Alembic revisions of the replay tables, one per schema version (see the parent package)."""
