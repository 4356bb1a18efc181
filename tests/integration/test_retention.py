"""Retention enforced on SQLite and PostgreSQL: ``gateway purge`` and its service.

Two real nodes (jp, pk), each with its own database, keys and pinned peer,
under a policy with short periods (envelopes 30 days, decrypted outputs 7
days). The clock is a parameter, never a sleep: the nodes and their rows are
made at times derived from the real time (``T0`` = now - 40 days), so the
command line, which runs at the real time, finds them due; service calls that
take ``now=`` get times on the same line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from gateway.api.app import create_api_app
from gateway.cli.main import cli
from gateway.core.envelope import seal
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor, Role
from gateway.errors import StorageError
from gateway.node import ledger, retention
from gateway.node.backup import make_backup, restore_backup
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent import receive as consent_receive
from gateway.node.context import NodeContext, PolicyCache
from gateway.node.housekeeping import enforce_retention
from gateway.node.inbox import EquivocationRefused, read_bundle, receive_envelope
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import export as ledger_export
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import witness as ledger_witness
from gateway.node.outbox import SentBundle, deliver_once, send_case
from gateway.node.own_keys import unlock_keyring, verify_ledger_with_keys
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import Node, utc_now
from gateway.node.users import add_user
from gateway.settings import load_settings
from gateway.store.models_exchange import Equivocation, InboxEntry, OutboxEntry, envelope_path
from gateway.store.models_retention import DecryptedOutput, PurgedBundle
from tests.node_api import serve_node
from tests.nodes import GATEWAY, REPO, open_pinned_pair

EXAMPLES = REPO / "docs" / "examples"
PASSPHRASE = "correct horse battery staple"
JP_OFFICER = Actor(name="tanaka", role=Role.OFFICER)
PK_OFFICER = Actor(name="bilal", role=Role.OFFICER)
ENVELOPE_DAYS = 30
OUTPUT_DAYS = 7


@dataclass
class Side:
    node: Node
    keyring: NodeKeyring
    officer: Actor

    @property
    def blob_dir(self) -> Path:
        return self.node.settings.blob_dir


@dataclass
class Pair:
    jp: Side
    pk: Side
    t0: datetime
    """When the nodes were made: the real time at the start of the test, less 40 days."""


def shorten_retention(home: Path) -> None:
    """The policy override of these tests: short periods, everything else as shipped."""
    path = home / "policies" / "policy.toml"
    text = path.read_text()
    for key, days in (("envelopes_days", ENVELOPE_DAYS), ("decrypted_output_days", OUTPUT_DAYS)):
        lines = [line for line in text.splitlines() if line.startswith(f"{key} =")]
        assert len(lines) == 1, key
        text = text.replace(lines[0], f"{key} = {days}")
    path.write_text(text)


@pytest.fixture
def pair(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
) -> Iterator[Pair]:
    t0 = utc_now() - timedelta(days=40)
    env = {**clean_environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    second = (
        f"sqlite:///{tmp_path / 'pk.sqlite3'}"
        if database_url.startswith("sqlite")
        else pg_database_factory()
    )
    nodes = open_pinned_pair(tmp_path, {"jp": database_url, "pk": second}, env, now=t0)
    sides = {}
    for node_id, node in nodes.items():
        shorten_retention(node.settings.home)
        with node.db.transaction() as session:
            keyring = unlock_keyring(node.settings, PASSPHRASE.encode(), session, now=t0)
        # These tests follow received envelope files; the inline kind has its own test.
        keep_envelopes_inline(node, 0)
        sides[node_id] = Side(node, keyring, JP_OFFICER if node_id == "jp" else PK_OFFICER)
    yield Pair(jp=sides["jp"], pk=sides["pk"], t0=t0)
    for node in nodes.values():
        node.close()


def keep_envelopes_inline(node: Node, max_bytes: int) -> None:
    """Receive envelopes of up to ``max_bytes`` into their inbox rows (0: every one a file)."""
    database = node.settings.database.model_copy(update={"inline_envelope_max_bytes": max_bytes})
    node.settings = node.settings.model_copy(update={"database": database})


# -- moving bundles -----------------------------------------------------------------------


@dataclass
class _Outcome:
    status: str
    receipt: bytes | None
    reason: str | None


class DirectClient:
    """Hands envelopes to the peer's real receiving function in this process (no HTTP);
    envelopes not in ``accept`` get no answer, as if the link dropped them."""

    def __init__(self, peer: Side, now: datetime, accept: set[str] | None = None) -> None:
        self.peer = peer
        self.now = now
        self.accept = accept

    async def post_envelopes(self, paths: Sequence[Path]) -> list[_Outcome]:
        results = []
        for path in paths:
            if self.accept is not None and path.name not in self.accept:
                results.append(_Outcome("unavailable", None, "link down"))
                continue
            receipt = receive_envelope(
                NodeContext(self.peer.node, self.peer.keyring), path, now=self.now
            )
            results.append(_Outcome("accepted", receipt, None))
        return results

    async def post_manifest(self, raw: bytes) -> None:
        del raw


def send(
    sender: Side, when: datetime, attachments: Sequence[Path] = (), case_type: str = "exam-fraud"
) -> SentBundle:
    case = json.loads((EXAMPLES / f"{case_type}.json").read_text())
    return send_case(
        NodeContext(sender.node, sender.keyring),
        sender.officer,
        case_type,
        case,
        list(attachments),
        public=False,
        reply_to=None,
        now=when,
    )


def deliver(sender: Side, receiver: Side, sent: SentBundle, when: datetime) -> None:
    """Deliver this one bundle with its signed receipt (others stay queued)."""
    client = DirectClient(receiver, when, accept={sent.envelope_sha256})
    report = asyncio.run(
        deliver_once(NodeContext(sender.node, sender.keyring), client, now_fn=lambda: when)  # type: ignore[arg-type]
    )
    assert sent.bundle_id in report.delivered


def entries(side: Side, kind: str | None = None) -> list[Any]:
    with side.node.db.transaction() as session:
        found = ledger_read.list_entries(session)
    return [e for e in found if kind is None or str(e.kind) == kind]


def witness(witness_side: Side, of: Side, when: datetime) -> None:
    """``of`` signs a checkpoint at ``when``; ``witness_side`` keeps it as its witness."""
    with of.node.db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, of.keyring, when)
    with witness_side.node.db.transaction() as session:
        pinned = pinned_peer_manifest(session)
        assert pinned is not None
        ledger_witness.store_peer_checkpoint(
            session, signed.to_wire(), pinned, peer_node=of.node.node_id, now=when
        )


def audit(auditor: Side, peer: Side, when: datetime) -> ledger_witness.AuditResult:
    """``auditor``'s ``ledger audit-peer`` against ``peer``'s newest checkpoint, in process."""
    with peer.node.db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, peer.keyring, when)

    def fetch(first: int) -> ledger_witness.PeerAnswer:
        with peer.node.db.transaction() as session:
            proof = ledger_checkpoint.consistency_proof(session, first, signed.checkpoint.size)
        return ledger_witness.PeerAnswer(checkpoint=signed.to_wire(), proof=proof)

    with auditor.node.db.transaction() as session:
        pinned = pinned_peer_manifest(session)
    assert pinned is not None
    return ledger_witness.audit_peer(
        auditor.node.db, pinned, peer_node=peer.node.node_id, fetch=fetch, now=lambda: when
    )


def assert_ledger_verifies(side: Side) -> None:
    with side.node.db.transaction() as session:
        report = verify_ledger_with_keys(session, node_id=side.node.node_id)
    assert report.ok, report.to_dict()


def host_env(side: Side) -> dict[str, str]:
    return {
        "GATEWAY_HOME": str(side.node.settings.home),
        "GATEWAY_PASSPHRASE": PASSPHRASE,
        "GATEWAY_KEYSTORE_STRENGTH": "min",
    }


def officer_env(side: Side, name: str) -> dict[str, str]:
    """An officer's environment: the home and the token; the node serves its local API."""
    with side.node.db.transaction() as session:
        made = add_user(session, name, "officer", created_by="admin", now=utc_now())
    serve_node(side.node, lambda: side.keyring)
    return {"GATEWAY_HOME": str(side.node.settings.home), "GATEWAY_TOKEN": made.token.text}


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def run_json(env: dict[str, str], *args: str) -> Any:
    done = run(env, "--json", *args)
    assert done.exit_code == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def purged_rows(side: Side) -> dict[str, PurgedBundle]:
    with side.node.db.transaction() as session:
        return {row.bundle_id: row for row in session.scalars(select(PurgedBundle))}


