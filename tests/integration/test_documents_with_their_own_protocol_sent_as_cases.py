"""Class: documents that have their own protocol, sent as cases.

Consent requests, grants, denials and revocations (and the node's own
refusal notices) have their own commands, which stamp the acting officer and
check the items. ``send`` (core, CLI, local API) refuses them. A peer that
posts one anyway (an older or faulty node) gets it refused on arrival when
it does not fit (items never sent, a request never made), and learns of the
refusal: a signed ``bundle-refusal`` notice travels back through the outbox
and shows on the refused bundle in ``outbox`` (CLI and API).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select

from gateway.core.cases import CASE_TYPES
from gateway.core.envelope import seal
from gateway.errors import GatewayError
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent import queries as consent_queries
from gateway.node.context import NodeContext
from gateway.node.outbox import Sealed, queue_sealed, send_case
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.store.models_exchange import OutboxEntry
from tests.exchange_pair import (
    Pair,
    Side,
    example,
    pair,  # noqa: F401 - the shared fixture
)

PROTOCOL = ["consent-request", "consent-grant", "consent-denial", "consent-revocation"]
NEVER_SEEN = "0f0f0f0f-0000-4000-8000-000000000002"


def _queued(side: Side, case_type: str | None = None) -> list[OutboxEntry]:
    with side.node.db.transaction() as session:
        query = select(OutboxEntry).order_by(OutboxEntry.id)
        if case_type is not None:
            query = query.where(OutboxEntry.case_type == case_type)
        return list(session.scalars(query))


def _core(pair: Pair, case_type: str, case: dict[str, Any], _t: Path) -> str:
    try:
        send_case(
            NodeContext(pair.jp.node, pair.jp.keyring), pair.jp.officer, case_type, case, [],
            public=False, reply_to=None, now=utc_now(),
        )  # fmt: skip
    except GatewayError as exc:
        return f"refused: {exc.message}"
    return "accepted"


def _cli(pair: Pair, case_type: str, case: dict[str, Any], tmp: Path) -> str:
    path = tmp / f"{case_type}-{uuid.uuid4()}.json"
    path.write_text(json.dumps(case))
    done = pair.jp.cli("send", case_type, str(path))
    if done.exit_code == 0:
        return "accepted"
    assert done.exit_code == 1, done.output
    return f"refused: {done.stderr}"


def _api(pair: Pair, case_type: str, case: dict[str, Any], _t: Path) -> str:
    (answer,) = pair.jp.api([("POST", "/api/v1/bundles", {"type": case_type, "case": case})])
    if answer.status == 201:
        return "accepted"
    assert answer.status == 422, answer.text
    return f"refused: {answer.body['error']['message']}"


SENDERS = [("core send_case", _core), ("CLI send", _cli), ("API POST /api/v1/bundles", _api)]


def test_documents_with_their_own_protocol_sent_as_cases(pair: Pair, tmp_path: Path) -> None:
    """send refuses every protocol type through every entry point; nothing is queued."""
    protocol = [t for t in CASE_TYPES if t.startswith(("consent-", "bundle-"))]
    assert set(PROTOCOL) <= set(protocol)
    wrong: dict[str, str] = {}
    for where, send in SENDERS:
        for case_type in protocol:
            case = example(case_type) if case_type in PROTOCOL else {}
            outcome = send(pair, case_type, case, tmp_path)
            if not outcome.startswith("refused") or "own protocol" not in outcome:
                wrong[f"{where} {case_type}"] = outcome
    assert wrong == {}
    assert _queued(pair.jp) == []


# -- a peer that sends them anyway ---------------------------------------------------------


def _hand_made(
    side: Side, case_type: str, case: dict[str, Any], *, reply_to: str | None = None
) -> str:
    """Queue a protocol bundle the way a node without the send check did: sealed,
    signed and delivered like any case, with whatever the file said."""
    with side.node.db.transaction() as session:
        peer = pinned_peer_manifest(session)
    assert peer is not None
    policy = load_policy(side.node.settings)

    def sealer(out: BinaryIO, *, sequence: int) -> Sealed:
        sealed = seal(
            out, case_type=case_type, case=case, keyring=side.keyring, peer_manifest=peer,
            policy=policy, sequence=sequence, now=utc_now(), reply_to=reply_to,
        )  # fmt: skip
        return Sealed(bundle_id=sealed.bundle_id, marking=sealed.header.marking)

    return queue_sealed(
        side.node, actor=side.officer, recipient=peer.node, case_type=case_type,
        reply_to=reply_to, seal=sealer, now=utc_now(),
    ).bundle_id  # fmt: skip


def _cases(pair: Pair) -> dict[str, Any]:
    """Bundles on record: one jp sent pk, one pk sent jp."""
    from_jp = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring), pair.jp.officer, "exam-fraud", example("exam-fraud"), [],
        public=False, reply_to=None, now=utc_now(),
    ).bundle_id  # fmt: skip
    pair.pk.receive_from(pair.jp, from_jp)
    from_pk = send_case(
        NodeContext(pair.pk.node, pair.pk.keyring), pair.pk.officer, "exam-fraud", example("exam-fraud"), [],
        public=False, reply_to=None, now=utc_now(),
    ).bundle_id  # fmt: skip
    pair.jp.receive_from(pair.pk, from_pk)
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), pair.pk.officer, [from_jp], "Embassy of Example",
        "screening", now=utc_now(),
    ).bundle_id  # fmt: skip
    pair.jp.receive_from(pair.pk, asked)
    return {"from_jp": from_jp, "from_pk": from_pk, "pk_protocol": asked}


def _with(case_type: str, **changes: Any) -> dict[str, Any]:
    return {**example(case_type), **changes}


# What jp hand-makes and posts to pk, which pk must refuse on arrival.
REFUSED_ON_ARRIVAL: list[tuple[str, str, Callable[[dict[str, str]], dict[str, Any]]]] = [
    ("grant answering no request pk made", "consent-grant",
     lambda ids: _with("consent-grant", items=[ids["from_jp"]])),
    ("request for a bundle that does not exist", "consent-request",
     lambda ids: _with("consent-request", items=[NEVER_SEEN])),
    ("request for a bundle pk received, never sent", "consent-request",
     lambda ids: _with("consent-request", items=[ids["from_jp"]])),
    ("denial of a request pk never made", "consent-denial",
     lambda ids: _with("consent-denial", items=[ids["from_pk"]])),
    ("request about pk's own consent request, not a case", "consent-request",
     lambda ids: _with("consent-request", items=[ids["pk_protocol"]])),
]  # fmt: skip


def _refusals_shown(side: Side, bundle_id: str) -> dict[str, Any]:
    """What jp's outbox says of ``bundle_id``: CLI --json, CLI text, API."""
    as_json = side.cli("--json", "outbox")
    as_text = side.cli("outbox")
    (answer,) = side.api([("GET", "/api/v1/outbox", None)])
    assert as_json.exit_code == 0, as_json.output
    assert answer.status == 200, answer.text

    def row(rows: list[dict[str, Any]]) -> dict[str, Any]:
        (found,) = [r for r in rows if r["bundle_id"] == bundle_id]
        return found

    text_line = [line for line in as_text.stdout.splitlines() if line.startswith(bundle_id)]
    return {
        "cli": row(json.loads(as_json.stdout)["bundles"]).get("refused_by_peer"),
        "api": row(answer.body["bundles"]).get("refused_by_peer"),
        "text": text_line[0] if text_line else "",
    }


