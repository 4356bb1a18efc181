"""Group commit: independent appends from many threads share one transaction and one fsync.

A ledger append that records a change made in the caller's own transaction
goes through :func:`gateway.node.ledger.record_event` (or
:func:`~gateway.node.ledger.append_entries` for several) in that
transaction, so the entry and the change commit together or not at all.

Appends that stand on their own (or whose change can be written by a small
callback) go through a :class:`GroupCommitAppender` instead: callers put
their event on a queue and wait on a future; one writer thread takes
everything queued (up to ``max_batch``), opens one transaction, runs each
item's ``change`` callback, appends all the entries with one head read and
one ``executemany``, commits (one fsync on SQLite with ``synchronous=FULL``)
and only then resolves the futures. So:

* an acknowledged entry (its future resolved) is committed and durable;
* an entry and its ``change`` commit together or not at all;
* a crash at any step loses only unacknowledged work, and duplicates
  nothing: a group is one transaction, committed at most once;
* one bad item (a refused event, a failing ``change``) does not sink the
  others: a group that fails is retried one item per transaction, and
  only the bad item's future gets the error.

Crash points (``gateway.node.crash``): ``ledger-group-before-commit``,
``ledger-group-after-commit`` and ``ledger-group-after-ack``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType

from sqlalchemy.orm import Session

from gateway.core.ledger import LedgerEntry
from gateway.errors import RefusedError
from gateway.log import get_logger
from gateway.node.crash import crash_point
from gateway.node.ledger import Event, append_entries
from gateway.store.db import Database

__all__ = ["Change", "GroupCommitAppender"]

_log = get_logger("ledger.group")

Change = Callable[[Session], None]
"""Writes the change an entry records, in the group's transaction."""


@dataclass
class _Item:
    event: Event
    change: Change | None
    future: Future[LedgerEntry] = field(default_factory=Future)


_STOP = object()


class GroupCommitAppender:
    """One writer thread appending queued events in shared transactions.

    Use as a context manager (or :meth:`start` / :meth:`close`). ``max_batch``
    bounds a group (default 1,000 entries). Thread-safe: call :meth:`submit`
    or :meth:`append` from any number of threads.
    """

    def __init__(self, db: Database, *, max_batch: int = 1000) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._db = db
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.groups = 0
        """Transactions committed so far (for measurements and tests)."""

    def __enter__(self) -> GroupCommitAppender:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the writer thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ledger-group-commit", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """Append everything already submitted, then stop the writer; later submits are refused."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._queue.put(_STOP)
        if thread is not None:
            thread.join()

    def submit(self, event: Event, *, change: Change | None = None) -> Future[LedgerEntry]:
        """Queue ``event`` (and the ``change`` it records); the future resolves after commit.

        The future's result is the committed entry; its exception is the
        :class:`gateway.errors.GatewayError` that refused this item (e.g.
        :class:`gateway.errors.InvalidInput` for a malformed event).
        Raises :class:`RefusedError` once :meth:`close` was called.
        """
        item = _Item(event, change)
        with self._lock:
            if self._closed:
                raise RefusedError("the ledger appender is closed; nothing was appended")
            if self._thread is None:
                raise RefusedError("the ledger appender was not started; nothing was appended")
            self._queue.put(item)
        return item.future

    def append(
        self, event: Event, *, change: Change | None = None, timeout: float | None = None
    ) -> LedgerEntry:
        """:meth:`submit` and wait: returns once the entry is committed (durable)."""
        return self.submit(event, change=change).result(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            assert isinstance(first, _Item)
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                assert isinstance(more, _Item)
                batch.append(more)
            self._commit_group(batch)

    def _commit(self, batch: list[_Item]) -> list[LedgerEntry]:
        with self._db.transaction() as session:
            for item in batch:
                if item.change is not None:
                    item.change(session)
            entries = append_entries(session, [item.event for item in batch])
            crash_point("ledger-group-before-commit")
        self.groups += 1
        crash_point("ledger-group-after-commit")
        return entries

    def _commit_group(self, batch: list[_Item]) -> None:
        try:
            entries = self._commit(batch)
        except Exception as exc:  # noqa: BLE001 - each item is retried or told below
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            _log.info("ledger_group_retried_singly", size=len(batch), reason=type(exc).__name__)
            for item in batch:
                self._commit_group([item])
            return
        for item, entry in zip(batch, entries, strict=True):
            item.future.set_result(entry)
        crash_point("ledger-group-after-ack")
