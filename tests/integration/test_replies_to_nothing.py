"""Class: replies to nothing.

A bundle that answers another (an ``information-reply``, or any bundle sent
with ``--reply-to``) must name a bundle that exists on the other side of the
exchange, and say so once: the reply's ``request_bundle_id`` is the one
source of truth, and the envelope's signed ``reply_to`` must equal it. The
sender refuses (core, CLI, local API) a reply that names no information
request received from the peer, that names none at all, or whose
``--reply-to`` contradicts the file; the receiver (peer API) refuses an
envelope whose ``reply_to`` names nothing it sent, storing nothing.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.errors import GatewayError
from gateway.node.bundles import seal_to_file
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.context import NodeContext
from gateway.node.inbox import read_bundle
from gateway.node.outbox import send_case
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.peer.server import node_services
from gateway.store.models_exchange import InboxEntry, OutboxEntry
from tests.exchange_pair import (
    Pair,
    Side,
    example,
    pair,  # noqa: F401 - the shared fixture
)

NEVER_SEEN = "0f0f0f0f-0000-4000-8000-000000000001"


def _count(side: Side, table: Any) -> int:
    with side.node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def _send(side: Side, case_type: str, case: dict[str, Any], reply_to: str | None) -> str:
    return send_case(
        NodeContext(side.node, side.keyring),
        side.officer,
        case_type,
        case,
        [],
        public=False,
        reply_to=reply_to,
        now=utc_now(),
    ).bundle_id


def _reply(request_id: str) -> dict[str, Any]:
    return {**example("information-reply"), "request_bundle_id": request_id}


@pytest.fixture
def exchanged(pair: Pair) -> dict[str, str]:
    """pk asked jp (an information request) and reported a case; jp received both.
    jp also sent pk a request of its own (which jp never *received*)."""
    asked = _send(pair.pk, "information-request", example("information-request"), None)
    pair.jp.receive_from(pair.pk, asked)
    reported = _send(pair.pk, "exam-fraud", example("exam-fraud"), None)
    pair.jp.receive_from(pair.pk, reported)
    own = _send(pair.jp, "information-request", example("information-request"), None)
    return {"request": asked, "case": reported, "own_request": own}


# (name, case type, request_bundle_id in the file, --reply-to, message expected)
REFUSED_AT_SEND = [
    ("reply with no --reply-to, file names an id never seen", "information-reply",
     NEVER_SEEN, None, "names no information-request received"),
    ("reply naming an id never seen in both places", "information-reply",
     NEVER_SEEN, NEVER_SEEN, "names no information-request received"),
    ("--reply-to contradicts the file", "information-reply",
     "request", "case", "contradicts"),
    ("reply to a received bundle that is not a request", "information-reply",
     "case", "case", "names no information-request received"),
    ("reply to our own request (sent, never received)", "information-reply",
     "own_request", "own_request", "names no information-request received"),
    ("any case with --reply-to naming nothing received", "exam-fraud",
     None, NEVER_SEEN, "names no bundle received"),
    ("any case with --reply-to naming our own bundle", "exam-fraud",
     None, "own_request", "names no bundle received"),
]  # fmt: skip


def _resolve(value: str | None, ids: dict[str, str]) -> str | None:
    return ids.get(value, value) if value is not None else None


def _case_for(case_type: str, request: str | None) -> dict[str, Any]:
    if case_type == "information-reply":
        assert request is not None
        return _reply(request)
    return example(case_type)


def _core(pair: Pair, case_type: str, case: dict[str, Any], reply_to: str | None, _t: Path) -> str:
    try:
        _send(pair.jp, case_type, case, reply_to)
    except GatewayError as exc:
        return f"refused: {exc.message}"
    return "accepted"


def _cli(pair: Pair, case_type: str, case: dict[str, Any], reply_to: str | None, t: Path) -> str:
    path = t / f"case-{uuid.uuid4()}.json"
    path.write_text(json.dumps(case))
    args = ["send", case_type, str(path)] + (["--reply-to", reply_to] if reply_to else [])
    done = pair.jp.cli(*args)
    if done.exit_code == 0:
        return "accepted"
    assert done.exit_code == 1, done.output
    return f"refused: {done.stderr}"


def _api(pair: Pair, case_type: str, case: dict[str, Any], reply_to: str | None, _t: Path) -> str:
    body: dict[str, Any] = {"type": case_type, "case": case}
    if reply_to is not None:
        body["reply_to"] = reply_to
    (answer,) = pair.jp.api([("POST", "/api/v1/bundles", body)])
    if answer.status == 201:
        return "accepted"
    assert answer.status in (404, 409, 422), answer.text
    return f"refused: {answer.body['error']['message']}"


SENDERS = [("core send_case", _core), ("CLI send", _cli), ("API POST /api/v1/bundles", _api)]


def test_replies_to_nothing(pair: Pair, exchanged: dict[str, str], tmp_path: Path) -> None:
    """Every entry point that sends refuses each reply to nothing, queueing nothing."""
    wrong: dict[str, str] = {}
    for where, send in SENDERS:
        for name, case_type, request, reply_to, expected in REFUSED_AT_SEND:
            before = _count(pair.jp, OutboxEntry)
            case = _case_for(case_type, _resolve(request, exchanged))
            outcome = send(pair, case_type, case, _resolve(reply_to, exchanged), tmp_path)
            if not outcome.startswith("refused") or expected not in outcome:
                wrong[f"{where}: {name}"] = outcome
            if _count(pair.jp, OutboxEntry) != before:
                wrong[f"{where}: {name} (queued)"] = "a bundle was queued"
    assert wrong == {}


def test_replies_to_nothing_answer_when_they_name_a_received_request(
    pair: Pair, exchanged: dict[str, str], tmp_path: Path
) -> None:
    """The control: a reply naming the received request, with or without
    --reply-to, is sent with the envelope's reply_to taken from the file, and
    the peer stores it."""
    request = exchanged["request"]
    for where, send in SENDERS:
        for reply_to in (None, request):
            outcome = send(pair, "information-reply", _reply(request), reply_to, tmp_path)
            assert outcome == "accepted", (where, reply_to, outcome)
    with pair.jp.node.db.transaction() as session:
        replies = session.scalars(
            select(OutboxEntry).where(OutboxEntry.case_type == "information-reply")
        ).all()
        sent = [(row.bundle_id, row.reply_to) for row in replies]
    assert len(sent) == 2 * len(SENDERS)
    assert {reply_to for _id, reply_to in sent} == {request}
    for bundle_id, _reply_to in sent:
        pair.pk.receive_from(pair.jp, bundle_id)
    assert _count(pair.pk, InboxEntry) == len(sent)


# (name, case type, request_bundle_id in the file, header reply_to)
REFUSED_AT_RECEIVE = [
    ("reply without reply_to", "information-reply", "own_request", None),
    ("reply naming a bundle the receiver never sent", "information-reply", NEVER_SEEN, NEVER_SEEN),
    ("reply naming a received bundle, not one sent", "information-reply", "request", "request"),
    ("reply naming a sent bundle that is not a request", "information-reply", "sent_case",
     "sent_case"),
    ("any case replying to a bundle the receiver never sent", "exam-fraud", None, NEVER_SEEN),
]  # fmt: skip


def _hand_sealed(
    sender: Side, tmp_path: Path, case_type: str, case: dict[str, Any], reply_to: str | None
) -> Path:
    """What a faulty or hostile peer could post: signed and sealed, never checked by send."""
    with sender.node.db.transaction() as session:
        peer = pinned_peer_manifest(session)
    assert peer is not None
    target = tmp_path / f"hand-{uuid.uuid4()}.env"
    seal_to_file(
        target,
        case_type=case_type,
        case=case,
        keyring=sender.keyring,
        peer_manifest=peer,
        policy=load_policy(sender.node.settings),
        sequence=10_000 + len(list(tmp_path.glob("hand-*.env"))),
        now=utc_now(),
        reply_to=reply_to,
    )
    return target


def test_replies_to_nothing_are_refused_by_the_receiving_peer(
    pair: Pair, exchanged: dict[str, str], tmp_path: Path
) -> None:
    """Peer API: pk receives what jp never should have sent; nothing is stored."""
    ids = dict(exchanged)
    # pk's view: "own_request" is jp's request pk received; "request" is pk's own;
    # "sent_case" is a case pk sent to jp.
    ids["sent_case"] = exchanged["case"]
    ids["request"] = exchanged["own_request"]
    ids["own_request"] = exchanged["request"]
    pair.pk.receive_from(pair.jp, exchanged["own_request"])
    services = node_services(NodeContext(pair.pk.node, pair.pk.keyring), skew=timedelta(minutes=5))
    wrong: dict[str, str] = {}
    for name, case_type, request, reply_to in REFUSED_AT_RECEIVE:
        case = _case_for(case_type, _resolve(request, ids))
        path = _hand_sealed(pair.jp, tmp_path, case_type, case, _resolve(reply_to, ids))
        before = _count(pair.pk, InboxEntry)
        try:
            services.receive_envelope(path, now=utc_now())
            wrong[name] = "stored"
        except GatewayError as exc:
            if exc.reason != "reply.unknown":
                wrong[name] = f"{type(exc).__name__} {exc.reason}: {exc.message}"
        if _count(pair.pk, InboxEntry) != before:
            wrong[f"{name} (stored)"] = "an inbox row was added"
    assert wrong == {}


def test_replies_to_nothing_a_stored_reply_contradicting_itself_is_never_shown(
    pair: Pair, exchanged: dict[str, str], tmp_path: Path
) -> None:
    """The receiver cannot read the case before storing it; a reply whose signed
    reply_to names pk's request while its case names another is stored, then
    refused by every reader: core and CLI show, API GET, disclose."""
    pair.pk.receive_from(pair.jp, exchanged["own_request"])
    case = _reply(exchanged["case"])  # the case names another bundle than reply_to
    path = _hand_sealed(pair.jp, tmp_path, "information-reply", case, exchanged["request"])
    services = node_services(NodeContext(pair.pk.node, pair.pk.keyring), skew=timedelta(minutes=5))
    services.receive_envelope(path, now=utc_now())
    with pair.pk.node.db.transaction() as session:
        bundle = session.scalars(
            select(InboxEntry.bundle_id).where(InboxEntry.case_type == "information-reply")
        ).one()
    outcomes: dict[str, str] = {}
    try:
        read_bundle(NodeContext(pair.pk.node, pair.pk.keyring), pair.pk.officer, bundle, out_dir=None,
                    now=utc_now())  # fmt: skip
        outcomes["core read_bundle"] = "shown"
    except GatewayError as exc:
        outcomes["core read_bundle"] = exc.reason
    done = pair.pk.cli("show", bundle)
    outcomes["CLI show"] = "shown" if done.exit_code == 0 else f"exit {done.exit_code}"
    (answer,) = pair.pk.api([("GET", f"/api/v1/bundles/{bundle}", None)])
    outcomes["API GET /api/v1/bundles/{id}"] = str(answer.status)
    try:
        consent_disclosure.disclose(NodeContext(pair.pk.node, pair.pk.keyring), pair.pk.officer, [bundle], "beoe",
                         "review", tmp_path / "out", now=utc_now())  # fmt: skip
        outcomes["core disclose"] = "disclosed"
    except GatewayError as exc:
        outcomes["core disclose"] = exc.reason
    assert outcomes == {
        "core read_bundle": "envelope.reply-to",
        "CLI show": "exit 4",
        "API GET /api/v1/bundles/{id}": "422",
        "core disclose": "envelope.reply-to",
    }
    assert not (tmp_path / "out").exists()
