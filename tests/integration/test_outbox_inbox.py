"""Outbox and inbox on both engines: atomic queueing, sequence numbers, receipts,
idempotency, equivocation, tampering, gaps, reading.

Two real nodes (jp and pk) live in the test's folder, each with its own
database, keys and pinned peer; envelopes are sealed and verified by the
envelope core. The receiver is called the way the peer server calls it; the
same over real sockets and processes is covered by ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from sqlalchemy import event, func, select

import gateway.node.policy
from gateway.core.cases import validate_case
from gateway.core.envelope import seal
from gateway.core.keys import NodeKeyring
from gateway.core.receipt import parse_receipt, verify_receipt
from gateway.core.roles import Actor, Role
from gateway.errors import StorageError, TransportError, VerificationError
from gateway.node import own_keys, peer_trust
from gateway.node.context import NodeContext
from gateway.node.inbox import (
    EquivocationRefused,
    list_gaps,
    list_inbox,
    read_bundle,
    receive_envelope,
)
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import verify as ledger_verify
from gateway.node.outbox import (
    Sealed,
    deliver_once,
    deliver_pending,
    list_outbox,
    queue_sealed,
    retry_delay,
    run_sender_loop,
    send_case,
)
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node
from gateway.store.models_exchange import (
    Equivocation,
    InboxEntry,
    OutboxEntry,
    adopt_envelope_file,
    adopt_envelope_files,
    envelope_path,
    store_envelope_file,
    sweep_orphan_envelopes,
)
from tests.node_api import serve_node
from tests.nodes import open_pinned_pair

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
PASSPHRASE = "correct horse battery staple"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
OFFICER = Actor(name="tanaka", role=Role.OFFICER)


PK_OFFICER = Actor(name="bilal", role=Role.OFFICER)


@dataclass
class Side:
    node: Node
    keyring: NodeKeyring


@dataclass
class Pair:
    jp: Side
    pk: Side


def _environ(clean: dict[str, str]) -> dict[str, str]:
    return {**clean, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}


def _unlock(node: Node, now: datetime) -> NodeKeyring:
    with node.db.transaction() as session:
        return unlock_keyring(node.settings, PASSPHRASE.encode(), session, now=now)


def _open_pair(
    tmp_path: Path,
    make_database: Callable[[str], str],
    clean_environ: dict[str, str],
    now: datetime,
) -> Iterator[Pair]:
    env = _environ(clean_environ)
    urls = {"jp": make_database("test"), "pk": make_database("pk")}
    nodes = open_pinned_pair(tmp_path, urls, env, now=now)
    made = Pair(
        jp=Side(nodes["jp"], _unlock(nodes["jp"], now)),
        pk=Side(nodes["pk"], _unlock(nodes["pk"], now)),
    )
    yield made
    for node in nodes.values():
        node.close()


@pytest.fixture
def pair(
    tmp_path: Path,
    migrated_database_factory: Callable[[str], str],
    clean_environ: dict[str, str],
) -> Iterator[Pair]:
    """Two nodes with keys made at the pinned ``NOW``, each pinning the other's manifest.

    Every step of a test on this pair passes ``now=NOW`` (or a time derived from it):
    the commands, which read the real clock, take :func:`live_pair` instead.
    """
    yield from _open_pair(tmp_path, migrated_database_factory, clean_environ, NOW)


@pytest.fixture
def live_pair(
    tmp_path: Path,
    migrated_database_factory: Callable[[str], str],
    clean_environ: dict[str, str],
) -> Iterator[Pair]:
    """The same pair with keys made at the real time, for tests that run CLI commands.

    A command signs with the real clock; keys made at a pinned time would stop being
    valid for it once the calendar passed their validity window.
    """
    now = datetime.now(UTC)
    yield from _open_pair(tmp_path, migrated_database_factory, clean_environ, now)


def example(case_type: str) -> dict[str, Any]:
    return dict(json.loads((EXAMPLES / f"{case_type}.json").read_text()))


def send(side: Side, case_type: str = "exam-fraud", *, when: datetime = NOW, **kw: Any) -> Any:
    return send_case(
        NodeContext(side.node, side.keyring),
        OFFICER,
        case_type,
        example(case_type),
        kw.pop("attachments", []),
        public=kw.pop("public", False),
        reply_to=kw.pop("reply_to", None),
        now=when,
    )


def stored_envelope(side: Side, bundle_id: str) -> Path:
    with side.node.db.transaction() as session:
        sha = session.scalars(
            select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == bundle_id)
        ).one()
    return envelope_path(side.node.settings.blob_dir, sha)


def count(side: Side, model: type[Any]) -> int:
    with side.node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def ledger_kinds(side: Side) -> list[str]:
    with side.node.db.transaction() as session:
        return [str(e.kind) for e in ledger_read.list_entries(session)]


def raw_sealer(payload: bytes) -> Callable[..., Sealed]:
    """Writes opaque bytes: for the storage guarantees, which do not look inside."""

    def write(out: BinaryIO, *, sequence: int) -> Sealed:
        out.write(f"{sequence}:".encode() + payload)
        return Sealed(bundle_id=str(uuid.uuid4()), marking="confidential")

    return write


def queue(node: Node, payload: bytes = b"x") -> Any:
    return queue_sealed(
        node,
        actor=OFFICER,
        recipient="pk",
        case_type="exam-fraud",
        reply_to=None,
        seal=raw_sealer(payload),
        now=NOW,
    )


@pytest.fixture
def jp_node(pair: Pair) -> Node:
    return pair.jp.node


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
    def broken(out: BinaryIO, *, sequence: int) -> Sealed:
        out.write(b"partial")
        raise RuntimeError("sealing failed half-way")

    with pytest.raises(RuntimeError):
        queue_sealed(
            jp_node,
            actor=OFFICER,
            recipient="pk",
            case_type="exam-fraud",
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
    old = orphan.stat().st_mtime - timedelta(hours=2).total_seconds()  # the store's own clock
    os.utime(orphan, (old, old))
    kept_path = envelope_path(jp_node.settings.blob_dir, kept.envelope_sha256)  # type: ignore[attr-defined]
    os.utime(kept_path, (old, old))
    with jp_node.db.transaction() as session:
        removed = sweep_orphan_envelopes(session, jp_node.settings.blob_dir)
    assert removed == [orphan]
    assert kept_path.is_file()
    assert not orphan.exists()


def test_a_fresh_orphan_is_kept_during_the_grace_period(jp_node: Node, tmp_path: Path) -> None:
    src = tmp_path / "fresh"
    src.write_bytes(b"being committed right now")
    with src.open("rb") as handle:
        _, _, path = store_envelope_file(jp_node.settings.blob_dir, handle)
    with jp_node.db.transaction() as session:
        assert sweep_orphan_envelopes(session, jp_node.settings.blob_dir) == []
    assert path.is_file()


@pytest.mark.parametrize("made_by_another", [False, True], ids=["new", "made-by-another"])
@pytest.mark.parametrize("way", ["adopt", "adopt-batch", "store"])
def test_a_store_folder_made_for_a_file_is_synced_into_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str, made_by_another: bool
) -> None:
    """A file's sync and its folder's sync leave the folder's own entry in its parent
    unsynced: every store folder a file goes into is synced into its parent before
    the file is named there, whichever way the file enters the store, and also when
    another process (or thread) made the folder and may not have synced it yet."""
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    source = tmp_path / "spooled"
    source.write_bytes(b"envelope bytes " * 100)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    if made_by_another:
        (blob_dir / "envelopes").mkdir(mode=0o700)
        (blob_dir / "envelopes" / sha[:2]).mkdir(mode=0o700)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if way == "adopt":
        final = adopt_envelope_file(blob_dir, source, sha)
    elif way == "adopt-batch":
        adopt_envelope_files(blob_dir, [(source, sha)])
        final = blob_dir / "envelopes" / sha[:2] / sha
    else:
        with source.open("rb") as handle:
            _, _, final = store_envelope_file(blob_dir, handle)
    made = [blob_dir / "envelopes", final.parent]
    for folder in made:
        assert str(folder.parent) in synced, (folder, synced)
        assert (folder.stat().st_mode & 0o777) == 0o700
    # each parent is synced after its folder exists and before the file is named
    assert synced.index(str(made[0].parent)) < synced.index(str(made[1].parent))
    assert synced.index(str(made[1].parent)) < len(synced) - 1
    assert final.read_bytes() == source.read_bytes()


def test_a_received_file_is_adopted_by_link_or_by_checked_copy(tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    same_fs = tmp_path / "spooled"
    same_fs.write_bytes(b"envelope bytes " * 100)
    sha = hashlib.sha256(same_fs.read_bytes()).hexdigest()
    linked = adopt_envelope_file(blob_dir, same_fs, sha)
    assert linked.read_bytes() == same_fs.read_bytes()
    assert linked.stat().st_ino == same_fs.stat().st_ino  # no copy on one file system
    other_fs = Path("/dev/shm")
    if other_fs.is_dir() and other_fs.stat().st_dev != tmp_path.stat().st_dev:
        elsewhere = other_fs / f"gw-test-{uuid.uuid4().hex}"
        try:
            elsewhere.write_bytes(b"another envelope")
            other_sha = hashlib.sha256(b"another envelope").hexdigest()
            copied = adopt_envelope_file(blob_dir, elsewhere, other_sha)
            assert copied.read_bytes() == b"another envelope"
            assert copied.stat().st_ino != elsewhere.stat().st_ino
            with pytest.raises(StorageError):  # a copy that does not match its hash
                adopt_envelope_file(blob_dir, elsewhere, "0" * 64)
        finally:
            elsewhere.unlink(missing_ok=True)
    assert [p.name for p in (blob_dir / "envelopes").rglob(".tmp-*")] == []


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(0, 0.0, 0.0), (1, 0.5, 1.0), (2, 1.0, 2.0), (5, 8.0, 16.0), (30, 150.0, 300.0)],
)
def test_retry_delay_grows_exponentially_with_jitter_and_a_cap(
    failures: int, low: float, high: float
) -> None:
    assert retry_delay(failures, rng=lambda: 0.0) == low
    assert retry_delay(failures, rng=lambda: 1.0) == high


# -- real envelopes between the two nodes ----------------------------------------------


def test_a_sent_case_is_stored_once_at_the_peer_with_a_receipt_that_verifies(pair: Pair) -> None:
    sent = send(pair.jp, "broker-misconduct")
    receipt = receive_envelope(
        NodeContext(pair.pk.node, pair.pk.keyring),
        stored_envelope(pair.jp, sent.bundle_id),
        now=NOW,
    )
    verified = verify_receipt(
        receipt,
        peer_manifest=pair.pk.keyring.manifest,
        expected_bundle_id=sent.bundle_id,
        expected_envelope_hash=sent.envelope_sha256,
        expected_sender="jp",
    )
    assert (verified.receiver, verified.sender, verified.received_at) == ("pk", "jp", NOW)
    [row] = list_inbox(pair.pk.node)
    assert (row.bundle_id, row.sender, row.sequence, row.case_type, row.marking) == (
        sent.bundle_id,
        "jp",
        1,
        "broker-misconduct",
        "confidential",
    )
    assert row.receipt == receipt
    assert "bundle-received" in ledger_kinds(pair.pk)
    assert "bundle-sent" in ledger_kinds(pair.jp)


def test_the_same_envelope_again_gets_the_identical_receipt_and_stores_nothing(
    pair: Pair,
) -> None:
    sent = send(pair.jp)
    path = stored_envelope(pair.jp, sent.bundle_id)
    first = receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), path, now=NOW)
    entries = len(ledger_kinds(pair.pk))
    again = receive_envelope(
        NodeContext(pair.pk.node, pair.pk.keyring), path, now=NOW + timedelta(hours=1)
    )
    assert again == first
    assert count(pair.pk, InboxEntry) == 1
    assert len(ledger_kinds(pair.pk)) == entries


def _seal_with_bundle_bytes(side: Side, case: dict[str, Any], sequence: int, out: Path) -> str:
    """Seal with the first 16 random bytes (the bundle id) pinned, the rest fresh."""
    draws = iter([b"\x42" * 16])

    def random(n: int) -> bytes:
        return next(draws, None) or os.urandom(n)

    policy = gateway.node.policy.load_policy(side.node.settings)
    with side.node.db.transaction() as session:
        peer = peer_trust.pinned_peer_manifest(session)
    assert peer is not None
    with out.open("w+b") as handle:
        sealed = seal(
            handle,
            case_type="exam-fraud",
            case=case,
            keyring=side.keyring,
            peer_manifest=peer,
            policy=policy,
            sequence=sequence,
            now=NOW,
            random=random,
        )
    return sealed.bundle_id


def test_a_different_envelope_under_a_known_id_is_refused_and_recorded(
    pair: Pair, tmp_path: Path
) -> None:
    case = example("exam-fraud")
    first_id = _seal_with_bundle_bytes(pair.jp, case, 1, tmp_path / "a")
    other_id = _seal_with_bundle_bytes(
        pair.jp, {**case, "description": "changed"}, 1, tmp_path / "b"
    )
    assert first_id == other_id
    receipt = receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), tmp_path / "a", now=NOW)
    with pytest.raises(EquivocationRefused) as caught:
        receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), tmp_path / "b", now=NOW)
    assert caught.value.reason == "equivocation"
    with pytest.raises(EquivocationRefused):  # again: refused, recorded once
        receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), tmp_path / "b", now=NOW)
    with pair.pk.node.db.transaction() as session:
        [record] = session.scalars(select(Equivocation)).all()
        assert record.bundle_id == first_id
        assert record.first_envelope_sha256 == parse_receipt(receipt).envelope_sha256
        assert record.other_header
    assert ledger_kinds(pair.pk).count("equivocation") == 1
    evidence = envelope_path(pair.pk.node.settings.blob_dir, record.other_envelope_sha256)
    assert evidence.read_bytes() == (tmp_path / "b").read_bytes()
    with pair.pk.node.db.transaction() as session:
        sweep_orphan_envelopes(session, pair.pk.node.settings.blob_dir, grace=timedelta(0))
    assert evidence.is_file()  # kept as evidence, never swept
    [row] = list_inbox(pair.pk.node)
    assert row.receipt == receipt
    assert (
        receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), tmp_path / "a", now=NOW)
        == receipt
    )


def _flip(data: bytes, where: str) -> bytes:
    header_len = int.from_bytes(data[10:14], "big")
    offset = {
        "prefix": 3,
        "header": 14 + header_len // 2,
        "signature": 14 + header_len + 10,
        "ciphertext": 14 + header_len + 64 + 5,
        "last-byte": len(data) - 1,
    }[where]
    tampered = bytearray(data)
    tampered[offset] ^= 0x01
    return bytes(tampered)


def test_a_flipped_bit_is_refused_without_a_trace_and_the_clean_retry_succeeds(
    pair: Pair, tmp_path: Path
) -> None:
    for where in ("prefix", "header", "signature", "ciphertext", "last-byte"):
        sent = send(pair.jp)
        clean_path = stored_envelope(pair.jp, sent.bundle_id)
        bad = tmp_path / f"tampered-{where}"
        bad.write_bytes(_flip(clean_path.read_bytes(), where))
        before = (count(pair.pk, InboxEntry), ledger_kinds(pair.pk))
        with pytest.raises(VerificationError):
            receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), bad, now=NOW)
        assert (count(pair.pk, InboxEntry), ledger_kinds(pair.pk)) == before, where
        receipt = receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), clean_path, now=NOW)
        assert parse_receipt(receipt).bundle_id == sent.bundle_id
        assert count(pair.pk, InboxEntry) == before[0] + 1


def test_an_envelope_addressed_to_another_node_is_refused_with_nothing_stored(
    pair: Pair,
) -> None:
    sent = send(pair.jp)
    with pytest.raises(VerificationError) as caught:
        receive_envelope(
            NodeContext(pair.jp.node, pair.jp.keyring),
            stored_envelope(pair.jp, sent.bundle_id),
            now=NOW,
        )
    assert caught.value.check == "recipient"
    assert count(pair.jp, InboxEntry) == 0


def test_missing_sequence_numbers_are_reported_as_gaps_until_they_arrive(pair: Pair) -> None:
    sent = [send(pair.jp) for _ in range(6)]
    paths = {s.sequence: stored_envelope(pair.jp, s.bundle_id) for s in sent}
    for seq in (1, 3, 6):
        receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), paths[seq], now=NOW)
    [gaps] = list_gaps(pair.pk.node)
    assert (gaps.channel, gaps.highest, list(gaps.missing)) == ("jp->pk", 6, [(2, 2), (4, 5)])
    receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), paths[4], now=NOW)
    assert list(list_gaps(pair.pk.node)[0].missing) == [(2, 2), (5, 5)]
    for seq in (2, 5):
        receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), paths[seq], now=NOW)
    assert list(list_gaps(pair.pk.node)[0].missing) == []


@dataclass
class _Result:
    status: str
    receipt: bytes | None
    reason: str | None


class DirectClient:
    """Hands envelopes to the peer's receiving function in this process (no HTTP)."""

    def __init__(self, peer: Side, *, lose_answers: bool = False, now: datetime = NOW) -> None:
        self.peer = peer
        self.now = now
        self.lose_answers = lose_answers
        self.received: list[Path] = []
        self.manifests: list[bytes] = []

    async def post_envelopes(self, paths: Sequence[Path]) -> list[_Result]:
        results = []
        for path in paths:
            self.received.append(path)
            try:
                receipt = receive_envelope(
                    NodeContext(self.peer.node, self.peer.keyring), path, now=self.now
                )
            except VerificationError as exc:
                results.append(_Result("refused", None, exc.reason))
                continue
            results.append(_Result("accepted", receipt, None))
        if self.lose_answers:
            raise ConnectionResetError("answer lost")
        return results

    async def post_manifest(self, raw: bytes) -> None:
        self.manifests.append(raw)
        sender = "jp" if self.peer.node.node_id == "pk" else "pk"
        with self.peer.node.db.transaction() as session:
            peer_trust.apply_peer_manifest(session, raw, node=sender, now=self.now)


