"""The consent protocol and disclosure over real services and databases (both engines).

Two real nodes (jp, pk), each with its own database, keys and pinned peer.
Bundles travel the way the peer server moves them: the sender's stored
envelope is handed to the receiver's ``receive_envelope``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from gateway.cli.main import cli
from gateway.core.canonical import canonical_bytes
from gateway.core.consent import ConsentGrant, sign_grant
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor, Role
from gateway.errors import ConsentRefused, InvalidInput, NotFound, PolicyRefused, StorageError
from gateway.node import own_keys, peer_trust
from gateway.node.consent import common as consent_common
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent import queries as consent_queries
from gateway.node.consent import receive as consent_receive
from gateway.node.context import NodeContext
from gateway.node.inbox import receive_envelope
from gateway.node.ledger import read as ledger_read
from gateway.node.outbox import send_case, send_protocol_bundle
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.node.users import add_user
from gateway.peer.server import node_services
from gateway.store.models_consent import ConsentGrantRecord, DisclosureRecord
from gateway.store.models_exchange import OutboxEntry, envelope_path
from tests.node_api import serve_node
from tests.nodes import open_pinned_pair
from tests.policies import set_approvals

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
PASSPHRASE = "correct horse battery staple"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
JP_OFFICER = Actor(name="tanaka", role=Role.OFFICER)
PK_OFFICER = Actor(name="bilal", role=Role.OFFICER)
EMBASSY = "Embassy of Example"
PURPOSE = "visa screening of the broker's workers"


@dataclass
class Side:
    node: Node
    keyring: NodeKeyring
    officer: Actor


@dataclass
class Pair:
    jp: Side
    pk: Side


@pytest.fixture
def clock(request: pytest.FixtureRequest) -> datetime:
    """The time the nodes are made at: NOW, or the real time for tests of the CLI."""
    chosen = getattr(request, "param", NOW)
    return utc_now() if chosen is None else chosen


@pytest.fixture
def pair(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
    clock: datetime,
) -> Iterator[Pair]:
    env = {**clean_environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    second = (
        f"sqlite:///{tmp_path / 'pk.sqlite3'}"
        if database_url.startswith("sqlite")
        else pg_database_factory()
    )
    urls = {"jp": database_url, "pk": second}
    nodes = open_pinned_pair(tmp_path, urls, env, now=clock)
    keyrings = {}
    for node_id, node in nodes.items():
        # These tests are about the consent protocol: one officer grants (k = 1);
        # tests/integration/test_approvals.py sets the two-person rule it tests.
        set_approvals(node.settings.policy_dir, "consent-grant", 1)
        with node.db.transaction() as session:
            keyrings[node_id] = unlock_keyring(
                node.settings, PASSPHRASE.encode(), session, now=clock
            )
    yield Pair(
        jp=Side(nodes["jp"], keyrings["jp"], JP_OFFICER),
        pk=Side(nodes["pk"], keyrings["pk"], PK_OFFICER),
    )
    for node in nodes.values():
        node.close()


def example(case_type: str) -> dict[str, Any]:
    return dict(json.loads((EXAMPLES / f"{case_type}.json").read_text()))


def outbox_envelope(sender: Side, bundle_id: str) -> Path:
    with sender.node.db.transaction() as session:
        sha = session.scalars(
            select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == bundle_id)
        ).one()
    return envelope_path(sender.node.settings.blob_dir, sha)


def deliver(sender: Side, receiver: Side, bundle_id: str, *, when: datetime = NOW) -> None:
    """The inbox step alone: consent bundles wait until a consent command applies them."""
    receive_envelope(
        NodeContext(receiver.node, receiver.keyring), outbox_envelope(sender, bundle_id), now=when
    )


def send_case_to_peer(
    sender: Side, receiver: Side, *, public: bool = False, when: datetime = NOW
) -> str:
    sent = send_case(
        NodeContext(sender.node, sender.keyring),
        sender.officer,
        "exam-fraud",
        example("exam-fraud"),
        [],
        public=public,
        reply_to=None,
        now=when,
    )
    deliver(sender, receiver, sent.bundle_id, when=when)
    return sent.bundle_id


def entries(side: Side, kind: str | None = None) -> list[Any]:
    with side.node.db.transaction() as session:
        found = ledger_read.list_entries(session)
    return [e for e in found if kind is None or str(e.kind) == kind]


def do_disclose(
    side: Side, ids: list[str], out: Path, **kw: Any
) -> consent_disclosure.DisclosureResult:
    return consent_disclosure.disclose(
        NodeContext(side.node, side.keyring),
        side.officer,
        ids,
        kw.get("recipient", EMBASSY),
        kw.get("purpose", PURPOSE),
        out,
        now=kw.get("now", NOW),
    )


def grant_undelivered(
    pair: Pair, ids: list[str], **kw: Any
) -> tuple[consent_common.SentConsent, consent_common.SentConsent]:
    """pk asks jp about jp's items; jp grants; the grant has not reached pk yet."""
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, ids, EMBASSY, PURPOSE, now=NOW
    )
    deliver(pair.pk, pair.jp, asked.bundle_id)
    granted = consent_protocol.grant(
        NodeContext(pair.jp.node, pair.jp.keyring),
        JP_OFFICER,
        asked.request_id,
        valid_until=kw.get("valid_until"),
        max_uses=kw.get("max_uses"),
        conditions=kw.get("conditions", "Only for the screening named."),
        now=NOW,
    )
    return asked, granted


