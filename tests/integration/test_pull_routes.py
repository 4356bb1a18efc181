"""The host's pull routes over a real socket, against a real puller in this process.

jp hosts (``peer_delivery = "hold"``) and serves its real peer application
on loopback; pk pulls with :func:`gateway.peer.puller.pull_once`. Both nodes
run on the engine under test (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from sqlalchemy import select
from structlog.testing import capture_logs

from gateway.core.keys import parse_manifest
from gateway.core.pull import MAX_ANSWER_MANIFESTS, ItemKind
from gateway.core.receipt import parse_receipt, verify_receipt
from gateway.node import own_keys
from gateway.node.context import NodeContext
from gateway.node.housekeeping import checkpoint_once
from gateway.node.inbox import PREPARED_BATCH_MAX_AGE
from gateway.node.outbox import send_case
from gateway.node.own_keys import own_manifest, unlock_keyring
from gateway.node.peer_trust import pin_peer, pinned_peer_manifest
from gateway.node.runtime import Node
from gateway.node.setup import init_node
from gateway.node.verify_pool import VerifyPool
from gateway.peer import client as peer_client
from gateway.peer.client import PeerClient, PeerRefused, PulledItem
from gateway.peer.pull_routes import PULL_PATH, RECEIPTS_PATH, add_pull_routes
from gateway.peer.puller import PullReport, _take, pull_once, run_puller
from gateway.peer.server import create_node_peer_app
from gateway.settings import Settings, load_settings
from gateway.store.models_exchange import InboxEntry, OutboxEntry, envelope_path
from tests.exchange_pair import PASSPHRASE, example, second_url
from tests.integration.test_peer_ping import ADMIN, Side
from tests.nodes import TEST_LIMITS, ServerThread


def _open(
    root: Path, node_id: str, url: str, env: dict[str, str], now: datetime, **server: Any
) -> Side:
    init_node(root / node_id, node_id, now=now, db_url=url, environ=env)
    path = root / node_id / "gateway.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault("server", {}).update(server)
    path.write_text(tomli_w.dumps(data))
    node = Node.open(load_settings(root / node_id, environ=env))
    with node.db.transaction() as session:
        keyring = unlock_keyring(node.settings, PASSPHRASE.encode(), session, now=now)
    return Side(node, keyring)


def _pin(at: Side, of: Side, now: datetime) -> None:
    with of.node.db.transaction() as session:
        manifest = own_manifest(session)
    with at.node.db.transaction() as session:
        pin_peer(
            session,
            manifest.raw,
            node=of.node.node_id,
            expected_fingerprint=manifest.root_fingerprint,
            now=now,
            actor=ADMIN,
        )


@pytest.fixture
def make_pair(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
) -> Iterator[Callable[..., tuple[Side, Side]]]:
    """jp (the host, holding unless told) and pk (the puller), pinned to each other."""
    env = {**clean_environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    opened: list[Side] = []

    def make(*, delivery: str = "hold") -> tuple[Side, Side]:
        now = datetime.now(UTC)
        jp = _open(tmp_path, "jp", database_url, env, now, peer_delivery=delivery)
        pk_url = second_url(tmp_path, database_url, pg_database_factory)
        pk = _open(
            tmp_path, "pk", pk_url, env, now, peer_mode="pull", peer_url="http://127.0.0.1:9"
        )
        opened.extend([jp, pk])
        _pin(jp, pk, now)
        _pin(pk, jp, now)
        return jp, pk

    yield make
    for side in opened:
        side.node.close()


def _serve(jp: Side) -> ServerThread:
    return ServerThread(
        create_node_peer_app(
            NodeContext(jp.node, jp.keyring), TEST_LIMITS, extra_routes=add_pull_routes
        ),
        TEST_LIMITS,
    )


def _toward(side: Side, url: str) -> Settings:
    settings = side.node.settings
    return settings.model_copy(
        update={
            "server": settings.server.model_copy(update={"peer_url": url, "peer_delivery": "push"})
        }
    )


def _pull(pk: Side, url: str, *, wait: float = 0.0) -> PullReport:
    async def run() -> PullReport:
        async with PeerClient(_toward(pk, url), pk.keyring) as client:
            return await pull_once(NodeContext(pk.node, pk.keyring), client, wait=wait)

    return asyncio.run(run())


def _answer(pk: Side, url: str, spool: Path, *, max_items: int = 8) -> list[PulledItem]:
    """One pull answer read into ``spool`` (small envelopes in memory), not taken: no
    receipts are posted."""

    spool.mkdir()

    async def run() -> list[PulledItem]:
        async with PeerClient(_toward(pk, url), pk.keyring) as client:
            ask = {"wait_seconds": 0, "max_envelopes": 4, "max_bytes": 1 << 20}
            return await client.pull(
                PULL_PATH, ask, spool, max_items=max_items, max_envelope_bytes=1 << 20,
                max_small_bytes=1 << 20,
            )  # fmt: skip

    return asyncio.run(run())


def _take_answer(
    pk: Side,
    items: list[PulledItem],
    now_fn: Callable[[], datetime] = lambda: datetime.now(UTC),
    verify_pool: VerifyPool | None = None,
) -> PullReport:
    """``items`` stored as the puller stores an answer (:func:`_take`)."""
    report = PullReport()
    _take(NodeContext(pk.node, pk.keyring), items, report, now_fn=now_fn, verify_pool=verify_pool)
    return report


def _send(jp: Side, count: int) -> list[str]:
    return [
        send_case(
            NodeContext(jp.node, jp.keyring), ADMIN, "exam-fraud", example("exam-fraud"), [],
            public=False, reply_to=None, now=datetime.now(UTC),
        ).bundle_id
        for _ in range(count)
    ]  # fmt: skip


def _outbox(jp: Side) -> dict[str, OutboxEntry]:
    with jp.node.db.transaction() as session:
        return {row.bundle_id: row for row in session.scalars(select(OutboxEntry))}


def _inbox(pk: Side) -> dict[str, bytes]:
    with pk.node.db.transaction() as session:
        return {row.bundle_id: row.receipt for row in session.scalars(select(InboxEntry))}


def _rotate(side: Side, *, roots: int = 0, keys: int = 0) -> Side:
    """``side`` after ``roots`` root rotations, then ``keys`` rotations of its operational
    keys: one manifest each, all waiting for the peer. The returned side holds the
    keyring of the newest manifest, whose signing key no earlier manifest lists.

    A root rotation lists no new key. An operational one lists two more, and the
    manifest's list is bounded (``MAX_KEYS``, less the places a routine rotation leaves
    free), so a node can make only 30 of them at one time."""
    now = datetime.now(UTC)
    settings = side.node.settings
    for change in [own_keys.rotate_root] * roots + [own_keys.rotate_keys] * keys:
        with side.node.db.transaction() as session:
            change(settings, session, PASSPHRASE.encode(), now=now, actor=ADMIN)
    with side.node.db.transaction() as session:
        keyring = unlock_keyring(settings, PASSPHRASE.encode(), session, now=now)
    return Side(side.node, keyring)


def _pending_versions(jp: Side) -> list[int]:
    """The versions of the host's manifests its peer has not acknowledged, oldest first."""
    with jp.node.db.transaction() as session:
        return [parse_manifest(raw).version for _id, raw in own_keys.pending_manifests(session)]