def outputs(side: Side) -> dict[str, str]:
    """``{path: state}`` of every tracked decrypted output."""
    with side.node.db.transaction() as session:
        return {row.path: row.state for row in session.scalars(select(DecryptedOutput))}


def api_get(side: Side, token: str, path: str) -> tuple[int, Any]:
    """One GET on the node's real local API application, served on loopback."""

    async def go() -> tuple[int, Any]:
        app = create_api_app(NodeContext(side.node, lambda: side.keyring))
        runner = aiohttp.web.AppRunner(app, access_log=None)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{port}{path}",
                    headers={"Authorization": f"Bearer {token}"},
                ) as answer,
            ):
                return answer.status, await answer.json()
        finally:
            await runner.cleanup()

    return asyncio.run(go())


# -- the whole story ------------------------------------------------------------------------


def test_purge_lists_then_destroys_due_bodies_and_outputs_while_ledger_and_witness_hold(
    pair: Pair, tmp_path: Path
) -> None:
    t0, real_now = pair.t0, pair.t0 + timedelta(days=40)
    scan = tmp_path / "contract-scan.pdf"
    scan.write_bytes(b"%PDF scanned contract " * 500)
    old = send(pair.jp, t0, [scan])
    deliver(pair.jp, pair.pk, old, t0)
    undelivered = send(pair.jp, t0 + timedelta(minutes=1))
    recent = send(pair.jp, real_now - timedelta(days=2))
    deliver(pair.jp, pair.pk, recent, real_now - timedelta(days=2))

    # pk's officer reads the old bundle into a folder twice (-1 copies), discloses it
    # internally, and reads the recent one yesterday.
    reads = tmp_path / "reads"
    reads.mkdir()
    for minutes in (60, 61):
        read_bundle(
            NodeContext(pair.pk.node, pair.pk.keyring),
            PK_OFFICER,
            old.bundle_id,
            out_dir=reads,
            now=t0 + timedelta(minutes=minutes),
        )
    package = tmp_path / "for-beoe"
    consent_disclosure.disclose(
        NodeContext(pair.pk.node, pair.pk.keyring),
        PK_OFFICER,
        [old.bundle_id],
        "beoe",
        "return assistance",
        package,
        now=t0 + timedelta(hours=2),
    )
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring),
        PK_OFFICER,
        recent.bundle_id,
        out_dir=fresh,
        now=real_now - timedelta(days=1),
    )
    old_files = sorted(str(p) for p in (*reads.iterdir(), *package.rglob("*")) if p.is_file())
    assert {p.name for p in reads.iterdir()} == {
        f"{old.bundle_id}.json",
        f"{old.bundle_id}-1.json",
        "contract-scan.pdf",
        "contract-scan-1.pdf",
    }
    assert set(outputs(pair.pk)) == set(old_files) | {str(p) for p in fresh.iterdir()}
    moved = reads / f"{old.bundle_id}-1.json"
    moved.rename(tmp_path / "moved-away.json")  # the officer moved one copy away

    # Each side witnesses the other's ledger before anything is purged.
    witness(pair.jp, pair.pk, t0 + timedelta(hours=3))
    witness(pair.pk, pair.jp, t0 + timedelta(hours=3))
    pk_size_before = len(entries(pair.pk))
    old_envelope = envelope_path(pair.pk.blob_dir, old.envelope_sha256)
    assert old_envelope.is_file()

    # --dry-run lists, changes nothing.
    pk_host = host_env(pair.pk)
    listed = run_json(pk_host, "purge", "--dry-run")
    assert [(b["bundle_id"], b["direction"]) for b in listed["purged"]] == [
        (old.bundle_id, "received")
    ]
    assert sorted(o["path"] for o in listed["outputs"]) == old_files
    assert {o["outcome"] for o in listed["outputs"]} == {"due"}
    human = run(pk_host, "purge", "--dry-run")
    assert f"would purge received {old.bundle_id}" in human.stdout
    assert old_envelope.is_file()
    assert not purged_rows(pair.pk)
    assert len(entries(pair.pk)) == pk_size_before

    # purge destroys the due body and the due outputs, and says what it did.
    done = run_json(pk_host, "purge")
    assert [b["bundle_id"] for b in done["purged"]] == [old.bundle_id]
    assert not old_envelope.exists()
    assert envelope_path(pair.pk.blob_dir, recent.envelope_sha256).is_file()
    outcomes = {o["path"]: o["outcome"] for o in done["outputs"]}
    assert outcomes.pop(str(moved)) == "missing"
    assert set(outcomes.values()) == {"deleted"}
    assert not any(Path(p).exists() for p in old_files)
    assert not package.exists()  # the disclosure folder the node made is gone with its files
    assert reads.is_dir()
    assert not any(reads.iterdir())
    assert [p.name for p in fresh.iterdir()]  # not due yet
    states = outputs(pair.pk)
    assert states[str(moved)] == "missing"
    assert {states[p] for p in old_files if p != str(moved)} == {"deleted"}
    assert {states[str(p)] for p in fresh.iterdir()} == {"present"}

    (purged_entry,) = entries(pair.pk, "bundle-purged")
    assert purged_entry.bundle_id == old.bundle_id
    assert purged_entry.body["envelope_sha256"] == old.envelope_sha256
    assert purged_entry.body["type"] == "exam-fraud"
    assert purged_entry.body["retention_days"] == ENVELOPE_DAYS
    assert {e.body["command"] for e in entries(pair.pk, "output-purged")} == {"show", "disclose"}
    assert sum(e.body["missing"] for e in entries(pair.pk, "output-purged")) == 1

    # The sender purges its own copy; the undelivered bundle survives.
    jp_host = host_env(pair.jp)
    jp_done = run_json(jp_host, "purge")
    assert [b["bundle_id"] for b in jp_done["purged"]] == [old.bundle_id]
    assert [(b["bundle_id"], b["verdict"]) for b in jp_done["held"]] == [
        (undelivered.bundle_id, "undelivered")
    ]
    assert envelope_path(pair.jp.blob_dir, undelivered.envelope_sha256).is_file()
    assert not envelope_path(pair.jp.blob_dir, old.envelope_sha256).exists()

    # show answers "purged on <date>" (exit 1; API 410); listings say purged.
    pk_officer = officer_env(pair.pk, "amina")
    shown = run(pk_officer, "show", old.bundle_id)
    assert shown.exit_code == 1
    assert f"purged on {real_now:%Y-%m-%d}" in shown.stderr
    as_json = run(pk_officer, "--json", "show", old.bundle_id)
    assert json.loads(as_json.stdout)["error"]["reason"] == "bundle.purged"
    assert run(pk_officer, "show", recent.bundle_id).exit_code == 0
    refused = run(
        pk_officer,
        "disclose",
        old.bundle_id,
        "--recipient",
        "beoe",
        "--purpose",
        "again",
        "--out",
        str(tmp_path / "again"),
    )
    assert refused.exit_code == 1
    assert "purged on" in refused.stderr
    status, body = api_get(pair.pk, pk_officer["GATEWAY_TOKEN"], f"/api/v1/bundles/{old.bundle_id}")
    assert (status, body["error"]["reason"]) == (410, "bundle.purged")
    status, body = api_get(pair.pk, pk_officer["GATEWAY_TOKEN"], "/api/v1/inbox")
    assert status == 200
    listed_purged = {b["bundle_id"]: b["purged"] for b in body["bundles"]}
    assert listed_purged[recent.bundle_id] is None
    assert listed_purged[old.bundle_id].startswith(f"{real_now:%Y-%m-%d}")
    inbox = run_json(pk_officer, "inbox")
    assert {b["bundle_id"]: b["purged"] is not None for b in inbox["bundles"]} == {
        old.bundle_id: True,
        recent.bundle_id: False,
    }
    assert "purged " in run(pk_officer, "inbox").stdout
    jp_outbox = run_json(officer_env(pair.jp, "kenji"), "outbox")
    assert {
        b["bundle_id"]: (b["state"], b["purged"] is not None) for b in jp_outbox["bundles"]
    } == {
        old.bundle_id: ("delivered", True),
        undelivered.bundle_id: ("queued", False),
        recent.bundle_id: ("delivered", False),
    }

    # The ledger lost nothing: both verify, the export shows the purge, each peer's audit passes.
    assert_ledger_verifies(pair.pk)
    assert_ledger_verifies(pair.jp)
    export = tmp_path / "pk-ledger.jsonl"
    with pair.pk.node.db.transaction() as session, export.open("wb") as out:
        ledger_export.export(session, "jsonl", out)
    kinds = [json.loads(line)["kind"] for line in export.read_text().splitlines()]
    assert kinds.count("bundle-purged") == 1
    assert kinds.count("output-purged") == 2
    later = utc_now()
    assert audit(pair.jp, pair.pk, later).consistent
    assert audit(pair.pk, pair.jp, later).consistent

    # Again: nothing more to do, nothing recorded twice.
    size = len(entries(pair.pk))
    again = run_json(pk_host, "purge")
    assert (again["purged"], again["outputs"], again["completed"]) == ([], [], [])
    assert len(entries(pair.pk)) == size