def grant_for(pair: Pair, ids: list[str], **kw: Any) -> consent_common.SentConsent:
    """pk asks jp about jp's items; jp grants; the grant reaches pk."""
    _asked, granted = grant_undelivered(pair, ids, **kw)
    deliver(pair.jp, pair.pk, granted.bundle_id)
    return granted


def revoke_at_jp(
    pair: Pair, consent_id: str | None, reason: str = "r"
) -> consent_common.SentConsent:
    """jp's officer revokes the consent jp granted; the revocation waits in jp's outbox."""
    assert consent_id is not None
    return consent_protocol.revoke(
        NodeContext(pair.jp.node, pair.jp.keyring), JP_OFFICER, consent_id, reason=reason, now=NOW
    )


def assert_blocked(side: Side, ids: list[str], out: Path, missing: str, **kw: Any) -> None:
    before = len(entries(side, "disclosure-blocked"))
    with pytest.raises(ConsentRefused, match=missing) as caught:
        do_disclose(side, ids, out, **kw)
    assert caught.value.exit_code == 3
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ssw-disclose-")]
    assert len(entries(side, "disclosure-blocked")) == before + 1


# -- the main path -----------------------------------------------------------------------


def test_disclosure_blocked_until_consent_then_allowed_then_blocked_after_revocation(
    pair: Pair, tmp_path: Path
) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    assert_blocked(pair.pk, [case_id], tmp_path / "out0", "no consent")

    granted = grant_for(pair, [case_id], max_uses=5)
    result = do_disclose(pair.pk, [case_id], tmp_path / "out1")
    assert result.kind == "disclosure-made"
    assert result.consent_id == granted.consent_id
    manifest = json.loads((tmp_path / "out1" / "disclosure.json").read_text())
    assert manifest["consent_id"] == granted.consent_id
    assert manifest["ledger_seq"] == result.ledger_seq
    case_file = tmp_path / "out1" / case_id / "case.json"
    decoded = json.loads(case_file.read_text())
    assert all(decoded[key] == value for key, value in example("exam-fraud").items())
    assert (
        manifest["files_sha256"][f"{case_id}/case.json"]
        == hashlib.sha256(case_file.read_bytes()).hexdigest()
    )
    made = entries(pair.pk, "disclosure-made")
    assert [e.seq for e in made] == [result.ledger_seq]
    assert made[0].actor_name == "bilal"
    assert made[0].consent_id == granted.consent_id

    revoked = revoke_at_jp(pair, granted.consent_id, reason="the investigation is still open")
    deliver(pair.jp, pair.pk, revoked.bundle_id)
    assert_blocked(pair.pk, [case_id], tmp_path / "out2", "consent revoked")
    # the disclosure before the revocation stays on record as allowed
    with pair.pk.node.db.transaction() as session:
        records = session.scalars(
            select(DisclosureRecord).order_by(DisclosureRecord.ledger_seq)
        ).all()
    assert [(r.kind, r.allowed) for r in records] == [
        ("disclosure-blocked", False),
        ("disclosure-made", True),
        ("disclosure-blocked", False),
    ]
    kinds_jp = [str(e.kind) for e in entries(pair.jp)]
    assert {"consent-requested", "consent-granted", "consent-revoked"} <= set(kinds_jp)
    listing = consent_queries.list_consents(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)
    (held,) = listing["consents"]
    assert (held["state"], held["uses_spent"]) == ("revoked", 1)


