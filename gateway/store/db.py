"""Engine factory and the one session/transaction pattern of the code base.

Every unit of work is::

    with db.transaction() as session:
        ...  # reads and writes; commit on normal exit, rollback on any exception

There is no other way to write. On SQLite every transaction starts with
``BEGIN IMMEDIATE`` (one writer at a time, decided at the start, so no
transaction fails half-way on a lock upgrade), the journal is WAL and
``synchronous=FULL`` so that an acknowledged commit survives power loss, and
foreign keys are enforced. A unit of work that only reads may ask for
``transaction(read_only=True)``: a plain (deferred) ``BEGIN`` on SQLite that
takes no write lock and reads one snapshot. On PostgreSQL the default isolation is READ
COMMITTED; a unit of work that must see a stable snapshot and serialise
against concurrent writers asks for ``transaction(serializable=True)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import select
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

import gateway.store as package
from gateway.errors import StorageError
from gateway.store.base import Base
from gateway.store.models import NodeRecord

__all__ = ["Database", "load_models", "open_database"]

_MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 15_000


def load_models() -> None:
    """Import every model module under ``gateway.store`` so the metadata is whole."""

    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("models"):
            importlib.import_module(f"gateway.store.{info.name}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Deleted content (an inline envelope a purge removes) is overwritten with
        # zeros in the database file rather than left in free pages.
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


READ_ONLY_OPTION = "gateway_read_only"
"""Execution option of the engine behind :meth:`Database.transaction` with ``read_only``."""


def _sqlite_begin(connection: Any) -> None:
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        connection.exec_driver_sql("BEGIN")  # deferred: a read takes no write lock
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _failed_to_connect(context: Any) -> None:
    """A driver error raised while a connection was being opened is a :class:`StorageError`
    whatever its class: a server down or a database that does not exist
    (``OperationalError``), and a URL option the driver refuses (psycopg's
    ``ProgrammingError``), alike. SQLAlchemy's ``handle_error`` event names no
    connection for such a failure and for a failed pool pre-ping (left to the
    pool, should pre-ping ever be turned on); errors of statements stay as they are."""
    if getattr(context, "is_pre_ping", False):  # SQLAlchemy 2.0.5 and later
        return  # a failed liveness check: the pool discards the connection and opens another
    if context.connection is None and context.original_exception is not None:
        cause = context.original_exception
        raise StorageError(f"database unavailable: {cause!s}".strip()) from cause


POSTGRES_POOL_RECYCLE_S = 1800
"""Seconds a pooled PostgreSQL connection is used before it is replaced."""


def _drop_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled PostgreSQL connection the server has closed; the pool retries.

    Checked when a transaction takes the connection, so nothing has been
    written on it yet. An idle connection has nothing to read: if its socket
    is readable, the server has sent a termination notice or closed it
    (``pg_terminate_backend``, a restart, an idle timeout). This costs one
    ``poll`` system call and no round trip. Raising
    :class:`~sqlalchemy.exc.DisconnectionError` makes the pool discard the
    connection and check out (or open) another. A connection that fails
    silently (no packet arrives) fails on its first statement instead, and
    SQLAlchemy then discards the pool's older connections as well.
    """
    if getattr(dbapi_connection, "closed", False) or getattr(dbapi_connection, "broken", False):
        raise DisconnectionError("the connection is closed")
    try:
        descriptor = dbapi_connection.fileno()
    except Exception:  # noqa: BLE001 - a driver that cannot say is taken as closed
        raise DisconnectionError("the connection has no socket") from None
    poller = select.poll()
    poller.register(descriptor, select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        raise DisconnectionError("the server closed the connection")


POSTGRES_READ_POOL = 4
"""Connections kept for :meth:`Database.read_connection` on PostgreSQL (as many again
are opened for a burst and closed after it)."""


def _read_only_session(dbapi_connection: Any, _record: Any) -> None:
    """Make a new PostgreSQL read connection's transactions read-only by default.

    Set once the connection is open (one round trip per connection), not as
    a startup option: an ``options`` parameter would replace the ones of
    ``PGOPTIONS`` or a service file, and libpq would take the session for a
    read-only server and refuse it under ``target_session_attrs=read-write``.
    A guard against a write by mistake (the server refuses it), not a
    barrier: a ``SET`` can lift it, and nothing here issues one.
    """
    dbapi_connection.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    if not dbapi_connection.autocommit:
        dbapi_connection.commit()


def _normalise_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


POOL_TIMEOUT_S: Final = 30.0
"""Seconds a transaction waits for a free connection of the pool by default."""


def _pool_busy(seconds: float) -> StorageError:
    """The error of a checkout that found no free connection in a pool for ``seconds``."""
    return StorageError(
        f"no database connection of its pool became free for this work within "
        f"{seconds:g} s: the node is overloaded; retry shortly",
        reason="storage.busy",
    )


class Database:
    """A node's database: engine, sessions and migrations."""

    def __init__(self, url: str, *, echo: bool = False, pool_timeout: float | None = None) -> None:
        """``pool_timeout``: seconds a transaction waits for a free connection of the
        pool before it fails with :class:`StorageError` (reason ``storage.busy``);
        ``None`` keeps :data:`POOL_TIMEOUT_S`. An in-memory SQLite database has
        no pool of its own and ignores it."""
        self.url = _normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        options: dict[str, Any] = {"echo": echo, "future": True}
        self._pool_timeout = POOL_TIMEOUT_S if pool_timeout is None else pool_timeout
        if not (self.is_sqlite and make_url(self.url).database in (None, "", ":memory:")):
            options["pool_timeout"] = self._pool_timeout
        if self.is_sqlite:
            options["connect_args"] = {
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                "check_same_thread": False,
            }
        else:
            # No ping per checkout (a round trip before every transaction): a
            # connection is recycled after POSTGRES_POOL_RECYCLE_S, and one the
            # server has dropped is found by a local look at its socket when a
            # transaction starts, before anything is sent (_drop_if_closed).
            options["pool_recycle"] = POSTGRES_POOL_RECYCLE_S
            options["connect_args"] = {"connect_timeout": 10}
        try:
            self.engine: Engine = create_engine(self.url, **options)
        except (SQLAlchemyError, ValueError) as exc:
            raise StorageError(f"database URL not usable: {type(exc).__name__}") from None
        self._read_engine: Engine | None = None
        event.listen(self.engine, "handle_error", _failed_to_connect)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            event.listen(self.engine, "checkout", _drop_if_closed)
            self._read_engine = self._postgres_read_engine(options)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._serializable = sessionmaker(
            self.engine.execution_options(isolation_level="SERIALIZABLE")
            if not self.is_sqlite
            else self.engine,
            expire_on_commit=False,
        )
        self._readers_lock = threading.Lock()
        self._readers_local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers = sessionmaker(
            self.engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
        )
        self._snapshots = (
            self._readers
            if self.is_sqlite
            else sessionmaker(
                self.engine.execution_options(isolation_level="REPEATABLE READ"),
                expire_on_commit=False,
            )
        )

    def _postgres_read_engine(self, options: dict[str, Any]) -> Engine:
        """The pool behind :meth:`read_connection` on PostgreSQL: autocommit (each
        statement its own READ COMMITTED transaction: one round trip), transactions
        read-only by default (:func:`_read_only_session`), at most
        :data:`POSTGRES_READ_POOL` connections plus as many again for a burst.
        The URL and its parameters are the main engine's, unchanged."""
        engine = create_engine(
            self.engine.url,
            **{
                **options,
                "isolation_level": "AUTOCOMMIT",
                "pool_size": POSTGRES_READ_POOL,
                "max_overflow": POSTGRES_READ_POOL,
            },
        )
        event.listen(engine, "connect", _read_only_session)
        event.listen(engine, "checkout", _drop_if_closed)
        return engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(
        self, *, serializable: bool = False, read_only: bool = False, snapshot: bool = False
    ) -> Iterator[Session]:
        """One unit of work: commit on normal exit, roll back on any exception.

        ``read_only``: for work that writes nothing (a consent check, a
        listing). On SQLite the transaction starts with a deferred ``BEGIN``,
        so it waits for no writer and blocks none; a write inside it would
        have to take the lock part-way, so only reads belong there. On
        PostgreSQL it is the ordinary READ COMMITTED transaction.

        ``snapshot``: for a read that must see the database as of one moment
        across many statements while others write (``ledger verify``: its
        walk, the head state and the checkpoints must agree). On PostgreSQL a
        REPEATABLE READ transaction (one snapshot, taken at its first
        statement; READ COMMITTED would give each statement its own); on
        SQLite the deferred read transaction of ``read_only``, which in WAL
        mode keeps the snapshot of its first read until it ends.
        """
        if serializable:
            factory = self._serializable
        elif snapshot:
            factory = self._snapshots
        elif read_only:
            factory = self._readers
        else:
            factory = self._sessions
        try:
            with factory() as session, session.begin():
                yield session
        except OperationalError as exc:
            raise StorageError(f"database unavailable or locked: {exc.orig!s}".strip()) from exc
        except PoolTimeout as exc:
            raise _pool_busy(self._pool_timeout) from exc

    @contextmanager
    def read_connection(self) -> Iterator[Any]:
        """A DB-API connection for hot read paths; each statement reads committed data.

        The driver's own connection (``sqlite3`` or ``psycopg``), no ORM
        session: on SQLite each thread keeps one connection of its own for
        this (opened on first use, closed by :meth:`dispose`); on PostgreSQL
        one of a pool of its own (:data:`POSTGRES_READ_POOL`). Statements are plain
        SQL strings the driver prepares once and keeps (SQLite's statement
        cache; psycopg's automatic prepare). No transaction is opened: each
        statement reads what was committed when it started, on both engines
        (SQLite autocommit; PostgreSQL autocommit, READ COMMITTED), so no
        ``BEGIN``/``ROLLBACK`` pair is spent per call, and on PostgreSQL a
        one-statement read is one round trip. A caller that needs two
        statements to agree orders them so that it does not matter, or reads
        both in one statement (as the consent check does). Nothing may be
        written through it, and the database refuses a write by mistake:
        SQLite's ``PRAGMA query_only``; on PostgreSQL, transactions read-only
        by default, set when the connection is opened. Close every cursor or read it to
        the end before leaving: on SQLite an unfinished statement keeps its
        snapshot, and the connection is the thread's for its next use. A
        PostgreSQL connection the server has closed is replaced before use
        (the local look of :func:`_drop_if_closed`), and one that failed is
        dropped from the pool, so the next call opens another. Driver errors
        become :class:`StorageError`.
        """
        if self.is_sqlite:
            driver = self._sqlite_reader()
            try:
                try:
                    yield driver
                finally:
                    if driver.in_transaction:  # only if a caller opened one itself
                        driver.rollback()
            except sqlite3.Error as exc:
                raise StorageError(f"database unavailable or locked: {exc!s}".strip()) from exc
            return
        dbapi: Any = self.engine.dialect.dbapi
        assert self._read_engine is not None
        try:
            pooled = self._read_engine.raw_connection()
        except PoolTimeout as exc:
            raise _pool_busy(self._pool_timeout) from exc
        except (SQLAlchemyError, dbapi.Error) as exc:
            # The pool raises the driver's own errors when it cannot connect.
            cause = exc.orig if isinstance(exc, DBAPIError) else exc
            raise StorageError(f"database unavailable or locked: {cause!s}".strip()) from exc
        try:
            yield pooled.driver_connection
        except dbapi.Error as exc:
            postgres: Any = pooled.driver_connection
            if postgres.closed or postgres.broken:
                pooled.invalidate()  # the pool opens another for the next read
            raise StorageError(f"database unavailable or locked: {exc!s}".strip()) from exc
        finally:
            pooled.close()

    def _sqlite_reader(self) -> sqlite3.Connection:
        """This thread's read connection to the SQLite file (opened on first use)."""
        reader: sqlite3.Connection | None = getattr(self._readers_local, "connection", None)
        if reader is not None:
            return reader
        database = self.engine.url.database
        if not database or database == ":memory:":
            raise StorageError("a read connection needs a database file, not :memory:")
        try:
            reader = sqlite3.connect(
                database, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            _sqlite_pragmas(reader, None)
            reader.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            raise StorageError(f"database unavailable: {exc!s}".strip()) from exc
        with self._readers_lock:
            self._reader_connections.append(reader)
        self._readers_local.connection = reader
        return reader

    def alembic_config(self) -> Config:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return config

    def upgrade(self) -> list[str]:
        """Apply every pending migration (all branches); return the revisions applied."""
        before = set(self.current_revisions())
        config = self.alembic_config()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "heads")
        after = self.current_revisions()
        script = ScriptDirectory.from_config(config)
        applied = [rev for rev in after if rev not in before]
        # Report every revision between the old and new heads, oldest first.
        walked: list[str] = []
        for head in applied:
            for revision in script.iterate_revisions(head, "base"):
                if revision.revision in before:
                    break
                if revision.revision not in walked:
                    walked.append(revision.revision)
        return list(reversed(walked))

    def current_revisions(self) -> tuple[str, ...]:
        try:
            with self.engine.connect() as connection:
                return tuple(MigrationContext.configure(connection).get_current_heads())
        except OperationalError as exc:
            raise StorageError(f"database unavailable: {exc.orig!s}".strip()) from exc

    def pending_revisions(self) -> bool:
        script = ScriptDirectory.from_config(self.alembic_config())
        return set(script.get_heads()) != set(self.current_revisions())

    def probe(self, *, timeout: float = 3.0) -> list[str]:
        """The node ids of the database answering at this URL now (for readiness).

        On PostgreSQL a pooled connection, checked before use, runs one small
        query. On SQLite a fresh connection opens the file at the configured
        path read-write, never creating it: pooled connections would keep
        using a file renamed or replaced under them. ``timeout`` bounds the
        SQLite open (seconds); PostgreSQL's is the engine's connect timeout.

        Raises :class:`StorageError` when the database does not answer.
        """

        query = f"SELECT node_id FROM {NodeRecord.__tablename__}"  # noqa: S608 - a constant
        try:
            if self.is_sqlite:
                database = self.engine.url.database
                if not database or database == ":memory:":
                    with self.engine.connect() as connection:
                        return [str(row[0]) for row in connection.exec_driver_sql(query)]
                uri = Path(database).resolve().as_uri() + "?mode=rw"
                raw = sqlite3.connect(uri, uri=True, timeout=timeout)
                try:
                    return [str(row[0]) for row in raw.execute(query)]
                finally:
                    raw.close()
            with self.engine.connect() as connection:
                return [str(row[0]) for row in connection.exec_driver_sql(query)]
        except (SQLAlchemyError, sqlite3.Error, StorageError) as exc:
            if isinstance(exc, StorageError):  # failed to connect (_failed_to_connect)
                cause: BaseException = exc.__cause__ or exc
            elif isinstance(exc, SQLAlchemyError) and hasattr(exc, "orig"):
                cause = exc.orig
            else:
                cause = exc
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise StorageError(
                f"database does not answer: {type(cause).__name__}: {first}".rstrip(": ")[:300],
                reason="storage.unavailable",
            ) from None

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()
        with self._readers_lock:
            readers, self._reader_connections = self._reader_connections, []
            self._readers_local = threading.local()
        for reader in readers:
            reader.close()


def open_database(url: str, *, echo: bool = False, pool_timeout: float | None = None) -> Database:
    """Build the database object for ``url`` (nothing is connected yet); ``pool_timeout``
    as :class:`Database` takes it."""
    load_models()
    return Database(url, echo=echo, pool_timeout=pool_timeout)


__all__ += ["Base"]