# -- the rules at their edges, with the clock as a parameter ---------------------------------


def test_undelivered_bundle_survives_purge_and_goes_after_its_receipt(pair: Pair) -> None:
    t0 = pair.t0
    queued = send(pair.jp, t0)
    policy = load_policy(pair.jp.node.settings).retention
    due = t0 + timedelta(days=ENVELOPE_DAYS, minutes=1)
    report = retention.purge(pair.jp.node, policy, now=due)
    assert [(d.bundle.bundle_id, d.verdict.value) for d in report.held] == [
        (queued.bundle_id, "undelivered")
    ]
    assert not report.purged
    assert not entries(pair.jp, "bundle-purged")
    assert envelope_path(pair.jp.blob_dir, queued.envelope_sha256).is_file()
    # The peer's receipt arrives at last; the next pass purges it.
    deliver(pair.jp, pair.pk, queued, due)
    after = retention.purge(pair.jp.node, policy, now=due + timedelta(minutes=1))
    assert [d.bundle.bundle_id for d in after.purged] == [queued.bundle_id]
    assert not envelope_path(pair.jp.blob_dir, queued.envelope_sha256).exists()


def test_nothing_is_due_a_moment_before_the_period_ends(pair: Pair) -> None:
    t0 = pair.t0
    sent = send(pair.jp, t0)
    deliver(pair.jp, pair.pk, sent, t0)
    policy = load_policy(pair.pk.node.settings).retention
    end = t0 + timedelta(days=ENVELOPE_DAYS)
    early = retention.purge(pair.pk.node, policy, now=end - timedelta(microseconds=1))
    assert (early.purged, early.held) == ([], [])
    on_time = retention.purge(pair.pk.node, policy, now=end)
    assert [d.bundle.bundle_id for d in on_time.purged] == [sent.bundle_id]