def test_documents_with_their_own_protocol_sent_as_cases_are_refused_and_the_sender_learns(
    pair: Pair,
) -> None:
    """Peer API: pk refuses each misfit on arrival (no pending request, no consent), and
    a signed refusal travels back to jp's outbox, shown by the CLI and the API."""
    ids = _cases(pair)
    wrong: dict[str, Any] = {}
    for name, case_type, build in REFUSED_ON_ARRIVAL:
        bundle = _hand_made(pair.jp, case_type, build(ids))
        pair.pk.receive_from(pair.jp, bundle)
        listed = consent_queries.list_consents(
            NodeContext(pair.pk.node, pair.pk.keyring), now=utc_now()
        )
        if [r for r in listed["requests"] if r["request_id"] == bundle] or listed["consents"]:
            wrong[f"{name}: recorded by pk"] = listed
        notices = [e for e in _queued(pair.pk, "bundle-refusal") if e.reply_to == bundle]
        if len(notices) != 1:
            wrong[f"{name}: notices queued by pk"] = len(notices)
            continue
        pair.jp.receive_from(pair.pk, notices[0].bundle_id)
        shown = _refusals_shown(pair.jp, bundle)
        if not (shown["cli"] and shown["cli"] == shown["api"] and shown["cli"]["reason"]):
            wrong[f"{name}: jp's outbox"] = shown
        elif f"refused by pk: {shown['cli']['reason']}" not in shown["text"]:
            wrong[f"{name}: jp's outbox text"] = shown["text"]
    assert wrong == {}


def test_a_fitting_request_is_applied_and_no_refusal_travels(pair: Pair) -> None:
    """The control: pk's own consent command asks about jp's bundle (in ``_cases``);
    jp records it pending and sends nothing back; pk's outbox shows no refusal."""
    asked = _cases(pair)["pk_protocol"]
    listed = consent_queries.list_consents(
        NodeContext(pair.jp.node, pair.jp.keyring), now=utc_now()
    )
    (request,) = [r for r in listed["requests"] if r["request_id"] == asked]
    assert (request["status"], request["requesting_officer"]) == ("pending", "bilal")
    assert _queued(pair.jp, "bundle-refusal") == []
    assert _refusals_shown(pair.pk, asked)["cli"] is None


def test_a_refused_refusal_sends_nothing_back(pair: Pair) -> None:
    """No ping-pong: a refusal notice that does not fit (it names pk's bundle with
    another envelope hash) is refused on arrival, and no notice answers it."""
    ids = _cases(pair)
    bogus = _hand_made(
        pair.jp,
        "bundle-refusal",
        {
            "refused_bundle_id": ids["from_pk"],
            "envelope_sha256": "0" * 64,
            "reason": "consent.items-not-sent",
            "detail": "made up",
        },
        reply_to=ids["from_pk"],
    )
    pair.pk.receive_from(pair.jp, bogus)
    assert _queued(pair.pk, "bundle-refusal") == []
    assert _refusals_shown(pair.pk, ids["from_pk"])["cli"] is None