def test_delivery_counts_only_verified_receipts_and_a_lost_answer_is_resent(pair: Pair) -> None:
    sent = [send(pair.jp) for _ in range(3)]
    lossy = DirectClient(pair.pk, lose_answers=True)
    with pytest.raises(ConnectionResetError):
        asyncio.run(
            deliver_once(NodeContext(pair.jp.node, pair.jp.keyring), lossy, now_fn=lambda: NOW)
        )
    assert {r.state for r in list_outbox(pair.jp.node)} == {"queued"}
    assert count(pair.pk, InboxEntry) == 3
    receipts = {r.bundle_id: r.receipt for r in list_inbox(pair.pk.node)}
    report = asyncio.run(
        deliver_once(
            NodeContext(pair.jp.node, pair.jp.keyring), DirectClient(pair.pk), now_fn=lambda: NOW
        )
    )
    assert sorted(report.delivered) == sorted(s.bundle_id for s in sent)
    assert report.remaining == 0
    for row in list_outbox(pair.jp.node):
        assert row.state == "delivered"
        assert row.receipt == receipts[row.bundle_id]
    assert count(pair.pk, InboxEntry) == 3


def test_after_a_key_rotation_the_new_manifest_goes_first_and_new_bundles_are_accepted(
    pair: Pair,
) -> None:
    later = NOW + timedelta(minutes=1)
    with pair.jp.node.db.transaction() as session:
        own_keys.rotate_keys(
            pair.jp.node.settings,
            session,
            PASSPHRASE.encode(),
            now=later,
            actor=Actor(name="admin", role=Role.ADMIN),
        )
    with pair.jp.node.db.transaction() as session:
        rotated = unlock_keyring(pair.jp.node.settings, PASSPHRASE.encode(), session, now=later)
    assert rotated.signing_key_id != pair.jp.keyring.signing_key_id
    pair.jp.keyring = rotated
    sent = send(pair.jp, when=later)
    client = DirectClient(pair.pk, now=later)
    report = asyncio.run(
        deliver_once(NodeContext(pair.jp.node, rotated), client, now_fn=lambda: later)
    )
    assert report.manifests_sent == 1
    assert client.manifests == [rotated.manifest.raw]
    assert report.delivered == [sent.bundle_id]
    [row] = list_inbox(pair.pk.node)
    assert row.signing_key_id == rotated.signing_key_id
    again = asyncio.run(
        deliver_once(NodeContext(pair.jp.node, rotated), client, now_fn=lambda: later)
    )
    assert (again.manifests_sent, again.attempted) == (0, 0)