def test_unapplied_consent_bundle_is_kept_past_its_period(pair: Pair) -> None:
    t0 = pair.t0
    case = send(pair.jp, t0)
    deliver(pair.jp, pair.pk, case, t0)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring),
        PK_OFFICER,
        [case.bundle_id],
        "Embassy of Example",
        "visa screening",
        now=t0,
    )
    with pair.pk.node.db.transaction() as session:
        sha = session.scalars(
            select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == asked.bundle_id)
        ).one()
    # Received by jp's inbox but not applied to jp's consent state yet.
    receive_envelope(
        NodeContext(pair.jp.node, pair.jp.keyring), envelope_path(pair.pk.blob_dir, sha), now=t0
    )
    policy = load_policy(pair.jp.node.settings).retention
    due = t0 + timedelta(days=ENVELOPE_DAYS + 1)
    report = retention.purge(pair.jp.node, policy, now=due)
    held = {d.bundle.bundle_id: d.verdict.value for d in report.held}
    assert held[asked.bundle_id] == "consent-pending"
    consent_receive.apply_pending(NodeContext(pair.jp.node, pair.jp.keyring), now=due)
    after = retention.purge(pair.jp.node, policy, now=due + timedelta(minutes=1))
    assert asked.bundle_id in {d.bundle.bundle_id for d in after.purged}


