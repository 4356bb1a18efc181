"""Shared fixtures: node homes, and databases on both engines.

Storage and end-to-end tests take the ``database_url`` fixture, which runs them
once on SQLite (a file in the test's temporary folder) and once on PostgreSQL
(a fresh database per test on the server at 127.0.0.1:5432, or the one named
by ``GATEWAY_TEST_PG_URL``). PostgreSQL tests skip only when no server answers
and CI is not set; under ``CI=true`` a missing server fails them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

PG_ADMIN_URL = os.environ.get(
    "GATEWAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg_state: dict[str, str | None] = {}


def _pg_unavailable_reason() -> str | None:
    """None when the PostgreSQL server answers, else why not (checked once)."""
    if "reason" not in _pg_state:
        try:
            engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            engine.dispose()
            _pg_state["reason"] = None
        except OperationalError as exc:
            _pg_state["reason"] = f"PostgreSQL at {PG_ADMIN_URL} does not answer: {exc.orig}"
    return _pg_state["reason"]


def require_postgres() -> None:
    reason = _pg_unavailable_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def create_pg_database() -> str:
    """Create an empty database on the test server and return its URL."""
    require_postgres()
    name = f"gwt_{secrets.token_hex(6)}"
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    engine.dispose()
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = make_url(url).database
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def pg_database_factory() -> Iterator[object]:
    """Make as many fresh PostgreSQL databases as a test needs; dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        url = create_pg_database()
        made.append(url)
        return url

    yield make
    for url in made:
        drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_name(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
    return str(request.param)


@pytest.fixture
def database_url(engine_name: str, tmp_path: Path) -> Iterator[str]:
    """An empty database on each engine in turn."""
    if engine_name == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment without any GATEWAY_* variable."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_") and name not in _KEPT:
            monkeypatch.delenv(name)
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") or k in _KEPT}


# Key files made by tests use libsodium's minimum Argon2id cost so the suite stays
# fast; production files use the moderate cost (docs/keys.md). Subprocesses inherit it.
os.environ.setdefault("GATEWAY_KEYSTORE_STRENGTH", "min")
_KEPT = frozenset({"GATEWAY_TEST_PG_URL", "GATEWAY_KEYSTORE_STRENGTH"})


@pytest.fixture(autouse=True)
def _stop_running_apis() -> Iterator[None]:
    """Stop the local APIs a test served for its user commands (tests.node_api.serve_node)."""
    yield
    from tests.node_api import stop_all  # noqa: PLC0415

    stop_all()