def test_an_officer_reads_a_received_bundle_and_the_read_is_logged(
    pair: Pair, tmp_path: Path
) -> None:
    attachment = tmp_path / "passport scan.pdf"
    attachment.write_bytes(b"%PDF-1.7 " + os.urandom(3000))
    sent = send(pair.jp, "return-assistance", attachments=[attachment])
    receive_envelope(
        NodeContext(pair.pk.node, pair.pk.keyring),
        stored_envelope(pair.jp, sent.bundle_id),
        now=NOW,
    )
    out = tmp_path / "out"
    out.mkdir()
    shown = read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, sent.bundle_id, out_dir=out, now=NOW
    )
    assert shown.case == validate_case(
        "return-assistance", example("return-assistance")
    ).model_dump(mode="json")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{sent.bundle_id}.json", "passport scan.pdf"])
    assert (out / "passport scan.pdf").read_bytes() == attachment.read_bytes()
    with pair.pk.node.db.transaction() as session:
        [entry] = ledger_read.list_entries(session, kind="bundle-read")
    assert entry.actor_name == "bilal"
    assert entry.bundle_id == sent.bundle_id


def test_envelopes_go_in_sequence_order_in_bounded_batches(pair: Pair) -> None:
    sent = [send(pair.jp) for _ in range(10)]
    client = DirectClient(pair.pk)
    calls: list[int] = []
    original = client.post_envelopes

    async def counting(paths: Sequence[Path]) -> list[_Result]:
        calls.append(len(paths))
        return await original(paths)

    client.post_envelopes = counting  # type: ignore[method-assign]
    report = asyncio.run(
        deliver_pending(
            pair.jp.node,
            client,
            peer_manifest=lambda node: pair.pk.keyring.manifest,
            pending_manifests=lambda node: [],
            mark_manifest_delivered=lambda node, handle, now: None,
            now_fn=lambda: NOW,
            batch_size=4,
        )
    )
    assert calls == [4, 4, 2]
    assert report.delivered == [s.bundle_id for s in sent]
    order = {p: i for i, p in enumerate(client.received)}
    assert [order[stored_envelope(pair.jp, s.bundle_id)] for s in sent] == list(range(10))