# -- all or nothing per bundle, and idempotent ----------------------------------------------


def test_failure_inside_a_bundles_step_leaves_it_untouched_and_a_rerun_purges_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = pair.t0
    first, second = send(pair.jp, t0), send(pair.jp, t0 + timedelta(seconds=1))
    deliver(pair.jp, pair.pk, first, t0)
    deliver(pair.jp, pair.pk, second, t0 + timedelta(seconds=1))
    policy = load_policy(pair.pk.node.settings).retention
    when = t0 + timedelta(days=ENVELOPE_DAYS + 1)
    real_record = ledger.record_event
    calls: list[str] = []

    def fail_on_second(session: Any, **kwargs: Any) -> Any:
        calls.append(str(kwargs.get("bundle_id")))
        if kwargs.get("bundle_id") == second.bundle_id:
            raise StorageError("the database went away")
        return real_record(session, **kwargs)

    monkeypatch.setattr(retention.ledger, "record_event", fail_on_second)
    with pytest.raises(StorageError):
        retention.purge(pair.pk.node, policy, now=when)
    # The first bundle is purged completely; the second is as it was.
    assert set(purged_rows(pair.pk)) == {first.bundle_id}
    assert not envelope_path(pair.pk.blob_dir, first.envelope_sha256).exists()
    assert envelope_path(pair.pk.blob_dir, second.envelope_sha256).is_file()
    assert [e.bundle_id for e in entries(pair.pk, "bundle-purged")] == [first.bundle_id]
    monkeypatch.setattr(retention.ledger, "record_event", real_record)
    rerun = retention.purge(pair.pk.node, policy, now=when)
    assert [d.bundle.bundle_id for d in rerun.purged] == [second.bundle_id]
    assert [e.bundle_id for e in entries(pair.pk, "bundle-purged")] == [
        first.bundle_id,
        second.bundle_id,
    ]
    assert_ledger_verifies(pair.pk)