def test_blocked_message_names_each_missing_item(pair: Pair, tmp_path: Path) -> None:
    first = send_case_to_peer(pair.jp, pair.pk)
    second = send_case_to_peer(pair.jp, pair.pk)
    grant_for(pair, [first])
    with pytest.raises(ConsentRefused) as caught:
        do_disclose(pair.pk, [first, second], tmp_path / "out")
    message = str(caught.value)
    assert f"{second}: consent does not cover this item" in message
    assert f"{first}: covered by consent" in message


STRETCHES = [
    ({"recipient": "Press Agency"}, "consent is for another recipient"),
    ({"purpose": "publication"}, "consent is for another purpose"),
    ({"now": NOW + timedelta(days=11)}, "consent expired"),
]


def test_consent_does_not_stretch_to_other_recipients_purposes_or_times(
    pair: Pair, tmp_path: Path
) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    grant_for(pair, [case_id], valid_until=NOW + timedelta(days=10))
    for index, (kw, missing) in enumerate(STRETCHES):
        assert_blocked(pair.pk, [case_id], tmp_path / f"out{index}", missing, **kw)
    # and within its terms it is still good
    assert do_disclose(pair.pk, [case_id], tmp_path / "ok").kind == "disclosure-made"


def test_last_use_then_uses_spent(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    grant_for(pair, [case_id], max_uses=1)
    do_disclose(pair.pk, [case_id], tmp_path / "first")
    assert_blocked(pair.pk, [case_id], tmp_path / "second", "uses spent")


def test_internal_public_and_own_items_need_no_consent(pair: Pair, tmp_path: Path) -> None:
    confidential = send_case_to_peer(pair.jp, pair.pk)
    public = send_case_to_peer(pair.jp, pair.pk, public=True)
    own = send_case_to_peer(pair.pk, pair.jp)
    shared = do_disclose(pair.pk, [confidential], tmp_path / "a", recipient="beoe")
    assert shared.kind == "internal-share"
    made = do_disclose(pair.pk, [public, own], tmp_path / "b")
    assert made.kind == "disclosure-made"
    assert made.consent_id is None
    assert [e.seq for e in entries(pair.pk, "internal-share")] == [shared.ledger_seq]


def test_denial_reaches_the_requester(pair: Pair) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, [case_id], EMBASSY, PURPOSE, now=NOW
    )
    deliver(pair.pk, pair.jp, asked.bundle_id)
    denied = consent_protocol.deny(
        NodeContext(pair.jp.node, pair.jp.keyring),
        JP_OFFICER,
        asked.request_id,
        reason="no",
        now=NOW,
    )
    deliver(pair.jp, pair.pk, denied.bundle_id)
    listing = consent_queries.list_consents(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)
    (request,) = listing["requests"]
    assert (request["status"], request["denial_reason"]) == ("denied", "no")
    assert [e.actor_name for e in entries(pair.jp, "consent-denied")] == ["tanaka"]
    with pytest.raises(Exception, match="denied already"):
        consent_protocol.grant(
            NodeContext(pair.jp.node, pair.jp.keyring),
            JP_OFFICER,
            asked.request_id,
            valid_until=None,
            max_uses=None,
            conditions="",
            now=NOW,
        )


