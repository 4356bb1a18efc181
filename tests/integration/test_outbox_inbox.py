"""Outbox and inbox on both engines: atomic queueing, sequence numbers, gaps, orphans.

Envelopes here are real ones sealed and verified by the envelope core; the
delivery over sockets is covered by ``tests/e2e``.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import pytest
from sqlalchemy import func, select

from gateway.core.roles import Actor, Role
from gateway.node.outbox import list_outbox, new_bundle_id, queue_sealed, retry_delay
from gateway.node.runtime import Node
from gateway.node.setup import init_node
from gateway.settings import load_settings
from gateway.store.models_exchange import (
    OutboxEntry,
    envelope_path,
    store_envelope_file,
    sweep_orphan_envelopes,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
OFFICER = Actor(name="tanaka", role=Role.OFFICER)


@pytest.fixture
def jp_node(tmp_path: Path, database_url: str, clean_environ: dict[str, str]) -> Node:
    home = tmp_path / "jp"
    init_node(home, "jp", now=NOW, db_url=database_url, environ=clean_environ)
    node = Node.open(load_settings(home, environ=clean_environ))
    yield node  # type: ignore[misc]
    node.close()


def fixed_sealer(payload: bytes):  # type: ignore[no-untyped-def]
    def seal(out: BinaryIO, *, bundle_id: str, sequence: int) -> None:
        out.write(f"{bundle_id}:{sequence}:".encode() + payload)

    return seal


def queue(node: Node, payload: bytes = b"x", **kw: object) -> object:
    return queue_sealed(
        node,
        actor=OFFICER,
        recipient="pk",
        case_type="exam-fraud",
        marking="confidential",
        reply_to=None,
        seal=fixed_sealer(payload),
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


def test_sequence_numbers_count_up_per_channel_from_one(jp_node: Node) -> None:
    sent = [queue(jp_node, bytes([i])) for i in range(5)]
    assert [s.sequence for s in sent] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    rows = list_outbox(jp_node)
    assert [r.sequence for r in rows] == [1, 2, 3, 4, 5]
    assert {r.state for r in rows} == {"queued"}
    for row in rows:
        assert envelope_path(jp_node.settings.blob_dir, row.envelope_sha256).is_file()


def test_concurrent_sends_never_share_a_sequence_number(jp_node: Node) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(5):
                queue(jp_node, f"{k}-{i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.sequence for r in list_outbox(jp_node)) == list(range(1, 21))


def test_a_failing_seal_leaves_no_row_no_file_and_no_sequence_taken(jp_node: Node) -> None:
    def broken(out: BinaryIO, *, bundle_id: str, sequence: int) -> None:
        out.write(b"partial")
        raise RuntimeError("sealing failed half-way")

    with pytest.raises(RuntimeError):
        queue_sealed(
            jp_node,
            actor=OFFICER,
            recipient="pk",
            case_type="exam-fraud",
            marking="confidential",
            reply_to=None,
            seal=broken,
            now=NOW,
        )
    with jp_node.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(OutboxEntry)) == 0
    store = jp_node.settings.blob_dir / "envelopes"
    assert [p for p in store.rglob("*") if p.is_file()] == []
    assert queue(jp_node).sequence == 1  # type: ignore[attr-defined]


def test_orphan_envelope_files_are_swept_and_named_ones_kept(jp_node: Node, tmp_path: Path) -> None:
    kept = queue(jp_node)
    orphan_src = tmp_path / "orphan"
    orphan_src.write_bytes(b"an envelope whose transaction never committed")
    with orphan_src.open("rb") as handle:
        _sha, _, orphan = store_envelope_file(jp_node.settings.blob_dir, handle)
    old = (NOW - timedelta(hours=2)).timestamp()
    os.utime(orphan, (old, old))
    kept_path = envelope_path(jp_node.settings.blob_dir, kept.envelope_sha256)  # type: ignore[attr-defined]
    os.utime(kept_path, (old, old))
    with jp_node.db.transaction() as session:
        removed = sweep_orphan_envelopes(session, jp_node.settings.blob_dir, now=NOW)
    assert removed == [orphan]
    assert kept_path.is_file()
    assert not orphan.exists()


def test_a_fresh_orphan_is_kept_during_the_grace_period(jp_node: Node, tmp_path: Path) -> None:
    src = tmp_path / "fresh"
    src.write_bytes(b"being committed right now")
    with src.open("rb") as handle:
        _, _, path = store_envelope_file(jp_node.settings.blob_dir, handle)
    with jp_node.db.transaction() as session:
        assert (
            sweep_orphan_envelopes(session, jp_node.settings.blob_dir, now=datetime.now(UTC)) == []
        )
    assert path.is_file()


def test_bundle_ids_sort_by_time_and_do_not_repeat() -> None:
    ids = [new_bundle_id(NOW + timedelta(milliseconds=i)) for i in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50
    assert all(len(i) == 26 for i in ids)
    # 2026-11-25T12:00Z in milliseconds, then 80 zero bits: a fixed known answer.
    assert new_bundle_id(NOW, _random=bytes) == "01M8997DG00000000000000000"


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(0, 0.0, 0.0), (1, 0.5, 1.0), (2, 1.0, 2.0), (5, 8.0, 16.0), (30, 150.0, 300.0)],
)
def test_retry_delay_grows_exponentially_with_jitter_and_a_cap(
    failures: int, low: float, high: float
) -> None:
    assert retry_delay(failures, rng=lambda: 0.0) == low
    assert retry_delay(failures, rng=lambda: 1.0) == high