def _purge_process(side: Side, crash_at: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(host_env(side), GATEWAY_CRASH_AT=crash_at, PYTHONPATH=str(REPO))
    if "GATEWAY_TEST_PG_URL" in os.environ:
        env["GATEWAY_TEST_PG_URL"] = os.environ["GATEWAY_TEST_PG_URL"]
    return subprocess.run(  # noqa: PLW1510 - the exit status is the point
        [*GATEWAY, "purge"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_purge_killed_after_its_commit_is_finished_by_the_next_run(pair: Pair) -> None:
    """SIGKILL between the commit and the file's destruction: the bundle reads as
    purged at once, and the next run destroys the file, recording nothing twice."""
    sent = send(pair.jp, pair.t0)
    deliver(pair.jp, pair.pk, sent, pair.t0)
    killed = _purge_process(pair.pk, "after-purge-commit")
    assert killed.returncode == -9, killed.stderr
    body = envelope_path(pair.pk.blob_dir, sent.envelope_sha256)
    assert body.is_file()  # committed, not destroyed yet
    assert set(purged_rows(pair.pk)) == {sent.bundle_id}
    with pytest.raises(retention.BundlePurged, match="purged on"):
        read_bundle(
            NodeContext(pair.pk.node, pair.pk.keyring),
            PK_OFFICER,
            sent.bundle_id,
            out_dir=None,
            now=utc_now(),
        )
    done = run_json(host_env(pair.pk), "purge")
    assert (done["purged"], done["completed"]) == ([], [sent.bundle_id])
    assert not body.exists()
    assert len(entries(pair.pk, "bundle-purged")) == 1
    assert_ledger_verifies(pair.pk)


def test_output_purge_killed_midway_is_recorded_as_deleted_by_the_next_run(
    pair: Pair, tmp_path: Path
) -> None:
    sent = send(pair.jp, pair.t0)
    deliver(pair.jp, pair.pk, sent, pair.t0)
    out = tmp_path / "reads"
    out.mkdir()
    read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring),
        PK_OFFICER,
        sent.bundle_id,
        out_dir=out,
        now=pair.t0,
    )
    killed = _purge_process(pair.pk, "before-output-record")
    assert killed.returncode == -9, killed.stderr
    assert not any(out.iterdir())  # deleted, but not yet recorded as such
    assert set(outputs(pair.pk).values()) == {"deleting"}
    done = run_json(host_env(pair.pk), "purge")
    assert [o["outcome"] for o in done["outputs"]] == ["deleted"]
    assert set(outputs(pair.pk).values()) == {"deleted"}
    (entry,) = entries(pair.pk, "output-purged")
    assert (entry.body["deleted"], entry.body["missing"]) == (1, 0)


@pytest.mark.parametrize("reader", ["show", "disclose"])
def test_a_read_overtaken_by_a_purge_says_purged(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """The purge commits and destroys the file after the reader looked the bundle up and
    before it opened the envelope: the reader answers "purged", not "missing" or "tampered"."""
    sent = send(pair.jp, pair.t0)
    deliver(pair.jp, pair.pk, sent, pair.t0)
    policy = load_policy(pair.pk.node.settings).retention
    due = pair.t0 + timedelta(days=ENVELOPE_DAYS)

    def purge_first(real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            if not purged_rows(pair.pk):
                retention.purge(pair.pk.node, policy, now=due)
            return real(*args, **kwargs)

        return step

    if reader == "show":
        # read_bundle reads the policy (ctx.policy) between its look-up and opening the envelope.
        monkeypatch.setattr(PolicyCache, "get", purge_first(PolicyCache.get))
        with pytest.raises(retention.BundlePurged, match="purged on"):
            read_bundle(
                NodeContext(pair.pk.node, pair.pk.keyring),
                PK_OFFICER,
                sent.bundle_id,
                out_dir=None,
                now=due,
            )
    else:
        # disclose reads the pinned peer once it decided, just before decrypting.
        monkeypatch.setattr(
            consent_disclosure, "peer_manifest", purge_first(consent_disclosure.peer_manifest)
        )
        out = tmp_path / "package"
        with pytest.raises(retention.BundlePurged, match="purged on"):
            consent_disclosure.disclose(
                NodeContext(pair.pk.node, pair.pk.keyring),
                PK_OFFICER,
                [sent.bundle_id],
                "beoe",
                "return assistance",
                out,
                now=due,
            )
        assert not out.exists()
    assert set(purged_rows(pair.pk)) == {sent.bundle_id}
    assert not entries(pair.pk, "bundle-read")


# -- decrypted outputs: only what the node wrote is deleted ----------------------------------


@pytest.mark.parametrize(
    ("change", "state"),
    [
        ("untouched", "deleted"),
        ("removed", "missing"),
        ("overwritten", "changed"),
        ("replaced-by-link", "changed"),
        ("folder-swapped-for-a-link", "missing"),
    ],
)
def test_due_output_is_deleted_only_if_it_still_holds_what_was_written(
    pair: Pair, tmp_path: Path, change: str, state: str
) -> None:
    sent = send(pair.jp, pair.t0)
    deliver(pair.jp, pair.pk, sent, pair.t0)
    out = tmp_path / "reads"
    out.mkdir()
    shown = read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring),
        PK_OFFICER,
        sent.bundle_id,
        out_dir=out,
        now=pair.t0,
    )
    (written,) = shown.written
    other = tmp_path / "officer-notes.txt"
    other.write_text("the officer's own notes")
    if change == "removed":
        written.unlink()
    elif change == "overwritten":
        written.write_text("the officer's own notes, same name")
    elif change == "replaced-by-link":
        written.unlink()
        written.symlink_to(other)
    elif change == "folder-swapped-for-a-link":
        # Someone who can write the parent moves the folder away and points its name
        # at another folder holding a file of the same name: never followed.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / written.name).write_bytes(written.read_bytes())
        out.rename(tmp_path / "reads-moved")
        out.symlink_to(elsewhere)
    policy = load_policy(pair.pk.node.settings).retention
    report = retention.purge(
        pair.pk.node, policy, now=pair.t0 + timedelta(days=OUTPUT_DAYS, seconds=1)
    )
    assert [o.outcome for o in report.outputs] == [state]
    assert outputs(pair.pk) == {str(written): state}
    assert other.read_text() == "the officer's own notes"
    if change == "folder-swapped-for-a-link":
        assert (tmp_path / "elsewhere" / written.name).is_file()  # not deleted through the link
        assert (tmp_path / "reads-moved" / written.name).is_file()
    elif state == "changed":
        assert os.path.lexists(written)  # not ours any more: left alone
    else:
        assert not os.path.lexists(written)


def test_api_reads_leave_nothing_to_track(pair: Pair) -> None:
    sent = send(pair.jp, pair.t0)
    deliver(pair.jp, pair.pk, sent, pair.t0)
    token = officer_env(pair.pk, "amina")["GATEWAY_TOKEN"]
    status, body = api_get(pair.pk, token, f"/api/v1/bundles/{sent.bundle_id}?attachments=true")
    assert (status, body["bundle_id"]) == (200, sent.bundle_id)
    with pair.pk.node.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(DecryptedOutput)) == 0