def test_a_storage_fault_of_ours_defers_a_consent_bundle_and_refuses_nothing(
    pair: Pair,
) -> None:
    """jp's ledger head is damaged when pk's request arrives: applying it fails with
    jp's own StorageError. The bundle stays pending (no refusal recorded, nothing told
    to pk), the cause is logged; once the head is repaired the same bundle applies."""
    from sqlalchemy import func, text  # noqa: PLC0415
    from structlog.testing import capture_logs  # noqa: PLC0415

    from gateway import log  # noqa: PLC0415
    from gateway.store.models_consent import ConsentApplied  # noqa: PLC0415
    from gateway.store.models_refusal import BundleRefusalRecord  # noqa: PLC0415

    case_id = send_case_to_peer(pair.jp, pair.pk)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, [case_id], EMBASSY, PURPOSE, now=NOW
    )
    deliver(pair.pk, pair.jp, asked.bundle_id)
    with pair.jp.node.db.transaction() as session:
        kept = session.execute(text("SELECT head_hash FROM ledger_state")).scalar_one()
        session.execute(text("UPDATE ledger_state SET head_hash = :bad"), {"bad": b"\x00"})
    ctx = NodeContext(pair.jp.node, pair.jp.keyring)
    log.configure(level="info")
    with capture_logs() as logs:
        done = consent_receive.apply_pending(ctx, now=NOW)
    assert [line.split(": ", 1)[0] for line in done] == [asked.bundle_id]
    assert "deferred" in done[0]
    assert "malformed" not in done[0]  # the cause is for the log
    (deferred,) = [e for e in logs if e["event"] == "consent_bundle_deferred"]
    assert "malformed" in deferred["detail"]
    with pair.jp.node.db.transaction() as session:
        for table in (ConsentApplied, BundleRefusalRecord):
            assert session.scalar(select(func.count()).select_from(table)) == 0
        session.execute(text("UPDATE ledger_state SET head_hash = :good"), {"good": kept})
    applied = consent_receive.apply_pending(ctx, now=NOW)
    assert [line.split(": ", 1)[0] for line in applied] == [asked.bundle_id]
    assert "deferred" not in applied[0]
    listing = consent_queries.list_consents(ctx, now=NOW)
    assert [r["request_id"] for r in listing["requests"]] == [asked.request_id]
    assert listing["refused_bundles"] == []


@pytest.mark.parametrize("arrives", ["before the disclosure", "while it decrypts"])
def test_a_revocation_kept_pending_by_a_storage_fault_blocks_every_disclosure(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arrives: str
) -> None:
    """pk holds a valid consent; jp's revocation of it reaches pk's inbox before the
    disclosure (seen at the first look) or while the disclosure decrypts (seen only
    under the ledger lock), and applying it fails with a storage fault of pk's for
    as long as it lasts. No disclosure is decided or recorded meanwhile; once the
    fault passes, the revocation applies and the disclosure is refused."""
    case_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id], max_uses=5)
    consent_queries.list_consents(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)
    revoked = revoke_at_jp(pair, granted.consent_id, reason="the investigation is still open")

    def storage_fault(*_args: Any, **_kwargs: Any) -> Any:
        raise StorageError("canceling statement due to statement timeout")

    monkeypatch.setattr(consent_receive, "store_revocation", storage_fault)
    if arrives == "before the disclosure":
        deliver(pair.jp, pair.pk, revoked.bundle_id)
    else:
        decrypt = consent_disclosure._decrypt_items

        def revocation_arrives(*args: Any, **kwargs: Any) -> Any:
            deliver(pair.jp, pair.pk, revoked.bundle_id)
            return decrypt(*args, **kwargs)

        monkeypatch.setattr(consent_disclosure, "_decrypt_items", revocation_arrives)
    before = entries(pair.pk, None)
    with pytest.raises(StorageError, match="could not be applied") as refused:
        do_disclose(pair.pk, [case_id], tmp_path / "out")
    assert refused.value.reason == "consent.bundle-deferred"
    assert not (tmp_path / "out").exists()
    # Nothing decided or recorded (receiving the revocation is, as ever).
    added = [str(e.kind) for e in entries(pair.pk, None)[len(before) :]]
    assert added == ([] if arrives == "before the disclosure" else ["bundle-received"])
    monkeypatch.undo()
    assert_blocked(pair.pk, [case_id], tmp_path / "out2", "consent revoked")


def test_validity_beyond_policy_maximum_is_refused(pair: Pair) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, [case_id], EMBASSY, PURPOSE, now=NOW
    )
    deliver(pair.pk, pair.jp, asked.bundle_id)
    before = len(entries(pair.jp))
    with pytest.raises(PolicyRefused, match="maximum validity"):
        consent_protocol.grant(
            NodeContext(pair.jp.node, pair.jp.keyring),
            JP_OFFICER,
            asked.request_id,
            valid_until=NOW + timedelta(days=366),
            max_uses=None,
            conditions="",
            now=NOW,
        )
    # the request was applied on the way in; the refused grant added nothing
    assert len(entries(pair.jp)) == before + 1


