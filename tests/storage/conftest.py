"""Fixtures shared by the storage tests."""

from __future__ import annotations

import pytest

from harmony.storage.database import SqliteDatabase


@pytest.fixture
def sqlite_index(tmp_path):
    """An embedded sqlite database with the store's schema (no store around it)."""
    from harmony.storage.store import schema_pg, schema_sqlite
    database = SqliteDatabase(tmp_path / "index.sqlite")
    database.create_schema(schema_sqlite(), schema_pg())
    yield database
    database.close()