def _seal_under_id(side: Side, description: str, out: Path, when: datetime) -> str:
    """Seal a case whose bundle id is pinned (the first 16 random bytes), the rest fresh."""
    draws = iter([b"\x42" * 16])

    def random(n: int) -> bytes:
        return next(draws, None) or os.urandom(n)

    case = json.loads((EXAMPLES / "exam-fraud.json").read_text())
    with side.node.db.transaction() as session:
        peer = pinned_peer_manifest(session)
    assert peer is not None
    with out.open("w+b") as handle:
        sealed = seal(
            handle,
            case_type="exam-fraud",
            case={**case, "description": description},
            keyring=side.keyring,
            peer_manifest=peer,
            policy=load_policy(side.node.settings),
            sequence=1,
            now=when,
            random=random,
        )
    return sealed.bundle_id


def test_equivocation_evidence_body_goes_with_the_purged_bundle_and_its_header_stays(
    pair: Pair, tmp_path: Path
) -> None:
    t0 = pair.t0
    first = _seal_under_id(pair.jp, "as first sent", tmp_path / "a", t0)
    assert _seal_under_id(pair.jp, "another story", tmp_path / "b", t0) == first
    receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), tmp_path / "a", now=t0)
    with pytest.raises(EquivocationRefused):
        receive_envelope(NodeContext(pair.pk.node, pair.pk.keyring), tmp_path / "b", now=t0)
    with pair.pk.node.db.transaction() as session:
        (record,) = session.scalars(select(Equivocation)).all()
    evidence = envelope_path(pair.pk.blob_dir, record.other_envelope_sha256)
    assert evidence.is_file()
    policy = load_policy(pair.pk.node.settings).retention
    retention.purge(pair.pk.node, policy, now=t0 + timedelta(days=ENVELOPE_DAYS))
    assert not evidence.exists()
    assert not envelope_path(pair.pk.blob_dir, record.first_envelope_sha256).exists()
    with pair.pk.node.db.transaction() as session:
        (kept,) = session.scalars(select(Equivocation)).all()
    assert kept.other_header == record.other_header  # the signed header still proves it
    (entry,) = entries(pair.pk, "bundle-purged")
    assert entry.body["equivocation_evidence_sha256"] == [record.other_envelope_sha256]
    assert_ledger_verifies(pair.pk)


# -- destroying an envelope file --------------------------------------------------------------


def test_destroyed_envelope_has_its_sealed_keys_overwritten_before_it_is_unlinked(
    pair: Pair, tmp_path: Path
) -> None:
    """A second link to the same inode (a stray hard link, a snapshot tool's) shows what
    stays on the disk: the header with the sealed content keys is zeros, so the ciphertext
    left behind opens with no key of the node."""
    from gateway.store.models_exchange import destroy_envelope_file  # noqa: PLC0415

    sent = send(pair.jp, pair.t0)
    path = envelope_path(pair.jp.blob_dir, sent.envelope_sha256)
    original = path.read_bytes()
    header_end = 14 + int.from_bytes(original[10:14], "big") + 64
    witness_link = tmp_path / "other-link"
    os.link(path, witness_link)
    assert destroy_envelope_file(pair.jp.blob_dir, sent.envelope_sha256)
    assert not path.exists()
    left = witness_link.read_bytes()
    assert left[:header_end] == bytes(header_end)
    assert left[header_end:] == original[header_end:]
    assert not destroy_envelope_file(pair.jp.blob_dir, sent.envelope_sha256)  # idempotent