def test_pointless_or_bad_requests_are_refused(pair: Pair) -> None:
    own = send_case_to_peer(pair.pk, pair.jp)
    public = send_case_to_peer(pair.jp, pair.pk, public=True)
    cases: list[tuple[Side, list[str], str, type[Exception], str]] = [
        (pair.pk, ["no-such-bundle"], EMBASSY, NotFound, "not in the inbox"),
        (pair.pk, [], EMBASSY, InvalidInput, "at least one"),
        (pair.pk, [own], EMBASSY, NotFound, "not in the inbox"),
        (pair.pk, [public], EMBASSY, InvalidInput, "marked public"),
        (pair.jp, [own], "mofa", InvalidInput, "internal recipient"),
    ]
    before = {side.node.node_id: len(entries(side)) for side in (pair.jp, pair.pk)}
    for side, ids, recipient, error, message in cases:
        with pytest.raises(error, match=message):
            consent_protocol.request_consent(
                NodeContext(side.node, side.keyring), side.officer, ids, recipient, PURPOSE, now=NOW
            )
    assert {side.node.node_id: len(entries(side)) for side in (pair.jp, pair.pk)} == before


def test_grant_signed_by_another_key_is_refused_and_never_used(pair: Pair, tmp_path: Path) -> None:
    """A consent-grant bundle whose written consent is not signed by the originator's key."""
    case_id = send_case_to_peer(pair.jp, pair.pk)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, [case_id], EMBASSY, PURPOSE, now=NOW
    )
    deliver(pair.pk, pair.jp, asked.bundle_id)
    forged = ConsentGrant(
        consent_id="6f1c2a54-0000-4000-8000-000000000001",
        request_id=asked.request_id,
        items=(case_id,),
        third_party=EMBASSY,
        purpose=PURPOSE,
        valid_from=NOW,
        valid_until=NOW + timedelta(days=30),
        max_uses=None,
        conditions="",
        granting_officer="tanaka",
        granting_node="jp",
        key_id=pair.jp.keyring.signing_key_id,
    )
    other = nacl.signing.SigningKey.generate()
    signed = sign_grant(forged, lambda message: other.sign(message).signature)
    attachment = tmp_path / consent_common.GRANT_ATTACHMENT
    attachment.write_bytes(json.dumps(signed.to_wire()).encode())
    sent = send_protocol_bundle(
        NodeContext(  # what a faulty originator could sign and send
            pair.jp.node, pair.jp.keyring
        ),
        JP_OFFICER,
        "consent-grant",
        {
            "consent_id": forged.consent_id,
            "request_id": asked.request_id,
            "items": [case_id],
            "third_party": EMBASSY,
            "purpose": PURPOSE,
            "valid_until": "2026-12-25T12:00:00Z",
            "max_uses": None,
            "conditions": [],
            "granting_officer": "tanaka",
        },
        [attachment],
        reply_to=None,
        now=NOW,
        in_transaction=lambda _session, _bundle_id: None,
    )
    deliver(pair.jp, pair.pk, sent.bundle_id)
    assert_blocked(pair.pk, [case_id], tmp_path / "out", "no consent")
    listing = consent_queries.list_consents(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)
    assert listing["consents"] == []
    (refused,) = listing["refused_bundles"]
    assert refused["bundle_id"] == sent.bundle_id
    assert "signature" in refused["detail"]