def test_a_refused_bundle_stays_queued_with_backoff_and_does_not_block_the_others(
    pair: Pair,
) -> None:
    first, second = send(pair.jp), send(pair.jp)
    bad = stored_envelope(pair.jp, first.bundle_id)

    class Refusing(DirectClient):
        async def post_envelopes(self, paths: Sequence[Path]) -> list[_Result]:
            results = await super().post_envelopes([p for p in paths if p != bad])
            by_path = dict(zip([p for p in paths if p != bad], results, strict=True))
            return [by_path.get(p, _Result("refused", None, "policy.size")) for p in paths]

    report = asyncio.run(
        deliver_once(
            NodeContext(pair.jp.node, pair.jp.keyring), Refusing(pair.pk), now_fn=lambda: NOW
        )
    )
    assert report.delivered == [second.bundle_id]
    assert report.refused == {first.bundle_id: "refused: policy.size"}
    rows = {r.bundle_id: r for r in list_outbox(pair.jp.node)}
    queued = rows[first.bundle_id]
    assert (queued.state, queued.attempts, queued.last_error) == (
        "queued",
        1,
        "refused: policy.size",
    )
    assert queued.next_attempt_at > NOW
    assert rows[second.bundle_id].state == "delivered"
    not_due = asyncio.run(
        deliver_once(
            NodeContext(pair.jp.node, pair.jp.keyring),
            DirectClient(pair.pk),
            now_fn=lambda: NOW,
            due_only=True,
        )
    )
    assert not_due.attempted == 0
    later = queued.next_attempt_at + timedelta(seconds=1)
    due = asyncio.run(
        deliver_once(
            NodeContext(pair.jp.node, pair.jp.keyring),
            DirectClient(pair.pk),
            now_fn=lambda: later,
            due_only=True,
        )
    )
    assert due.delivered == [first.bundle_id]


