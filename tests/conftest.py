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
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


# Making and dropping a PostgreSQL database is costly: a drop waits for a checkpoint of
# the whole server, seconds on a busy machine. A database a test is done with is
# emptied instead (a copy of the migrated template back to that template's rows) and
# handed to the next test of this process that asks for the same kind; a database that
# cannot be put back exactly is dropped. The kept ones are dropped when the session ends.
_pg_kind: dict[str, str] = {}  # database name -> the template it was made from
_pg_free: dict[str, list[str]] = {}  # template -> databases ready to hand out
_pg_templates: dict[str, tuple[object, dict[str, list[dict[str, object]]]]] = {}
# migrated template name -> (its schema fingerprint, the rows its migrations wrote)
_pg_made_templates: list[str] = []  # migrated templates, dropped when the session ends

_FINGERPRINT_SQL = """
SELECT 'c'::text, table_name::text, column_name || ' ' || data_type || ' ' || is_nullable
       || ' ' || coalesce(column_default, '')
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL SELECT 'i', tablename::text, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL SELECT 't', tgrelid::regclass::text, tgname::text || ' ' || tgenabled::text
  FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'k', conrelid::regclass::text, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'f', proname::text, md5(prosrc) FROM pg_proc
  WHERE pronamespace = 'public'::regnamespace
UNION ALL SELECT 'n', nspname::text, '' FROM pg_namespace
  WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
UNION ALL SELECT 's', sequencename::text, '' FROM pg_sequences WHERE schemaname = 'public'
ORDER BY 1, 2, 3
"""


def _pg_url(name: str) -> str:
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _pg_admin(statement: str, **params: object) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(statement), params)
    engine.dispose()


def create_pg_database(template: str = "template0") -> str:
    """A database on the test server holding what ``template`` holds (nothing, by
    default), as if just copied from it; its URL."""
    require_postgres()
    free = _pg_free.get(template)
    if free:
        return _pg_url(free.pop())
    name = f"gwt_{secrets.token_hex(6)}"
    _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    _pg_kind[name] = template
    return _pg_url(name)


def remember_pg_template(name: str) -> None:
    """Record what the migrated template ``name`` holds, so that its copies can be reset."""
    engine = create_engine(_pg_url(name))
    with engine.connect() as connection:
        fingerprint = connection.execute(text(_FINGERPRINT_SQL)).all()
        rows: dict[str, list[dict[str, object]]] = {}
        tables = connection.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()
        for table in tables:
            found = connection.execute(text(f'SELECT * FROM "{table}"')).mappings().all()
            if found and table != "alembic_version":
                rows[table] = [dict(row) for row in found]
    engine.dispose()
    _pg_templates[name] = (fingerprint, rows)


def _reset(name: str, template: str) -> bool:
    """Put database ``name`` back to what ``template`` holds; False when it cannot be."""
    _pg_admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = :name AND pid <> pg_backend_pid()",
        name=name,
    )
    engine = create_engine(_pg_url(name), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            if template == "template0":
                schemas = connection.execute(
                    text(
                        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
                        " AND nspname <> 'information_schema'"
                    )
                ).scalars()
                for schema in list(schemas):
                    connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                connection.execute(text("CREATE SCHEMA public AUTHORIZATION pg_database_owner"))
                connection.execute(text("GRANT USAGE ON SCHEMA public TO PUBLIC"))
                return connection.execute(text(_FINGERPRINT_SQL)).all() == [("n", "public", "")]
            fingerprint, rows = _pg_templates[template]
            if connection.execute(text(_FINGERPRINT_SQL)).all() != fingerprint:
                return False
            tables = [
                table
                for table in connection.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
                if table != "alembic_version"
            ]
            writer = create_engine(_pg_url(name))
            try:
                with writer.begin() as transaction:
                    # The ledger's tables refuse TRUNCATE through triggers: a replica
                    # session fires none, which is what a reset to the template needs.
                    transaction.execute(text("SET LOCAL session_replication_role = replica"))
                    transaction.execute(
                        text(
                            "TRUNCATE "
                            + ", ".join(f'"{table}"' for table in tables)
                            + " RESTART IDENTITY CASCADE"
                        )
                    )
                    for table, table_rows in rows.items():
                        columns = list(table_rows[0])
                        transaction.execute(
                            text(
                                f'INSERT INTO "{table}" ('
                                + ", ".join(f'"{c}"' for c in columns)
                                + ") VALUES ("
                                + ", ".join(f":{c}" for c in columns)
                                + ")"
                            ),
                            table_rows,
                        )
            finally:
                writer.dispose()
            return True
    except Exception:  # whatever went wrong, the database is dropped instead
        return False
    finally:
        engine.dispose()


def drop_pg_database(url: str) -> None:
    """Hand back a database made by :func:`create_pg_database`: reset and kept for
    the next test of this process, or dropped when it cannot be reset exactly."""
    name = str(make_url(url).database)
    template = _pg_kind.get(name)
    if template is not None and name in _pg_free.get(template, []):
        return  # handed back already
    resettable = template == "template0" or template in _pg_templates
    if template is not None and resettable and _reset(name, template):
        _pg_free.setdefault(template, []).append(name)
        return
    _pg_kind.pop(name, None)
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_pg_databases(names: list[str]) -> None:
    """Drop ``names`` all at once: each drop waits for a checkpoint of the whole server,
    and drops that wait together share one instead of queueing for one each."""
    if not names:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        for done in [
            pool.submit(_pg_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for name in names
        ]:
            done.result()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the databases kept for reuse (each test process keeps its own)."""
    kept = [name for names in _pg_free.values() for name in names]
    _drop_pg_databases([*kept, *_pg_made_templates])
    _pg_free.clear()
    _pg_made_templates.clear()


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


def _migrate(url: str) -> None:
    from gateway.store.db import open_database  # noqa: PLC0415

    database = open_database(url)
    try:
        database.upgrade()
    finally:
        database.dispose()


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """One database per engine migrated to the head by the real migrations, made
    once per test process on first use: the SQLite file's path, the PostgreSQL
    database's name. Node tests copy it instead of migrating every node's database
    again; the migrations themselves are proved on empty databases (``database_url``)."""
    templates: dict[str, str] = {}
    folder = tmp_path_factory.mktemp("migrated")

    def template(engine: str) -> str:
        if engine not in templates:
            if engine == "sqlite":
                path = folder / "template.sqlite3"
                _migrate(f"sqlite:///{path}")
                templates[engine] = str(path)
            else:
                name = f"gwt_template_{secrets.token_hex(6)}"
                require_postgres()
                _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
                _migrate(_pg_url(name))
                remember_pg_template(name)
                templates[engine] = name
        return templates[engine]

    yield template
    if "postgresql" in templates:
        # Dropped with the other kept databases when the session ends, all at once.
        _pg_made_templates.append(templates["postgresql"])


@pytest.fixture
def migrated_database_factory(
    engine_name: str, tmp_path: Path, migrated_templates: Callable[[str], str]
) -> Iterator[Callable[[str], str]]:
    """``make(name)``: a fresh database on the engine under test holding the migrated
    schema and only the rows the migrations write (SQLite: ``<tmp_path>/<name>.sqlite3``);
    handed back afterwards."""
    made: list[str] = []

    def make(name: str) -> str:
        template = migrated_templates(engine_name)
        if engine_name == "sqlite":
            target = tmp_path / f"{name}.sqlite3"
            shutil.copyfile(template, target)
            return f"sqlite:///{target}"
        url = create_pg_database(template=template)
        made.append(url)
        return url

    yield make
    for url in made:
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