def test_revocation_before_its_grant_revokes_it_on_arrival(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    _asked, granted = grant_undelivered(pair, [case_id], conditions="")
    revoked = revoke_at_jp(pair, granted.consent_id)
    deliver(pair.jp, pair.pk, revoked.bundle_id)
    deliver(pair.jp, pair.pk, granted.bundle_id)
    assert_blocked(pair.pk, [case_id], tmp_path / "out", "consent revoked")


def test_a_grant_that_arrived_after_its_key_was_distrusted_authorises_nothing(
    pair: Pair, tmp_path: Path
) -> None:
    compromised = NOW + timedelta(minutes=30)
    trusted_case = send_case_to_peer(pair.jp, pair.pk)
    case_id = send_case_to_peer(pair.jp, pair.pk)
    trusted_grant = grant_for(pair, [trusted_case])  # arrives at NOW
    _asked, late_grant = grant_undelivered(pair, [case_id])
    deliver(pair.jp, pair.pk, late_grant.bundle_id, when=compromised + timedelta(minutes=15))
    consent_receive.apply_pending(
        NodeContext(pair.pk.node, pair.pk.keyring), now=compromised + timedelta(minutes=15)
    )
    # Tokyo's signing key is revoked later, "compromised since" between the two grants.
    later = NOW + timedelta(hours=2)
    with pair.jp.node.db.transaction() as session:
        change = own_keys.revoke_key(
            pair.jp.node.settings,
            session,
            PASSPHRASE.encode(),
            pair.jp.keyring.signing_key_id,
            "signing key copied from a laptop",
            now=later,
            actor=Actor(name="admin", role=Role.ADMIN),
            compromised_since=compromised,
        )
    with pair.pk.node.db.transaction() as session:
        peer_trust.apply_peer_manifest(session, change.manifest.raw, node="jp", now=later)
    assert_blocked(pair.pk, [case_id], tmp_path / "after", "consent suspect", now=later)
    made = do_disclose(pair.pk, [trusted_case], tmp_path / "trusted", now=later)
    assert made.consent_id == trusted_grant.consent_id
    states = {
        c["consent_id"]: c["state"]
        for c in consent_queries.list_consents(NodeContext(pair.pk.node), now=later)["consents"]
    }
    assert states == {trusted_grant.consent_id: "valid", late_grant.consent_id: "suspect"}


# -- concurrency -------------------------------------------------------------------------


def test_revocation_concurrent_with_disclosures_never_follows_a_recorded_disclosure(
    pair: Pair, tmp_path: Path
) -> None:
    """Disclosures run in a loop while the revocation arrives: none is made after it."""
    case_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id])
    revoked = revoke_at_jp(pair, granted.consent_id)
    # A second connection pool to pk's database, as a separate receiver would have.
    receiver = Side(Node.open(pair.pk.node.settings), pair.pk.keyring, PK_OFFICER)
    outcomes: list[str] = []
    started = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def disclose_loop() -> None:
        try:
            for index in range(200):
                try:
                    do_disclose(pair.pk, [case_id], tmp_path / f"loop-{index}")
                    outcomes.append("made")
                except ConsentRefused:
                    outcomes.append("blocked")
                started.set()
                if stop.is_set() and outcomes[-1] == "blocked":
                    return
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            started.set()

    worker = threading.Thread(target=disclose_loop)
    worker.start()
    try:
        started.wait(30)
        deliver(pair.jp, receiver, revoked.bundle_id)
        stop.set()
    finally:
        worker.join(120)
        receiver.node.close()
    assert not errors, errors
    assert outcomes[0] == "made"
    assert outcomes[-1] == "blocked"
    # Allowed attempts all come before the first blocked one: no flip back.
    first_blocked = outcomes.index("blocked")
    assert "made" not in outcomes[first_blocked:]
    # In the ledger's total order, the revocation's arrival precedes every block
    # and follows every disclosure made.
    (arrived,) = [
        e for e in entries(pair.pk, "bundle-received") if e.bundle_id == revoked.bundle_id
    ]
    made = entries(pair.pk, "disclosure-made")
    blocked = entries(pair.pk, "disclosure-blocked")
    assert made
    assert blocked
    assert max(e.seq for e in made) < arrived.seq
    assert min(e.seq for e in blocked) > arrived.seq
    assert len(made) + len(blocked) == len(outcomes)


# -- the command line --------------------------------------------------------------------


def _officer_env(side: Side, name: str) -> dict[str, str]:
    with side.node.db.transaction() as session:
        made = add_user(session, name, "officer", created_by="admin", now=utc_now())
    serve_node(side.node, lambda: side.keyring)  # user commands reach the running node
    return {"GATEWAY_HOME": str(side.node.settings.home), "GATEWAY_TOKEN": made.token.text}


