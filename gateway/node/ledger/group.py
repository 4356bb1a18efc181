"""Group commit: independent appends from many threads share one transaction and one fsync.

A ledger append that records a change made in the caller's own transaction
goes through :func:`gateway.node.ledger.record_event` (or
:func:`~gateway.node.ledger.append_entries` for several) in that
transaction, so the entry and the change commit together or not at all.

Appends that stand on their own (or whose change can be written by a small
callback) go through a :class:`GroupCommitAppender` instead: callers put
their event on a queue and wait on a future; one writer thread takes
everything queued (up to ``max_batch``), opens one transaction, runs each
item's ``change`` callback, appends all the entries with one lock, one head
read and one multi-row write (:func:`~gateway.node.ledger.append_entries`),
commits (one fsync on SQLite with ``synchronous=FULL``) and only then
resolves the futures.

**How groups form.** A caller waits for its commit, so under concurrent
writers the queue fills while a commit is in flight. Right after a commit the
callers it answered are typically about to append again: if the queue then
holds fewer items than the callers that were waiting plus those just
answered, the writer lingers for them, at most ``max_linger`` seconds and
never longer than the last commit took, and stops as soon as they are all
there. Without the linger the writers split into two halves that take turns,
and each fsync carries half of them. A lone caller is never kept waiting:
nobody else was waiting when it was answered, so there is nobody to wait for.
Lingering only delays a commit; an item is still answered only after the
commit that holds it. So:

* an acknowledged entry (its future resolved) is committed and durable;
* an entry and its ``change`` commit together or not at all;
* a crash at any step loses only unacknowledged work, and duplicates
  nothing: a group is one transaction, committed at most once;
* one bad item (a refused event, a failing ``change``) does not sink the
  others: a group that fails is retried one item per transaction, and
  only the bad item's future gets the error.

Crash points (``gateway.node.crash``), in the order a group passes them:
``ledger-group-gathered`` (the group is formed, nothing is written),
``ledger-append-after-head`` and ``ledger-append-after-write`` (inside
:func:`~gateway.node.ledger.append_entries`: the lock is held and the head
read; the rows and the head state are written, not committed),
``ledger-group-before-commit``, ``ledger-group-after-commit`` and
``ledger-group-after-ack``.
"""

from __future__ import annotations

import queue
import threading
import time
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
    bounds a group (default 1,000 entries); ``max_linger`` bounds, in seconds,
    how long a group waits for the callers it expects (default 0.005; 0 turns
    the linger off; see the module notes). Thread-safe: call :meth:`submit`
    or :meth:`append` from any number of threads.
    """

    def __init__(self, db: Database, *, max_batch: int = 1000, max_linger: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0 <= max_linger <= 1:
            raise ValueError("max_linger must be between 0 and 1 second")
        self._db = db
        self._max_batch = max_batch
        self._max_linger = max_linger
        self._expected = 1
        """Callers the next group expects: those waiting or just answered at the last ack."""
        self._last_commit_s = 0.0
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
            batch, stopping = self._gather(first)
            crash_point("ledger-group-gathered")
            self._commit_group(batch)

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """``first`` and what is queued; lingers for the expected callers (module notes)."""
        batch = [first]
        limit = self._max_batch
        wanted = min(limit, self._expected)
        deadline: float | None = None
        while len(batch) < limit:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                if len(batch) >= wanted:
                    break
                now = time.monotonic()
                if deadline is None:
                    deadline = now + min(self._max_linger, self._last_commit_s)
                if now >= deadline:
                    break
                # A sleep, then a fresh look: a timed ``queue.get`` waits for an
                # absolute deadline on the monotonic clock, which a clock moved
                # under the process (a shifted clock in tests) turns into a wait
                # that never ends; a relative sleep always ends.
                time.sleep(deadline - now)
                continue
            if more is _STOP:
                return batch, True
            assert isinstance(more, _Item)
            batch.append(more)
        return batch, False

    def _commit(self, batch: list[_Item]) -> list[LedgerEntry]:
        started = time.monotonic()
        with self._db.transaction() as session:
            for item in batch:
                if item.change is not None:
                    item.change(session)
            entries = append_entries(session, [item.event for item in batch])
            crash_point("ledger-group-before-commit")
        self._last_commit_s = time.monotonic() - started
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
        # Those waiting now arrived during the commit; those answered may append again.
        self._expected = self._queue.qsize() + len(batch)
        for item, entry in zip(batch, entries, strict=True):
            item.future.set_result(entry)
        crash_point("ledger-group-after-ack")
