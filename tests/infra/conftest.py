"""Fixtures of the infra tests: the warehouse's least-privilege roles on PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.infra.support import PARTS, Roles, apply_roles_sql, drop_roles


@pytest.fixture
def warehouse_roles(postgres_url: str) -> Iterator[Roles]:
    """The roles of infra/postgres/warehouse-roles.sql in a fresh database, dropped after.

    Role names are unique per test: roles belong to the whole PostgreSQL cluster.
    """
    suffix = secrets.token_hex(4)
    names = {part: f"atp_{part}_{suffix}" for part in PARTS}
    apply_roles_sql(postgres_url, names)
    try:
        yield Roles(names, sa.make_url(postgres_url))
    finally:
        drop_roles(postgres_url, list(names.values()))