def _run(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize("clock", [None], indirect=True)
def test_cli_blocked_disclosure_exits_3_writes_nothing_and_is_recorded_once(
    pair: Pair, tmp_path: Path
) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk, when=utc_now())
    pk_env = _officer_env(pair.pk, "bilal")
    jp_env = _officer_env(pair.jp, "tanaka")
    out = tmp_path / "for-embassy"
    disclose_args = ["disclose", case_id, "--recipient", EMBASSY, "--purpose", PURPOSE]

    refused = _run(pk_env, *disclose_args, "--out", str(out))
    assert refused.exit_code == 3
    assert f"{case_id}: no consent" in refused.stderr
    assert not out.exists()
    (blocked,) = entries(pair.pk, "disclosure-blocked")
    assert (blocked.actor_name, blocked.actor_role) == ("bilal", "officer")

    asked = _run(
        pk_env,
        "--json",
        "consent",
        "request",
        case_id,
        "--recipient",
        EMBASSY,
        "--purpose",
        PURPOSE,
    )
    assert asked.exit_code == 0, asked.stderr
    request_id = json.loads(asked.stdout)["request_id"]
    deliver(pair.pk, pair.jp, request_id, when=utc_now())
    last_day = (utc_now() + timedelta(days=30)).date().isoformat()
    granted = _run(
        jp_env,
        "--json",
        "consent",
        "grant",
        request_id,
        "--valid-until",
        last_day,
        "--max-uses",
        "1",
        "--conditions",
        "screening only",
    )
    assert granted.exit_code == 0, granted.stderr
    grant_data = json.loads(granted.stdout)
    assert grant_data["valid_until"].startswith((utc_now() + timedelta(days=31)).date().isoformat())
    deliver(pair.jp, pair.pk, grant_data["bundle_id"], when=utc_now())

    listed = _run(pk_env, "consent", "list")
    assert listed.exit_code == 0, listed.stderr
    assert f"{grant_data['consent_id']}  granted to us valid" in listed.stdout

    made = _run(pk_env, "--json", *disclose_args, "--out", str(out))
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["consent_id"] == grant_data["consent_id"]
    assert (out / "disclosure.json").is_file()

    again = _run(pk_env, *disclose_args, "--out", str(tmp_path / "again"))
    assert again.exit_code == 3
    assert "uses spent" in again.stderr
    assert not (tmp_path / "again").exists()
    assert len(entries(pair.pk, "disclosure-blocked")) == 2

    too_long = (utc_now() + timedelta(days=400)).date().isoformat()
    refused_grant = _run(jp_env, "consent", "grant", request_id, "--valid-until", too_long)
    assert refused_grant.exit_code == 1
    assert "maximum validity of 365 days" in refused_grant.stderr


def test_peer_server_applies_consent_bundles_as_they_arrive(pair: Pair) -> None:
    """Through the peer server's receive step, a grant is on record (ledger
    entry, consent listed) without any officer command having run."""
    case_id = send_case_to_peer(pair.jp, pair.pk)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, [case_id], EMBASSY, PURPOSE, now=NOW
    )
    jp_services = node_services(
        NodeContext(pair.jp.node, pair.jp.keyring), skew=timedelta(minutes=5)
    )
    jp_services.receive_envelope(outbox_envelope(pair.pk, asked.bundle_id), now=NOW)
    assert [e.bundle_id for e in entries(pair.jp, "consent-requested")] == [asked.bundle_id]
    granted = consent_protocol.grant(
        NodeContext(pair.jp.node, pair.jp.keyring),
        JP_OFFICER,
        asked.request_id,
        valid_until=None,
        max_uses=None,
        conditions="",
        now=NOW,
    )
    pk_services = node_services(
        NodeContext(pair.pk.node, pair.pk.keyring), skew=timedelta(minutes=5)
    )
    pk_services.receive_envelope(outbox_envelope(pair.jp, granted.bundle_id), now=NOW)
    (recorded,) = entries(pair.pk, "consent-granted")
    assert (recorded.consent_id, recorded.actor_name) == (granted.consent_id, "system")


def test_disclosed_package_holds_case_and_attachments_with_their_hashes(
    pair: Pair, tmp_path: Path
) -> None:
    evidence = tmp_path / "case.json"  # named like the case file on purpose
    evidence.write_bytes(b"scanned contract\x00\x01" * 100)
    sent = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring),
        JP_OFFICER,
        "exam-fraud",
        example("exam-fraud"),
        [evidence],
        public=False,
        reply_to=None,
        now=NOW,
    )
    deliver(pair.jp, pair.pk, sent.bundle_id)
    grant_for(pair, [sent.bundle_id])
    out = tmp_path / "package"
    result = do_disclose(pair.pk, [sent.bundle_id], out)
    attachment = out / sent.bundle_id / "attachments" / "case.json"
    assert attachment.read_bytes() == evidence.read_bytes()
    on_disk = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in out.rglob("*")
        if p.is_file() and p.name != "disclosure.json"
    }
    assert result.files == on_disk
    assert sorted(on_disk) == [
        f"{sent.bundle_id}/attachments/case.json",
        f"{sent.bundle_id}/case.json",
    ]
    (made,) = entries(pair.pk, "disclosure-made")
    package = json.loads((out / "disclosure.json").read_text())
    # The ledger names files by position and keyed MAC, never by name or plain hash.
    assert "files_sha256" not in made.body
    assert made.body["files"] == package["ledger_files"]["files"]
    assert [(f["part"], f["index"], f["bytes"]) for f in made.body["files"]] == [
        ("case", 0, (out / sent.bundle_id / "case.json").stat().st_size),
        ("attachment", 0, len(evidence.read_bytes())),
    ]
    assert made.body["files_mac_key_id"] == pair.pk.keyring.signing_key_id