def test_the_sender_worker_retries_through_failures_and_wakes_when_a_bundle_is_queued(
    pair: Pair,
) -> None:
    first = send(pair.jp)
    attempts: list[str] = []

    @asynccontextmanager
    async def flaky() -> AsyncIterator[DirectClient]:
        attempts.append("try")
        if len(attempts) <= 2:
            raise TransportError("peer unreachable (test)", reason="transport.unreachable")
        yield DirectClient(pair.pk)

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_sender_loop(
                pair.jp.node,
                flaky,
                stop,
                deliver=lambda client: deliver_once(
                    NodeContext(pair.jp.node, pair.jp.keyring), client, now_fn=lambda: NOW
                ),
                interval=3600.0,  # only a wake-up can bring the second bundle in time
                rng=lambda: 0.0,
            )
        )
        await _until(lambda: count(pair.pk, InboxEntry) == 1)
        second = await asyncio.to_thread(send, pair.jp)
        await _until(lambda: count(pair.pk, InboxEntry) == 2)
        stop.set()
        await asyncio.wait_for(worker, timeout=30)
        assert {r.bundle_id for r in list_inbox(pair.pk.node)} == {
            first.bundle_id,
            second.bundle_id,
        }

    asyncio.run(scenario())
    # Two failures, then the delivery of the first bundle; the second arrived within
    # the 60 s wait although the poll interval is an hour: either the wake-up started a
    # fourth pass, or the third pass was still running and took it along.
    assert len(attempts) >= 3
    assert {r.state for r in list_outbox(pair.jp.node)} == {"delivered"}


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):
        while not await asyncio.to_thread(predicate):  # noqa: ASYNC110 - polls a database
            await asyncio.sleep(0.05)


# -- the commands ----------------------------------------------------------------------


def _token(side: Side, name: str, role: str) -> str:
    from gateway.node.users import add_user  # noqa: PLC0415

    with side.node.db.transaction() as session:
        return add_user(
            session, name, role, created_by="host", by_host=True, now=datetime.now(UTC)
        ).token.text


def _cli(side: Side, token: str, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    from click.testing import CliRunner  # noqa: PLC0415

    from gateway.cli.main import cli  # noqa: PLC0415

    serve_node(side.node, lambda: side.keyring)  # user commands reach the running node
    env = {"GATEWAY_HOME": str(side.node.settings.home), "GATEWAY_TOKEN": token}
    result = CliRunner().invoke(cli, ["--json", *args], env=env, input=stdin)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("send", "exam-fraud", "-"), '{"fraud": "impersonation"}', "exam-fraud: "),
        (("send", "no-such-type", "-"), "{}", "unknown case type"),
        (("send", "exam-fraud", "-"), "[1, 2]", "must be a JSON object"),
        (("send", "exam-fraud", "-"), '{"a": 1, "a": 2}', "duplicate JSON key"),
        (("send", "exam-fraud", "/no/such/file.json"), None, "cannot be read"),
    ],
)
def test_send_refuses_bad_input_naming_the_problem_and_queues_nothing(
    live_pair: Pair, args: tuple[str, ...], stdin: str | None, message: str
) -> None:
    officer = _token(live_pair.jp, "tanaka", "officer")
    code, out, err = _cli(live_pair.jp, officer, *args, stdin=stdin)
    assert code == 1
    assert message in json.loads(out)["error"]["message"]
    assert message in err
    assert count(live_pair.jp, OutboxEntry) == 0


def test_send_inbox_outbox_and_show_work_for_officers_and_refuse_other_roles(
    live_pair: Pair, tmp_path: Path
) -> None:
    officer = _token(live_pair.jp, "tanaka", "officer")
    compliance = _token(live_pair.jp, "audit", "compliance")
    case_file = EXAMPLES / "consultation.json"
    code, out, err = _cli(live_pair.jp, compliance, "send", "consultation", str(case_file))
    assert code == 1
    assert "officer" in err
    code, out, err = _cli(live_pair.jp, officer, "send", "consultation", str(case_file))
    assert code == 0, err
    sent = json.loads(out)
    assert (sent["type"], sent["sequence"]) == ("consultation", 1)
    code, out, err = _cli(live_pair.jp, officer, "outbox")
    assert code == 0, err
    [row] = json.loads(out)["bundles"]
    assert (row["bundle_id"], row["state"], row["receipt"]) == (sent["bundle_id"], "queued", None)
    receive_envelope(
        NodeContext(live_pair.pk.node, live_pair.pk.keyring),
        stored_envelope(live_pair.jp, sent["bundle_id"]),
        now=datetime.now(UTC),  # the command sealed at the real time
    )
    pk_officer = _token(live_pair.pk, "bilal", "officer")
    code, out, err = _cli(live_pair.pk, pk_officer, "inbox", "--type", "consultation")
    assert code == 0, err
    [listed] = json.loads(out)["bundles"]
    assert (listed["bundle_id"], listed["sender"], listed["marking"]) == (
        sent["bundle_id"],
        "jp",
        "confidential",
    )
    code, out, err = _cli(live_pair.pk, pk_officer, "inbox", "--gaps")
    assert json.loads(out)["gaps"] == [{"channel": "jp->pk", "highest": 1, "missing": []}]
    code, out, err = _cli(
        live_pair.pk, _token(live_pair.pk, "audit", "compliance"), "show", sent["bundle_id"]
    )
    assert code == 1
    assert "case" not in json.loads(out)
    code, out, err = _cli(
        live_pair.pk, pk_officer, "show", sent["bundle_id"], "--out", str(tmp_path / "o")
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["case"] == validate_case("consultation", example("consultation")).model_dump(
        mode="json"
    )
    assert (tmp_path / "o" / f"{sent['bundle_id']}.json").is_file()
    code, out, err = _cli(live_pair.pk, pk_officer, "show", "00000000-0000-4000-8000-000000000000")
    assert code == 1
    assert "no bundle" in err


def test_concurrent_receives_store_each_bundle_once_and_report_no_false_gaps(pair: Pair) -> None:
    sent = [send(pair.jp) for _ in range(12)]
    paths = [stored_envelope(pair.jp, s.bundle_id) for s in sent]
    work = paths + paths[:4]  # four of them arrive twice at the same time
    receipts: dict[Path, set[bytes]] = {p: set() for p in paths}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def receive(path: Path) -> None:
        try:
            receipt = receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), path, now=NOW)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            receipts[path].add(receipt)

    threads = [threading.Thread(target=receive, args=(p,)) for p in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(r) == 1 for r in receipts.values())  # duplicates got the identical receipt
    assert sorted(r.bundle_id for r in list_inbox(pair.pk.node)) == sorted(
        s.bundle_id for s in sent
    )
    [gaps] = list_gaps(pair.pk.node)
    assert (gaps.highest, list(gaps.missing)) == (12, [])


