"""A small process pool that checks the signatures of a large received batch.

:func:`gateway.node.inbox.receive_batch` verifies every envelope of a peer
request before anything is stored. When a batch holds enough envelopes to
pay for the hop to another process (``[server] verify_pool_min_envelopes``,
docs/performance.md "Verification pool"), the public half of the checks
(:func:`gateway.core.envelope.verify_envelope_signature`: format, sender,
signature, age, ciphertext hash) runs here, split over at most
``[server] verify_pool_workers`` processes. The workers get the envelope bytes
or the path of the spooled file, this node's id, the ids (never the keys) of
its encryption keys, the pinned peer manifest and the limits; no private key
ever leaves the serving process. The content key is opened (verify before
decrypt) by the caller, in order, afterwards.

The pool is started on first use (spawned, not forked: the serving process
runs threads) and shut down with the service
(:class:`gateway.service.root.Service`). A worker that dies takes its batch
with it: :meth:`VerifyPool.verify` raises :class:`VerifyWorkerFailed`, a
:class:`~gateway.errors.StorageError` the peer server answers as retryable
for every envelope of the request, nothing is stored, and the next batch
gets a new pool.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path

from gateway import log
from gateway.core.envelope import EnvelopeHeader, verify_envelope_signature
from gateway.core.keys import KeyManifest
from gateway.core.policy import Limits
from gateway.errors import GatewayError, InvalidInput, RefusedError, StorageError, VerificationError

__all__ = ["VerifyPool", "VerifyResult", "VerifyWorkerFailed", "default_workers"]

VerifyResult = EnvelopeHeader | GatewayError
"""One envelope's answer: its verified header, or the refusal it raised."""

_log = log.get_logger("verify_pool")


class VerifyWorkerFailed(StorageError):
    """A verification process stopped in the middle of a batch; retry the batch."""

    reason = "receive.verify-worker"


def default_workers() -> int:
    """``min(2, number of CPUs)``: the pool size when the setting leaves it open."""
    return min(2, os.cpu_count() or 1)


def _verify_chunk(
    sources: Sequence[bytes | str],
    node: str,
    held_key_ids: frozenset[str],
    peer_manifest: KeyManifest,
    limits: Limits,
    now: datetime,
) -> list[VerifyResult]:
    """Run in a worker: the public checks of each envelope (bytes, or a file path)."""
    results: list[VerifyResult] = []
    for source in sources:
        try:
            with (
                io.BytesIO(source)
                if isinstance(source, bytes)
                else Path(source).open("rb") as stream
            ):
                header = verify_envelope_signature(
                    stream,
                    node=node,
                    held_key_ids=held_key_ids,
                    peer_manifest=peer_manifest,
                    limits=limits,
                    now=now,
                )
        except (VerificationError, RefusedError, InvalidInput) as exc:
            results.append(exc)
            continue
        results.append(header)
    return results


class VerifyPool:
    """At most ``workers`` verification processes, started on first use.

    ``min_envelopes`` is the least number of envelopes still to be verified in
    one batch for :meth:`worth_it` to answer yes (at least 2: a batch of one
    never goes to the pool). The count, not the size, decides: the public
    checks of a small envelope are mostly its signature, of a large one mostly
    hashing that the store repeats anyway (docs/performance.md).
    ``workers=0`` turns the pool off.
    Thread-safe: the peer server's worker threads may share one pool.
    """

    def __init__(self, *, workers: int, min_envelopes: int) -> None:
        self.workers = workers
        self.min_envelopes = max(2, min_envelopes)
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def worth_it(self, count: int) -> bool:
        """Whether a batch with ``count`` envelopes to verify should use the pool."""
        return self.workers > 0 and count >= self.min_envelopes

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise VerifyWorkerFailed(
                    "the node is stopping; nothing of the batch was stored and the peer "
                    "will send it again"
                )
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
                )
            return self._executor

    def _discard(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        """The process ids of the running workers (empty before first use)."""
        with self._lock:
            executor = self._executor
        if executor is None:
            return []
        return sorted(executor._processes or {})

    def verify(
        self,
        sources: Sequence[bytes | Path],
        *,
        node: str,
        held_key_ids: Collection[str],
        peer_manifest: KeyManifest,
        limits: Limits,
        now: datetime,
    ) -> list[VerifyResult]:
        """One result per source, in order (see :data:`VerifyResult`).

        Each source is an envelope's bytes or the path of its spooled file.
        Raises :class:`VerifyWorkerFailed` when a worker process died (the pool
        is replaced for the next call), or after :meth:`close`.
        """
        if not sources:
            return []
        executor = self._pool()
        count = min(self.workers, len(sources))
        step = -(-len(sources) // count)
        held = frozenset(held_key_ids)
        plain = [item if isinstance(item, bytes) else str(item) for item in sources]
        try:
            futures: list[Future[list[VerifyResult]]] = [
                executor.submit(
                    _verify_chunk, plain[at : at + step], node, held, peer_manifest, limits, now
                )
                for at in range(0, len(plain), step)
            ]
            results: list[VerifyResult] = []
            for future in futures:
                results.extend(future.result())
        except BrokenProcessPool:
            self._discard(executor)
            _log.error("verify_worker_failed", envelopes=len(sources))
            raise VerifyWorkerFailed(
                "a signature-checking process stopped during the batch; nothing of it "
                "was stored and the peer will send it again"
            ) from None
        return results

    def shutdown(self) -> None:
        """Stop the workers (waits for running checks); a later call starts new ones."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers for good, as the serving node stops: a batch still
        being received then (a worker thread outlives its cancelled task) gets
        :class:`VerifyWorkerFailed`, a retryable answer that stores nothing,
        instead of starting worker processes nothing would stop."""
        with self._lock:
            self._closed = True
        self.shutdown()