def test_grant_arriving_between_first_look_and_decision_is_honoured(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first look (no lock) finds no consent; the grant lands in the inbox right
    after; the locked decision sees it, and the disclosure is made with the files
    (straight from there: the first look is not asked again)."""
    case_id = send_case_to_peer(pair.jp, pair.pk)
    _asked, granted = grant_undelivered(pair, [case_id], conditions="")
    first_look = consent_disclosure._foresee
    looks: list[bool] = []

    def then_the_grant_arrives(*args: Any) -> Any:
        found = first_look(*args)
        looks.append(found[1].allowed)
        if len(looks) == 1:
            deliver(pair.jp, pair.pk, granted.bundle_id)
        return found

    monkeypatch.setattr(consent_disclosure, "_foresee", then_the_grant_arrives)
    result = do_disclose(pair.pk, [case_id], tmp_path / "out")
    assert looks == [False]
    assert result.consent_id == granted.consent_id
    assert (tmp_path / "out" / case_id / "case.json").is_file()
    assert entries(pair.pk, "disclosure-blocked") == []
    assert len(entries(pair.pk, "disclosure-made")) == 1


def test_a_terms_record_that_disagrees_with_its_document_decides_nothing(
    pair: Pair, tmp_path: Path
) -> None:
    """A grant's terms record rewritten in the database, its digest kept (only someone
    writing to the database could): the first look reads it, the recorded decision
    reads the signed document. Naming another recipient, it refuses the first look,
    and the locked decision still makes the disclosure, once; naming the asked
    recipient for a grant whose document names another, it passes the first look and
    the locked decision refuses."""
    case_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id], max_uses=5)
    consent_receive.apply_pending(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)

    def rewrite(recipient: str) -> None:
        with pair.pk.node.db.transaction() as session:
            row = session.get(ConsentGrantRecord, granted.consent_id)
            assert row is not None
            assert row.terms is not None
            value = json.loads(bytes(row.terms))
            value[5] = recipient
            row.terms = canonical_bytes(value)

    rewrite("Press Agency")
    (state,) = consent_queries.check_consent_states(pair.pk.node.db, [case_id])
    assert state.grant.third_party == "Press Agency"  # the record was read
    result = do_disclose(pair.pk, [case_id], tmp_path / "out1")
    assert result.consent_id == granted.consent_id
    assert (tmp_path / "out1" / case_id / "case.json").is_file()
    assert len(entries(pair.pk, "disclosure-made")) == 1

    # The record (still) names the Press, the document the Embassy: the first look
    # lets the Press through to the files, the locked decision refuses and records it.
    assert_blocked(
        pair.pk, [case_id], tmp_path / "out2", "another recipient", recipient="Press Agency"
    )
    assert len(entries(pair.pk, "disclosure-made")) == 1


def test_bad_disclosure_input_is_refused_before_any_decision(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("someone else's file")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases: list[tuple[list[str], Path, str, type[Exception], str]] = [
        ([case_id], busy, EMBASSY, InvalidInput, "must not exist yet"),
        ([case_id], a_file, EMBASSY, InvalidInput, "must not exist yet"),
        ([case_id], tmp_path / "no" / "parent", EMBASSY, InvalidInput, "does not exist"),
        (["0f0f0f0f-0000-4000-8000-000000000000"], tmp_path / "x", EMBASSY, NotFound, "no bundle"),
        ([case_id, case_id], tmp_path / "x", EMBASSY, InvalidInput, "named twice"),
        ([case_id], tmp_path / "x", "  ", InvalidInput, "recipient"),
    ]
    for ids, out, recipient, error, message in cases:
        with pytest.raises(error, match=message):
            do_disclose(pair.pk, ids, out, recipient=recipient)
    assert entries(pair.pk, "disclosure-blocked") == []
    assert (busy / "keep.txt").read_text() == "someone else's file"
    assert not (tmp_path / "x").exists()