# -- delivery state when the peer cannot be reached -------------------------------------


def _unreachable_client(side: Side) -> Any:
    from gateway.peer.client import PeerClient  # noqa: PLC0415
    from tests.nodes import free_port  # noqa: PLC0415

    return PeerClient(side.node.settings, side.keyring, peer_url=f"http://127.0.0.1:{free_port()}")


def test_a_pass_that_cannot_reach_the_peer_records_attempts_last_error_and_next_attempt(
    pair: Pair,
) -> None:
    from gateway.node.outbox import describe_outbox_entry  # noqa: PLC0415
    from gateway.peer.client import PeerUnreachable  # noqa: PLC0415

    sent = [send(pair.jp), send(pair.jp)]

    async def one_pass(now: datetime) -> None:
        async with _unreachable_client(pair.jp) as client:
            await deliver_once(
                NodeContext(pair.jp.node, pair.jp.keyring), client, now_fn=lambda: now
            )

    for number, when in enumerate((NOW, NOW + timedelta(hours=1)), start=1):
        with pytest.raises(PeerUnreachable) as caught:
            asyncio.run(one_pass(when))
        assert caught.value.reason == "transport.refused"
        rows = [describe_outbox_entry(r) for r in list_outbox(pair.jp.node, state="queued")]
        assert [r["bundle_id"] for r in rows] == [s.bundle_id for s in sent]
        for row in rows:
            assert row["attempts"] == number
            assert row["last_error"] == caught.value.message
            assert "connection refused" in row["last_error"]
            assert row["next_attempt"] > when

    officer = _token(pair.jp, "tanaka", "officer")
    from click.testing import CliRunner  # noqa: PLC0415

    from gateway.cli.main import cli  # noqa: PLC0415

    serve_node(pair.jp.node, lambda: pair.jp.keyring)
    env = {"GATEWAY_HOME": str(pair.jp.node.settings.home), "GATEWAY_TOKEN": officer}
    shown = CliRunner().invoke(cli, ["outbox", "--state", "queued"], env=env)
    assert shown.exit_code == 0, shown.output
    for line in shown.stdout.splitlines():
        assert "queued, 2 attempt(s), next 20" in line
        assert "last error: peer at 127.0.0.1:" in line
        assert "connection refused" in line


def test_the_sender_worker_logs_the_named_cause_and_the_rows_keep_it(pair: Pair) -> None:
    from structlog.testing import capture_logs  # noqa: PLC0415

    send(pair.jp)

    def attempts() -> int:
        return sum(r.attempts for r in list_outbox(pair.jp.node, state="queued"))

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_sender_loop(
                pair.jp.node,
                lambda: _unreachable_client(pair.jp),
                stop,
                deliver=lambda client: deliver_once(
                    NodeContext(pair.jp.node, pair.jp.keyring), client, now_fn=lambda: NOW
                ),
                interval=3600.0,
                rng=lambda: 0.0,
            )
        )
        await _until(lambda: attempts() >= 2)
        stop.set()
        await asyncio.wait_for(worker, timeout=30)

    with capture_logs() as logs:
        asyncio.run(scenario())
    failed = [line for line in logs if line["event"] == "delivery_failed"]
    assert len(failed) >= 2
    assert {line["reason"] for line in failed} == {"transport.refused"}
    assert all("connection refused" in line["detail"] for line in failed)
    (row,) = list_outbox(pair.jp.node, state="queued")
    assert row.attempts >= 2
    assert row.last_error is not None
    assert row.last_error in {line["detail"] for line in failed}


# -- one request, one batch ---------------------------------------------------------------


def test_a_batch_answers_each_envelope_as_alone_and_stores_it_in_one_commit(
    pair: Pair, tmp_path: Path
) -> None:
    from gateway.node.inbox import receive_batch  # noqa: PLC0415

    sent = [send(pair.jp) for _ in range(6)]
    paths = [stored_envelope(pair.jp, s.bundle_id) for s in sent]
    earlier = receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), paths[1], now=NOW)
    tampered = tmp_path / "tampered"
    data = bytearray(paths[3].read_bytes())
    data[-1] ^= 0x01
    tampered.write_bytes(bytes(data))
    # Out of order, a replay, the same bytes twice, a flipped bit: one request.
    batch = [paths[5], paths[1], paths[0], tampered, paths[0], paths[2], paths[4]]
    outcomes = receive_batch(NodeContext(pair.pk.node, pair.pk.keyring), batch, now=NOW)
    assert [o.error is None for o in outcomes] == [True, True, True, False, True, True, True]
    assert outcomes[1].receipt == earlier
    assert outcomes[1].replayed
    assert outcomes[4].receipt == outcomes[2].receipt  # the same bytes, one answer
    assert isinstance(outcomes[3].error, VerificationError)
    for outcome, path in zip(outcomes, batch, strict=True):
        if outcome.receipt is not None:
            receipt = parse_receipt(outcome.receipt)
            assert receipt.envelope_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    stored = {r.bundle_id for r in list_inbox(pair.pk.node)}
    assert stored == {s.bundle_id for s in sent} - {sent[3].bundle_id}
    [gaps] = list_gaps(pair.pk.node)
    assert (gaps.highest, list(gaps.missing)) == (6, [(4, 4)])
    assert ledger_kinds(pair.pk).count("bundle-received") == 5
    # The clean envelope the flipped bit stood for is accepted afterwards.
    [late] = receive_batch(NodeContext(pair.pk.node, pair.pk.keyring), [paths[3]], now=NOW)
    assert late.receipt is not None
    [gaps] = list_gaps(pair.pk.node)
    assert list(gaps.missing) == []