def _pinned_version(pk: Side) -> int:
    with pk.node.db.transaction() as session:
        pinned = pinned_peer_manifest(session)
    assert pinned is not None
    return pinned.version


def _timed_pull(pk: Side, url: str, *, wait: float) -> tuple[PullReport, float]:
    """:func:`_pull` and how many seconds it took."""
    started = time.monotonic()
    report = _pull(pk, url, wait=wait)
    return report, time.monotonic() - started


def test_a_pull_hands_out_a_batch_in_order_and_a_verified_receipt_delivers_it(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair()
    sent = _send(jp, 6)  # the host's policy in TEST_LIMITS: 4 envelopes per batch
    with _serve(jp) as running:
        first = _pull(pk, running.url)
        assert len(first.accepted) == 4
        assert first.delivered_at_host == 4
        second = _pull(pk, running.url)
        assert len(second.accepted) == 2
        assert _pull(pk, running.url).items == 0  # nothing left: an empty answer
    rows = _outbox(jp)
    received = _inbox(pk)
    with pk.node.db.transaction() as session:
        sequences = [row.sequence for row in session.scalars(select(InboxEntry))]
    assert sorted(sequences) == sequences  # the channel's order
    with jp.node.db.transaction() as session:
        peer = pinned_peer_manifest(session)
    assert peer is not None
    for bundle_id in sent:
        row = rows[bundle_id]
        assert row.state == "delivered"
        assert row.receipt == received[bundle_id]
        verify_receipt(
            row.receipt,
            peer_manifest=peer,
            expected_bundle_id=bundle_id,
            expected_envelope_hash=row.envelope_sha256,
            expected_sender="jp",
        )


def test_a_lost_receipt_means_the_same_envelope_again_and_the_identical_receipt(
    make_pair: Callable[..., tuple[Side, Side]], tmp_path: Path
) -> None:
    jp, pk = make_pair()
    [bundle_id] = _send(jp, 1)
    with _serve(jp) as running:
        # The answer arrives and is stored, but the receipts never reach the host.
        _take_answer(pk, _answer(pk, running.url, tmp_path / "spool"))
        stored = _inbox(pk)[bundle_id]
        assert _outbox(jp)[bundle_id].state == "queued"
        again = _pull(pk, running.url)
    assert len(again.accepted) == 1
    assert _inbox(pk) == {bundle_id: stored}  # nothing stored twice
    assert _outbox(jp)[bundle_id].receipt == stored  # the identical receipt bytes


def test_only_the_pinned_peer_can_pull(make_pair: Callable[..., tuple[Side, Side]]) -> None:
    jp, _pk = make_pair()
    _send(jp, 1)
    with _serve(jp) as running:

        async def as_jp_itself() -> None:
            async with PeerClient(_toward(jp, running.url), jp.keyring) as client:
                await client.request("POST", PULL_PATH, b"{}")

        with pytest.raises(PeerRefused) as refused:
            asyncio.run(as_jp_itself())
        assert refused.value.status == 401

        async def unsigned() -> int:
            async with (
                aiohttp.ClientSession() as session,
                session.post(running.url + PULL_PATH, data=b"{}") as answer,
            ):
                return answer.status

        assert asyncio.run(unsigned()) == 401
    assert {row.state for row in _outbox(jp).values()} == {"queued"}


def test_a_host_that_pushes_refuses_pulls_naming_the_setting(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair(delivery="push")
    _send(jp, 1)
    with _serve(jp) as running, pytest.raises(PeerRefused) as refused:
        _pull(pk, running.url)
    assert refused.value.status == 409
    assert refused.value.reason == "config.peer-mode"
    assert {row.state for row in _outbox(jp).values()} == {"queued"}


def test_an_idle_pull_waits_and_wakes_when_a_bundle_is_queued(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair()
    with _serve(jp) as running:

        async def run() -> tuple[PullReport, float]:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with PeerClient(_toward(pk, running.url), pk.keyring) as client:
                pulling = asyncio.ensure_future(
                    pull_once(NodeContext(pk.node, pk.keyring), client, wait=20.0)
                )
                await asyncio.sleep(0.5)
                assert not pulling.done()  # nothing to hand out: it waits
                await asyncio.to_thread(_send, jp, 1)
                report = await pulling
            return report, loop.time() - started

        report, elapsed = asyncio.run(run())
    assert len(report.accepted) == 1
    assert elapsed < 15  # woken by the queued bundle, long before the 20 s wait ended


def test_sync_on_a_host_that_holds_refuses_and_posts_nothing(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    from click.testing import CliRunner  # noqa: PLC0415

    from gateway.cli.main import cli  # noqa: PLC0415

    jp, _pk = make_pair()
    _send(jp, 1)
    env = {"GATEWAY_HOME": str(jp.node.settings.home), "GATEWAY_PASSPHRASE": PASSPHRASE}
    done = CliRunner().invoke(cli, ["sync"], env=env)
    assert done.exit_code == 1
    assert 'peer_delivery = "hold"' in done.stderr
    assert {row.state for row in _outbox(jp).values()} == {"queued"}
    assert {row.attempts for row in _outbox(jp).values()} == {0}


def test_a_host_that_holds_makes_no_client_toward_its_peer(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    from gateway.errors import ConfigError  # noqa: PLC0415

    jp, _pk = make_pair()
    settings = jp.node.settings
    toward = settings.model_copy(
        update={"server": settings.server.model_copy(update={"peer_url": "http://127.0.0.1:9"})}
    )
    with pytest.raises(ConfigError, match='peer_delivery = "hold"'):
        PeerClient(toward, jp.keyring)
    assert PeerClient(toward, jp.keyring, link_test=True).base_url == "http://127.0.0.1:9"


def test_the_envelopes_of_one_answer_are_recorded_as_one_batch(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    # Taken as the peer server takes a pushed batch: verified, then one transaction
    # dated once, so every receipt of the answer bears the same time.
    jp, pk = make_pair()
    sent = _send(jp, 4)
    with _serve(jp) as running:
        report = _pull(pk, running.url)
    assert len(report.accepted) == 4
    received = _inbox(pk)
    assert len({parse_receipt(received[bundle_id]).received_at for bundle_id in sent}) == 1


def test_a_refused_envelope_of_a_pulled_batch_refuses_only_itself(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair()
    sent = _send(jp, 3)
    damaged = _outbox(jp)[sent[1]]
    path = envelope_path(jp.node.settings.blob_dir, damaged.envelope_sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of its ciphertext flipped, as a faulty disk would
    path.write_bytes(bytes(data))
    with _serve(jp) as running:
        report = _pull(pk, running.url)
    assert len(report.accepted) == 2
    # Refused under the hash of the bytes that came (the host knows no such envelope,
    # so its row stays queued), and nothing of it stored.
    assert report.refused == {hashlib.sha256(data).hexdigest(): "envelope.ciphertext-hash"}
    assert set(_inbox(pk)) == {sent[0], sent[2]}
    rows = _outbox(jp)
    assert [rows[b].state for b in sent] == ["delivered", "queued", "delivered"]


@pytest.mark.parametrize("in_memory", [4, 1, 0])
def test_pulled_envelopes_are_hashed_as_read_and_kept_in_memory_within_the_bound(
    make_pair: Callable[..., tuple[Side, Side]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_memory: int,
) -> None:
    # The first ``in_memory`` envelopes of the answer fit the memory bound; the
    # others are spooled to files. Either way each arrives with its hash and is stored.
    jp, pk = make_pair()
    sent = _send(jp, 4)
    rows = _outbox(jp)
    sizes = [rows[bundle_id].envelope_size for bundle_id in sent]
    monkeypatch.setattr(peer_client, "MEMORY_PER_REQUEST_BYTES", sum(sizes[:in_memory]))
    with _serve(jp) as running:
        items = _answer(pk, running.url, tmp_path / "spool")
        shapes = [
            (item.data is not None, item.path is not None and item.path.exists()) for item in items
        ]
        assert shapes == [(True, False)] * in_memory + [(False, True)] * (4 - in_memory)
        report = _take_answer(pk, items)
    hashes = [rows[bundle_id].envelope_sha256 for bundle_id in sent]
    assert [item.sha256 for item in items] == hashes
    assert [item.size for item in items] == sizes
    assert report.accepted == hashes
    assert set(_inbox(pk)) == set(sent)


def test_a_run_is_verified_and_recorded_at_one_time_however_long_it_takes(
    make_pair: Callable[..., tuple[Side, Side]], tmp_path: Path
) -> None:
    # A clock that moves past the age a verified batch may wait for its turn at
    # every reading: a run read it twice would be refused as outdated, every try.
    jp, pk = make_pair()
    _send(jp, 2)
    start = datetime.now(UTC)
    readings = itertools.count()

    def slow_clock() -> datetime:
        return start + next(readings) * (PREPARED_BATCH_MAX_AGE + timedelta(seconds=1))

    with _serve(jp) as running:
        report = _take_answer(pk, _answer(pk, running.url, tmp_path / "spool"), slow_clock)
    assert report.refused == {}
    assert len(report.accepted) == 2


def test_a_large_answer_is_checked_in_the_serving_nodes_verification_pool(
    make_pair: Callable[..., tuple[Side, Side]], tmp_path: Path
) -> None:
    # As the peer server checks a large pushed batch: here "large" is two envelopes.
    jp, pk = make_pair()
    sent = _send(jp, 4)
    pool = VerifyPool(workers=1, min_envelopes=2)
    try:
        with _serve(jp) as running:
            items = _answer(pk, running.url, tmp_path / "spool")
            report = _take_answer(pk, items, verify_pool=pool)
        assert len(pool.worker_pids()) == 1  # its process starts at the first batch it checks
    finally:
        pool.shutdown()
    assert len(report.accepted) == 4
    assert set(_inbox(pk)) == set(sent)


def test_a_host_with_more_manifests_than_an_answer_carries_hands_out_the_oldest_alone(
    make_pair: Callable[..., tuple[Side, Side]], tmp_path: Path
) -> None:
    # 65 key changes while the peer was away: versions 2 to 66 wait. The envelopes
    # and the checkpoint are signed with the key only version 66 lists.
    jp, pk = make_pair()
    jp = _rotate(jp, roots=MAX_ANSWER_MANIFESTS + 1 - 30, keys=30)
    assert _pending_versions(jp) == list(range(2, MAX_ANSWER_MANIFESTS + 3))
    sent = _send(jp, 3)
    checkpoint = checkpoint_once(NodeContext(jp.node, jp.keyring), now=datetime.now(UTC))
    assert checkpoint is not None
    with _serve(jp) as running:
        items = _answer(pk, running.url, tmp_path / "spool", max_items=MAX_ANSWER_MANIFESTS + 5)
        assert [item.kind for item in items] == [ItemKind.MANIFEST] * MAX_ANSWER_MANIFESTS
        versions = [parse_manifest(item.data or b"").version for item in items]
        assert versions == list(range(2, MAX_ANSWER_MANIFESTS + 2))  # the oldest, in order
        # Answered at once: an answer that cannot carry every manifest is not held
        # for the wait, though it hands out no envelope.
        first, elapsed = _timed_pull(pk, running.url, wait=20.0)
        assert elapsed < 10
        assert (first.manifests, first.accepted, first.refused) == (MAX_ANSWER_MANIFESTS, [], {})
        assert first.checkpoint is None
        assert _pinned_version(pk) == MAX_ANSWER_MANIFESTS + 1
        assert _pending_versions(jp) == [MAX_ANSWER_MANIFESTS + 2]
        assert {row.state for row in _outbox(jp).values()} == {"queued"}
        second = _pull(pk, running.url)
        assert second.manifests == 1
        assert len(second.accepted) == 3
        assert second.refused == {}
        assert second.delivered_at_host == 3
        assert second.checkpoint == checkpoint.checkpoint.size
        assert _pull(pk, running.url).items == 0
    assert _pinned_version(pk) == MAX_ANSWER_MANIFESTS + 2
    assert _pending_versions(jp) == []
    rows = _outbox(jp)
    received = _inbox(pk)
    with pk.node.db.transaction() as session:
        assert len(session.scalars(select(InboxEntry)).all()) == len(sent)  # each once
    assert set(received) == set(sent)
    for bundle_id in sent:
        assert rows[bundle_id].state == "delivered"
        assert rows[bundle_id].receipt == received[bundle_id]


@pytest.mark.parametrize(
    ("roots", "keys"),
    [(0, 3), (MAX_ANSWER_MANIFESTS - 30, 30)],
    ids=["a few manifests", "as many manifests as an answer carries"],
)
def test_manifests_an_answer_can_carry_go_out_with_the_envelopes_behind_them(
    make_pair: Callable[..., tuple[Side, Side]], tmp_path: Path, roots: int, keys: int
) -> None:
    jp, pk = make_pair()
    jp = _rotate(jp, roots=roots, keys=keys)
    waiting = roots + keys
    sent = _send(jp, 2)  # signed with the key only the newest manifest lists
    with _serve(jp) as running:
        items = _answer(pk, running.url, tmp_path / "spool", max_items=waiting + 5)
        kinds = [item.kind for item in items]
        assert kinds[: waiting + 2] == [ItemKind.MANIFEST] * waiting + [ItemKind.ENVELOPE] * 2
        assert set(kinds[waiting + 2 :]) <= {ItemKind.CHECKPOINT}
        report = _pull(pk, running.url)
    assert report.manifests == waiting
    assert len(report.accepted) == 2
    assert report.delivered_at_host == 2
    assert _pinned_version(pk) == waiting + 1
    assert _pending_versions(jp) == []
    assert set(_inbox(pk)) == set(sent)
    assert {row.state for row in _outbox(jp).values()} == {"delivered"}


def test_manifests_alone_under_the_bound_still_wait_out_the_long_poll(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    # Only envelopes, or more manifests than one answer carries, end the wait early:
    # an idle pair exchanges one answer per wait.
    jp, pk = make_pair()
    jp = _rotate(jp, keys=1)
    with _serve(jp) as running:
        report, elapsed = _timed_pull(pk, running.url, wait=1.0)
    assert elapsed >= 1.0
    assert report.manifests == 1
    assert _pinned_version(pk) == 2
    assert _pending_versions(jp) == []


def test_a_receipts_post_acknowledges_at_most_the_manifests_of_one_answer(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair()
    jp = _rotate(jp, keys=2)
    with jp.node.db.transaction() as session:
        [(_id, oldest), _newest] = own_keys.pending_manifests(session)
    digest = hashlib.sha256(oldest).hexdigest()
    others = [hashlib.sha256(b"%d" % n).hexdigest() for n in range(MAX_ANSWER_MANIFESTS)]
    with _serve(jp) as running:

        async def post(manifests: list[str]) -> Any:
            async with PeerClient(_toward(pk, running.url), pk.keyring) as client:
                return await client.request_json(
                    "POST", RECEIPTS_PATH, {"results": [], "manifests": manifests}
                )

        with pytest.raises(PeerRefused) as refused:
            asyncio.run(post([digest, *others]))
        assert refused.value.status in (400, 422)
        assert _pending_versions(jp) == [2, 3]  # nothing of a refused post is taken
        answer = asyncio.run(post([*others[1:], digest]))
    assert answer["manifests"] == 1
    assert _pending_versions(jp) == [3]


def test_a_puller_that_cannot_pin_any_manifest_of_an_at_once_answer_waits_before_pulling_again(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    # More manifests wait than one answer carries, so the host answers at once with the
    # oldest of them alone. A puller whose clock is a day behind finds each issued in
    # the future and pins none: the pass moved nothing, and pulling again at once would
    # fetch the same answer in a tight loop. The puller backs off instead.
    jp, pk = make_pair()
    jp = _rotate(jp, roots=MAX_ANSWER_MANIFESTS + 1 - 30, keys=30)
    waiting = _pending_versions(jp)

    def behind() -> datetime:
        return datetime.now(UTC) - timedelta(days=1)

    ctx = NodeContext(pk.node, pk.keyring)
    with _serve(jp) as running:

        async def one_pass() -> PullReport:
            async with PeerClient(_toward(pk, running.url), pk.keyring) as client:
                return await pull_once(ctx, client, wait=20.0, now_fn=behind)

        report = asyncio.run(one_pass())
        assert (report.manifests, report.manifests_refused) == (0, MAX_ANSWER_MANIFESTS)
        assert report.answered_at_once
        assert report.stalled

        starts: list[float] = []

        @asynccontextmanager
        async def counted() -> AsyncIterator[PeerClient]:
            starts.append(time.monotonic())
            async with PeerClient(_toward(pk, running.url), pk.keyring) as client:
                yield client

        async def until_two_failures() -> list[dict[str, Any]]:
            stop = asyncio.Event()
            with capture_logs() as logs:
                worker = asyncio.create_task(
                    run_puller(ctx, counted, stop, now_fn=behind, rng=lambda: 0.5)
                )
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    failed = [line for line in logs if line["event"] == "delivery_failed"]
                    if len(failed) >= 2:
                        break
                    await asyncio.sleep(0.05)
                stop.set()
                await asyncio.wait_for(worker, timeout=60)
            return [line for line in logs if line["event"] == "delivery_failed"]

        failed = asyncio.run(until_two_failures())
    # Without the back-off the worker pulls again 10 ms after each answer and logs no
    # failure. With it, each stalled pass is a failure that names its reason, and the
    # next pass starts only after a wait that grows (1 s, then 2 s, at half jitter
    # 0.75 s, then 1.5 s).
    assert len(failed) >= 2
    assert {line["reason"] for line in failed} == {"pull.manifests-refused"}
    assert [line["retry_in"] for line in failed[:2]] == [0.75, 1.5]
    assert starts[1] - starts[0] >= 0.75
    assert _pending_versions(jp) == waiting
    assert _pinned_version(pk) == 1
    # Only an at-once answer stalls, and only when nothing of it moved.
    assert PullReport(manifests_refused=64, answered_at_once=True).stalled
    assert not PullReport(manifests=1, manifests_refused=63, answered_at_once=True).stalled
    assert not PullReport(manifests_refused=1).stalled  # given after the long poll
    assert not PullReport().stalled


@pytest.mark.parametrize(
    "field",
    ["manifests", "envelope_sha256"],
)
def test_a_receipts_post_with_a_hash_that_is_not_hex_is_refused_as_bad_input(
    make_pair: Callable[..., tuple[Side, Side]], field: str
) -> None:
    # 64 characters, not hex: some not even ASCII (which hmac.compare_digest refuses
    # with a TypeError, an internal error, had the check been on length alone).
    jp, pk = make_pair()
    jp = _rotate(jp, keys=1)
    bad = "\u00e9" * 64
    if field == "manifests":
        body: dict[str, Any] = {"results": [], "manifests": [bad]}
    else:
        body = {
            "results": [{"envelope_sha256": bad, "status": "refused", "reason": "x"}],
            "manifests": [],
        }
    with _serve(jp) as running:

        async def post() -> Any:
            async with PeerClient(_toward(pk, running.url), pk.keyring) as client:
                return await client.request_json("POST", RECEIPTS_PATH, body)

        with pytest.raises(PeerRefused) as refused:
            asyncio.run(post())
        assert refused.value.status in (400, 422)
        # "g" is ASCII but not hex: refused the same way.
        body = {"results": [], "manifests": ["g" * 64]}
        with pytest.raises(PeerRefused) as refused:
            asyncio.run(post())
        assert refused.value.status in (400, 422)
    assert _pending_versions(jp) == [2]


def test_a_refusal_reason_is_kept_only_as_a_reason_code(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    # The reason of a refused result becomes the bundle's last error: a lone surrogate
    # (valid JSON, refused by the database's text encoding) or free text is not kept.
    jp, pk = make_pair()
    [bundle_id] = _send(jp, 1)
    sha = _outbox(jp)[bundle_id].envelope_sha256
    with _serve(jp) as running:

        async def post(reason: str) -> Any:
            async with PeerClient(_toward(pk, running.url), pk.keyring) as client:
                return await client.request_json(
                    "POST",
                    RECEIPTS_PATH,
                    {"results": [{"envelope_sha256": sha, "status": "refused", "reason": reason}]},
                )

        asyncio.run(post("\ud800 not a code"))
        first = _outbox(jp)[bundle_id]
        asyncio.run(post("envelope.signature"))
        second = _outbox(jp)[bundle_id]
    assert first.state == second.state == "queued"
    assert first.last_error is not None
    assert "\ud800" not in first.last_error
    assert "not a code" not in first.last_error
    assert second.last_error is not None
    assert "envelope.signature" in second.last_error