# -- serve housekeeping ------------------------------------------------------------------------


def test_serve_housekeeping_runs_the_purge_under_the_policy_on_disk(pair: Pair) -> None:
    sent = send(pair.jp, pair.t0)
    deliver(pair.jp, pair.pk, sent, pair.t0)

    async def one_pass() -> None:
        stop = asyncio.Event()

        def clock() -> datetime:
            stop.set()  # read once per pass: this pass is the last
            return pair.t0 + timedelta(days=ENVELOPE_DAYS + 1)

        await enforce_retention(pair.pk.node, stop, interval=3600, clock=clock)

    asyncio.run(asyncio.wait_for(one_pass(), timeout=60))
    assert set(purged_rows(pair.pk)) == {sent.bundle_id}
    (entry,) = entries(pair.pk, "bundle-purged")
    assert (entry.actor_name, entry.actor_role) == ("system", None)


def _stored_body(side: Side, bundle_id: str) -> bytes | None:
    with side.node.db.transaction() as session:
        body = session.scalar(
            select(InboxEntry.envelope_body).where(InboxEntry.bundle_id == bundle_id)
        )
    return None if body is None else bytes(body)


def test_inline_and_file_envelopes_both_show_back_up_restore_and_purge(
    pair: Pair, tmp_path: Path, database_url: str, pg_database_factory: Callable[[], str]
) -> None:
    """A small envelope lives in its inbox row, a large one in the envelope store: both
    decrypt, both survive backup and restore, and a purge removes both bodies."""
    keep_envelopes_inline(pair.pk.node, 64 * 1024)
    scan = tmp_path / "contract-scan.pdf"
    scan.write_bytes(os.urandom(200 * 1024))  # above the threshold: a file
    small = send(pair.jp, pair.t0)
    large = send(pair.jp, pair.t0, [scan])
    for sent in (small, large):
        deliver(pair.jp, pair.pk, sent, pair.t0)

    small_file = envelope_path(pair.pk.blob_dir, small.envelope_sha256)
    large_file = envelope_path(pair.pk.blob_dir, large.envelope_sha256)
    inline = _stored_body(pair.pk, small.bundle_id)
    assert inline is not None
    assert hashlib.sha256(inline).hexdigest() == small.envelope_sha256
    assert not small_file.exists()  # no file, no link, no fsync for it
    assert _stored_body(pair.pk, large.bundle_id) is None
    assert hashlib.sha256(large_file.read_bytes()).hexdigest() == large.envelope_sha256

    shown = tmp_path / "shown"
    shown.mkdir()
    for sent in (small, large):
        read = read_bundle(
            NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, sent.bundle_id, out_dir=shown,
            now=utc_now(), track_outputs=False,
        )  # fmt: skip
        case = json.loads((EXAMPLES / "exam-fraud.json").read_text())
        assert {k: v for k, v in read.case.items() if k in case} == case
    assert (shown / "contract-scan.pdf").read_bytes() == scan.read_bytes()

    archive = tmp_path / "pk.gwbackup"
    make_backup(
        pair.pk.node.settings, passphrase=PASSPHRASE.encode(), out=archive, now=utc_now(),
        environ={},
    )  # fmt: skip
    restored_db = None if database_url.startswith("sqlite") else pg_database_factory()
    report = restore_backup(
        archive, tmp_path / "restored", passphrase=PASSPHRASE.encode(), db_url=restored_db
    )
    settings = load_settings(home=report.home, environ={})
    with Node.open(settings) as restored:
        with restored.db.transaction() as session:
            ring = unlock_keyring(settings, PASSPHRASE.encode(), session, now=utc_now())
        again = tmp_path / "again"
        again.mkdir()
        for sent in (small, large):
            read_bundle(
                NodeContext(restored, ring), PK_OFFICER, sent.bundle_id, out_dir=again, now=utc_now(),
                track_outputs=False,
            )  # fmt: skip
        assert (again / "contract-scan.pdf").read_bytes() == scan.read_bytes()

    policy = load_policy(pair.pk.node.settings).retention
    done = retention.purge(pair.pk.node, policy, now=utc_now())
    assert {d.bundle.bundle_id for d in done.purged} >= {small.bundle_id, large.bundle_id}
    assert _stored_body(pair.pk, small.bundle_id) is None  # the inline body is gone
    assert not large_file.exists()
    for sent in (small, large):
        with pytest.raises(retention.BundlePurged):
            read_bundle(
                NodeContext(pair.pk.node, pair.pk.keyring), PK_OFFICER, sent.bundle_id, out_dir=None,
                now=utc_now(),
            )  # fmt: skip
    assert_ledger_verifies(pair.pk)