def test_two_envelopes_under_one_id_in_one_batch_keep_the_first_and_record_the_other(
    pair: Pair, tmp_path: Path
) -> None:
    from gateway.node.inbox import receive_batch  # noqa: PLC0415

    first = send(pair.jp)
    original = stored_envelope(pair.jp, first.bundle_id)
    # The same bundle id sealed again: a second, validly signed, different envelope.

    other = _equivocating_copy(pair, first, tmp_path / "other")
    outcomes = receive_batch(NodeContext(pair.pk.node, pair.pk.keyring), [original, other], now=NOW)
    assert outcomes[0].receipt is not None
    assert isinstance(outcomes[1].error, EquivocationRefused)
    assert count(pair.pk, InboxEntry) == 1
    assert count(pair.pk, Equivocation) == 1
    assert "equivocation" in ledger_kinds(pair.pk)


def _statements_of(side: Side, paths: Sequence[Path]) -> int:
    """Receive ``paths`` as one batch at ``side``; the SQL statements it sent."""
    from gateway.node.inbox import receive_batch  # noqa: PLC0415

    sent: list[str] = []

    def note(*args: Any) -> None:
        sent.append(str(args[2]))

    engine = side.node.db.engine
    event.listen(engine, "before_cursor_execute", note)
    try:
        outcomes = receive_batch(NodeContext(side.node, side.keyring), paths, now=NOW)
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert all(o.receipt is not None and not o.replayed for o in outcomes)
    return len(sent)


def test_a_batch_is_stored_with_as_many_statements_whatever_its_size(pair: Pair) -> None:
    """Inbox rows, ledger entries and receipts of a batch go in with multi-row writes:
    eight new bundles cost the database no more statements than two."""
    paths = [stored_envelope(pair.jp, send(pair.jp).bundle_id) for _ in range(10)]
    small = _statements_of(pair.pk, paths[:2])
    large = _statements_of(pair.pk, paths[2:])
    assert large == small
    assert count(pair.pk, InboxEntry) == 10
    with pair.pk.node.db.transaction() as session:
        received = [
            e for e in ledger_read.list_entries(session) if str(e.kind) == "bundle-received"
        ]
        report = ledger_verify.verify_ledger(session)
    assert report.ok, report.problem
    assert [e.bundle_id for e in received] == [
        parse_receipt(read).bundle_id for read in _receipts(pair.pk)
    ]


def _receipts(side: Side) -> list[bytes]:
    with side.node.db.transaction() as session:
        return [
            bytes(r) for r in session.scalars(select(InboxEntry.receipt).order_by(InboxEntry.id))
        ]


def test_a_batch_keeps_its_ledger_entries_in_the_order_of_its_envelopes(
    pair: Pair, tmp_path: Path
) -> None:
    """New bundles and equivocation evidence of one batch, appended together, are
    entered in the order the envelopes came, and the chain verifies."""
    from gateway.node.inbox import receive_batch  # noqa: PLC0415

    first = send(pair.jp)
    receive_envelope(
        NodeContext(pair.pk.node, pair.pk.keyring), stored_envelope(pair.jp, first.bundle_id),
        now=NOW,
    )  # fmt: skip
    other = _equivocating_copy(pair, first, tmp_path / "other")
    before, after = send(pair.jp), send(pair.jp)
    batch = [
        stored_envelope(pair.jp, before.bundle_id),
        other,
        stored_envelope(pair.jp, after.bundle_id),
    ]
    outcomes = receive_batch(NodeContext(pair.pk.node, pair.pk.keyring), batch, now=NOW)
    assert isinstance(outcomes[1].error, EquivocationRefused)
    with pair.pk.node.db.transaction() as session:
        entries = ledger_read.list_entries(session)[-3:]
        report = ledger_verify.verify_ledger(session)
    assert report.ok, report.problem
    assert [(str(e.kind), e.bundle_id) for e in entries] == [
        ("bundle-received", before.bundle_id),
        ("equivocation", first.bundle_id),
        ("bundle-received", after.bundle_id),
    ]


def _first_draw(first: bytes) -> Callable[[int], bytes]:
    """Randomness whose first draw (the bundle id) is ``first``; fresh bytes after."""
    drawn: list[bytes] = []

    def draw(size: int) -> bytes:
        if not drawn:
            drawn.append(first)
            assert size == len(first)
            return first
        return os.urandom(size)

    return draw


def _equivocating_copy(pair: Pair, first: Any, out: Path) -> Path:
    """A second, validly signed envelope under ``first``'s bundle id and sequence."""
    from gateway.node.policy import load_policy  # noqa: PLC0415

    with out.open("wb") as handle:
        seal(
            handle,
            case_type="exam-fraud",
            case=example("exam-fraud"),
            keyring=pair.jp.keyring,
            peer_manifest=pair.pk.keyring.manifest,
            policy=load_policy(pair.jp.node.settings),
            sequence=first.sequence,
            now=NOW,
            random=_first_draw(uuid.UUID(first.bundle_id).bytes),
        )
    return out


