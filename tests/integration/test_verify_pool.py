"""Receiving a batch with its signatures checked in the verification process pool.

The pool must change nothing but where the public checks run: the same
envelopes accepted, the same refusals, the same ledger; a worker killed in
the middle makes the batch a retryable error that stores nothing, and the
next batch runs on a new pool. Both engines, real processes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.envelope import PREFIX_BYTES
from gateway.node.context import NodeContext
from gateway.node.inbox import ReceiveOutcome, list_gaps, list_inbox, receive_batch
from gateway.node.verify_pool import VerifyPool, VerifyWorkerFailed
from gateway.peer.server import _refused_or_failed
from gateway.store.models_exchange import InboxEntry
from tests.integration.test_outbox_inbox import (
    NOW,
    Pair,
    count,
    ledger_kinds,
    pair,
    send,
    stored_envelope,
)

__all__ = ["pair"]  # the fixture, imported for pytest


@pytest.fixture
def pool() -> Iterator[VerifyPool]:
    made = VerifyPool(workers=2, min_envelopes=2)
    yield made
    made.shutdown()


def _mixed_batch(pair: Pair, tmp_path: Path) -> list[Path]:
    """Good envelopes, one with a flipped ciphertext bit, one with a flipped signature
    bit and one whose signed header was altered, in one request."""
    sent = [send(pair.jp) for _ in range(6)]
    paths = [stored_envelope(pair.jp, s.bundle_id) for s in sent]

    def altered(name: str, source: Path, where: int) -> Path:
        data = bytearray(source.read_bytes())
        data[where] ^= 0x01
        target = tmp_path / name
        target.write_bytes(bytes(data))
        return target

    header_length = int.from_bytes(paths[2].read_bytes()[10:14], "big")
    tampered = altered("tampered", paths[1], -1)
    bad_signature = altered("bad-signature", paths[2], PREFIX_BYTES + header_length + 5)
    bad_header = altered("bad-header", paths[4], PREFIX_BYTES + header_length - 3)
    return [paths[0], tampered, paths[3], bad_signature, paths[5], bad_header, paths[0]]


def _summary(outcomes: list[ReceiveOutcome]) -> list[tuple[str, str | None, str | None]]:
    return [
        (
            "accepted" if o.error is None else type(o.error).__name__,
            None if o.error is None else o.error.reason,
            getattr(o.error, "check", None),
        )
        for o in outcomes
    ]


EXPECTED = [
    ("accepted", None, None),
    ("EnvelopeCiphertextHashMismatch", "envelope.ciphertext-hash", "ciphertext-hash"),
    ("accepted", None, None),
    ("EnvelopeSignatureInvalid", "envelope.signature", "signature"),
    ("accepted", None, None),
    ("EnvelopeFormatError", "envelope.format", "format"),
    ("accepted", None, None),
]


@pytest.mark.parametrize("pooled", [False, True], ids=["in-process", "pool"])
def test_a_mixed_batch_gets_the_same_answers_and_ledger_with_and_without_the_pool(
    pair: Pair, tmp_path: Path, pool: VerifyPool, pooled: bool
) -> None:
    batch = _mixed_batch(pair, tmp_path)
    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    outcomes = receive_batch(ctx, batch, now=NOW, verify_pool=pool if pooled else None)
    assert _summary(outcomes) == EXPECTED
    assert bool(pool.worker_pids()) is pooled  # the pool really ran (or never started)
    assert outcomes[6].receipt == outcomes[0].receipt
    stored = sorted((e.sequence, e.bundle_id) for e in list_inbox(pair.pk.node))
    assert [sequence for sequence, _ in stored] == [1, 4, 6]
    assert ledger_kinds(pair.pk).count("bundle-received") == 3
    assert "equivocation" not in ledger_kinds(pair.pk)
    [gaps] = list_gaps(pair.pk.node)
    assert (gaps.highest, list(gaps.missing)) == (6, [(2, 3), (5, 5)])


def test_the_pool_and_the_serving_process_refuse_for_the_same_reasons(
    pair: Pair, tmp_path: Path, pool: VerifyPool
) -> None:
    from gateway.node.inbox import SpooledEnvelope, _verify_pending  # noqa: PLC0415

    batch = _mixed_batch(pair, tmp_path)
    pending = [
        (i, SpooledEnvelope(p, f"sha-{i}", p.stat().st_size)) for i, p in enumerate(batch[:6])
    ]
    answers = []
    for chosen in (None, pool):
        outcomes: list[ReceiveOutcome | None] = [None] * len(pending)
        with pair.pk.node.db.transaction() as session:
            from gateway.node.peer_trust import pinned_peer_manifest  # noqa: PLC0415

            peer = pinned_peer_manifest(session)
        assert peer is not None
        accepted = _verify_pending(
            pair.pk.node,
            pair.pk.keyring,
            NodeContext(pair.pk.node, pair.pk.keyring).policy,
            pending,
            outcomes,
            peer,
            # Half of them inline (bytes sent to the pool), half as files (paths).
            int(sorted(item.size or 0 for _, item in pending)[2]),
            NOW,
            chosen,
        )
        answers.append(
            (
                [(a.index, a.facts, a.body) for a in accepted],
                [
                    (type(o.error), o.error.reason, o.error.message)
                    for o in outcomes
                    if o and o.error
                ],
            )
        )
    assert answers[0] == answers[1]
    assert len(answers[0][0]) == 3
    assert pool.worker_pids()


def _kill_a_worker(pool: VerifyPool) -> int:
    executor = pool._executor
    assert executor is not None
    [victim, *_] = pool.worker_pids()
    os.kill(victim, signal.SIGKILL)
    # Wait until the pool's manager has seen the death, that is, until the pool knows
    # it is broken (the dead pid stays in its table until the pool is replaced).
    deadline = time.monotonic() + 30
    while not executor._broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert executor._broken, "the pool did not notice its killed worker"
    return victim


def test_a_killed_worker_fails_its_batch_stores_nothing_and_the_next_batch_runs(
    pair: Pair, tmp_path: Path, pool: VerifyPool
) -> None:
    sent = [send(pair.jp) for _ in range(4)]
    batch = [stored_envelope(pair.jp, s.bundle_id) for s in sent]
    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    # Start the workers without storing anything: two envelopes that are not envelopes.
    junk = [tmp_path / "a", tmp_path / "b"]
    for path in junk:
        path.write_bytes(b"not an envelope " + path.name.encode())
    warm = receive_batch(ctx, junk, now=NOW, verify_pool=pool)
    assert all(o.error is not None and o.error.reason.startswith("envelope.") for o in warm)
    victim = _kill_a_worker(pool)

    with pytest.raises(VerifyWorkerFailed) as failed:
        receive_batch(ctx, batch, now=NOW, verify_pool=pool)
    assert failed.value.reason == "receive.verify-worker"
    # What the peer server answers for each envelope of such a request: retry.
    answer = _refused_or_failed(0, failed.value)
    assert (answer["status"], answer["reason"], answer["retryable"]) == (
        "error",
        "receive.verify-worker",
        True,
    )
    assert count(pair.pk, InboxEntry) == 0
    assert "bundle-received" not in ledger_kinds(pair.pk)
    assert list_gaps(pair.pk.node) == []

    # The sender's retry of the same request: a new pool, every envelope accepted.
    again = receive_batch(ctx, batch, now=NOW, verify_pool=pool)
    assert [o.error for o in again] == [None] * 4
    assert not any(o.replayed for o in again)
    assert victim not in pool.worker_pids()
    assert pool.worker_pids()
    assert sorted(e.sequence for e in list_inbox(pair.pk.node)) == [1, 2, 3, 4]
    assert ledger_kinds(pair.pk).count("bundle-received") == 4


def test_the_pool_is_used_only_for_batches_that_reach_its_threshold() -> None:
    pool = VerifyPool(workers=2, min_envelopes=128)
    assert not pool.worth_it(127)
    assert pool.worth_it(128)
    assert not VerifyPool(workers=2, min_envelopes=0).worth_it(1)  # one never hops
    assert VerifyPool(workers=2, min_envelopes=0).worth_it(2)
    assert not VerifyPool(workers=0, min_envelopes=2).worth_it(1000)
    assert pool.worker_pids() == []  # nothing started by asking


def test_a_closed_pool_refuses_work_and_starts_no_worker(tmp_path: Path) -> None:
    # As serve stops, a receive thread that outlived its task may still reach the
    # pool: it gets a retryable failure, and no process is left behind.
    closed = VerifyPool(workers=1, min_envelopes=2)
    closed.close()
    source = tmp_path / "envelope"
    source.write_bytes(b"SSWG-ENV")
    with pytest.raises(VerifyWorkerFailed, match="stopping"):
        closed.verify(
            [source, source],
            node="jp",
            held_key_ids=(),
            peer_manifest=None,  # type: ignore[arg-type] - refused before it is read
            limits=None,  # type: ignore[arg-type]
            now=NOW,
        )
    assert closed.worker_pids() == []