def test_a_batch_verified_while_an_earlier_one_commits_is_decided_by_the_commit_order(
    pair: Pair, tmp_path: Path
) -> None:
    """The server verifies a request while the one before it commits: a bundle both
    carry is answered as a replay of the first, and a different envelope under an id the
    first stores is equivocation, exactly as if the second had come after the first."""
    from gateway.node.inbox import commit_batch, prepare_batch  # noqa: PLC0415

    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    sent = [send(pair.jp) for _ in range(3)]
    paths = [stored_envelope(pair.jp, s.bundle_id) for s in sent]
    other = _equivocating_copy(pair, sent[0], tmp_path / "other")
    earlier = prepare_batch(ctx, [paths[0], paths[1]], now=NOW)
    later = prepare_batch(ctx, [paths[1], other, paths[2]], now=NOW)
    assert count(pair.pk, InboxEntry) == 0  # prepared batches record nothing
    first = commit_batch(ctx, earlier, now=NOW)
    second = commit_batch(ctx, later, now=NOW)
    assert all(o.receipt is not None and not o.replayed for o in first)
    assert second[0].replayed
    assert second[0].receipt == first[1].receipt
    assert isinstance(second[1].error, EquivocationRefused)
    assert second[2].receipt is not None
    assert not second[2].replayed
    assert {r.bundle_id for r in list_inbox(pair.pk.node)} == {s.bundle_id for s in sent}
    assert count(pair.pk, Equivocation) == 1
    assert ledger_kinds(pair.pk).count("bundle-received") == 3
    with pair.pk.node.db.transaction() as session:
        report = ledger_verify.verify_ledger(session)
    assert report.ok, report.problem


@pytest.mark.parametrize("inline_max", [0, 64 * 1024])
def test_envelopes_the_spool_kept_in_memory_are_received_as_files_are(
    pair: Pair, tmp_path: Path, inline_max: int
) -> None:
    """A request's small envelopes reach the batch as bytes, with no spool file: kept in
    their rows when small enough, else written out and stored as files; equivocation
    evidence is always a file of the store."""
    from gateway.node.inbox import SpooledEnvelope, receive_batch  # noqa: PLC0415

    database = pair.pk.node.settings.database.model_copy(
        update={"inline_envelope_max_bytes": inline_max}
    )
    pair.pk.node.settings = pair.pk.node.settings.model_copy(update={"database": database})
    first = send(pair.jp)
    receive_envelope(
        NodeContext(pair.pk.node, pair.pk.keyring), stored_envelope(pair.jp, first.bundle_id),
        now=NOW,
    )  # fmt: skip
    sent = [send(pair.jp) for _ in range(3)]
    sources = [stored_envelope(pair.jp, s.bundle_id) for s in sent]
    sources.append(_equivocating_copy(pair, first, tmp_path / "other"))
    spool = tmp_path / "spool"
    spool.mkdir()
    batch = []
    for index, source in enumerate(sources):
        body = source.read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        batch.append(SpooledEnvelope(spool / f"e{index}", digest, len(body), body=body))
    outcomes = receive_batch(NodeContext(pair.pk.node, pair.pk.keyring), batch, now=NOW)
    assert [o.receipt is not None for o in outcomes] == [True, True, True, False]
    assert isinstance(outcomes[3].error, EquivocationRefused)
    blob_dir = pair.pk.node.settings.blob_dir
    for item in batch[:3]:
        assert item.sha256 is not None
        assert envelope_path(blob_dir, item.sha256).exists() == (inline_max == 0)
        [entry] = [r for r in list_inbox(pair.pk.node) if r.envelope_sha256 == item.sha256]
        read = read_bundle(
            NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, entry.bundle_id,
            out_dir=None, now=NOW,
        )  # fmt: skip
        assert read.case == validate_case("exam-fraud", example("exam-fraud")).model_dump(
            mode="json"
        )
    assert batch[3].sha256 is not None
    evidence = envelope_path(blob_dir, batch[3].sha256)
    assert evidence.read_bytes() == sources[3].read_bytes()
    with pytest.raises(ValueError, match="SHA-256 and size"):
        receive_batch(
            NodeContext(pair.pk.node, pair.pk.keyring),
            [SpooledEnvelope(spool / "x", None, 3, body=b"abc")],
            now=NOW,
        )


def test_a_prepared_batch_that_waited_too_long_is_verified_again(pair: Pair) -> None:
    """A batch verified more than a minute before its turn to commit is not stored
    on that verification: the sender is told to send it again."""
    from gateway.node.inbox import (  # noqa: PLC0415
        PREPARED_BATCH_MAX_AGE,
        BatchOutdated,
        commit_batch,
        prepare_batch,
    )

    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    path = stored_envelope(pair.jp, send(pair.jp).bundle_id)
    late = prepare_batch(ctx, [path], now=NOW)
    with pytest.raises(BatchOutdated):
        commit_batch(ctx, late, now=NOW + PREPARED_BATCH_MAX_AGE + timedelta(seconds=1))
    assert count(pair.pk, InboxEntry) == 0
    [outcome] = commit_batch(ctx, prepare_batch(ctx, [path], now=NOW), now=NOW)
    assert outcome.receipt is not None
    assert count(pair.pk, InboxEntry) == 1


def test_an_answered_batch_is_stored_even_when_the_next_cannot_be_taken(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next batch is taken before an answer's receipts are stored; if taking it
    fails, the answered batch is still stored as delivered (not charged an attempt)."""
    import gateway.node.outbox as outbox_module  # noqa: PLC0415

    sent = [send(pair.jp) for _ in range(4)]
    original = outbox_module._next_batch
    taken: list[int] = []

    def failing_second(node: Node, **kw: Any) -> Any:
        taken.append(1)
        if len(taken) == 2:
            raise StorageError("database is locked")
        return original(node, **kw)

    monkeypatch.setattr(outbox_module, "_next_batch", failing_second)
    with pytest.raises(StorageError):
        asyncio.run(
            deliver_pending(
                pair.jp.node,
                DirectClient(pair.pk),
                peer_manifest=lambda node: pair.pk.keyring.manifest,
                pending_manifests=lambda node: [],
                mark_manifest_delivered=lambda node, handle, now: None,
                now_fn=lambda: NOW,
                batch_size=2,
                pipeline=1,
            )
        )
    rows = {r.bundle_id: r for r in list_outbox(pair.jp.node)}
    assert [rows[s.bundle_id].state for s in sent] == ["delivered", "delivered", "queued", "queued"]
    assert [rows[s.bundle_id].attempts for s in sent[2:]] == [1, 1]
