"""Disclosure accounting, both ways: every line linked to the ledger entries proving it.

pk holds jp's case: it is blocked, asked about, granted, disclosed, revoked
and blocked again; the use travels back to jp. pk's account of what it
holds and jp's account of what pk holds must each tell that story, and each
sequence number given must name a ledger entry of the kind it claims.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from gateway.core import accounting as account_view
from gateway.errors import ConsentRefused, NotFound
from gateway.node import accounting
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.consent import protocol as consent_protocol
from gateway.node.context import NodeContext
from gateway.node.ledger import read as ledger_read
from gateway.node.runtime import utc_now
from tests.exchange_pair import Pair, Side, pair
from tests.integration.test_consent_use import notices

__all__ = ["pair"]

EMBASSY = "Embassy of Example"
PURPOSE = "visa screening"


def kinds_by_seq(side: Side) -> dict[int, str]:
    with side.node.db.transaction() as session:
        return {e.seq: str(e.kind) for e in ledger_read.iter_entries(session)}


def story(pair: Pair, tmp_path: Path) -> tuple[str, str]:
    """The whole consent story on jp's case; returns (case id, consent id)."""
    from gateway.node.outbox import send_case  # noqa: PLC0415
    from tests.exchange_pair import example  # noqa: PLC0415

    jp, pk = pair.jp, pair.pk
    now = utc_now()
    sent = send_case(
        NodeContext(jp.node, jp.keyring), jp.officer, "exam-fraud", example("exam-fraud"), [],
        public=False, reply_to=None, now=now,
    )  # fmt: skip
    pk.receive_from(jp, sent.bundle_id)
    case_id = sent.bundle_id

    def disclose(name: str) -> None:
        consent_disclosure.disclose(
            NodeContext(pk.node, pk.keyring), pk.officer, [case_id], EMBASSY, PURPOSE, tmp_path / name,
            now=utc_now(),
        )  # fmt: skip

    with pytest.raises(ConsentRefused):
        disclose("blocked")
    asked = consent_protocol.request_consent(
        NodeContext(pk.node, pk.keyring), pk.officer, [case_id], EMBASSY, PURPOSE, now=utc_now()
    )
    jp.receive_from(pk, asked.bundle_id)
    granted = consent_protocol.grant(
        NodeContext(jp.node, jp.keyring), jp.officer, asked.request_id,
        valid_until=None, max_uses=3, conditions="", now=utc_now(),
    )  # fmt: skip
    pk.receive_from(jp, granted.bundle_id)
    disclose("allowed")
    for notice in notices(pk):
        jp.receive_from(pk, notice.bundle_id)
    assert granted.consent_id is not None
    revoked = consent_protocol.revoke(
        NodeContext(jp.node, jp.keyring),
        jp.officer,
        granted.consent_id,
        reason="closed",
        now=utc_now(),
    )
    pk.receive_from(jp, revoked.bundle_id)
    with pytest.raises(ConsentRefused):
        disclose("after")
    return case_id, granted.consent_id


def test_each_side_accounts_for_the_whole_story_with_its_ledger_entries(
    pair: Pair, tmp_path: Path
) -> None:
    case_id, consent_id = story(pair, tmp_path)

    with pair.pk.node.db.transaction() as session:
        held_report = accounting.account(session, "pk")
    assert held_report["ours"] == []
    (held,) = held_report["held"]
    pk_kinds = kinds_by_seq(pair.pk)
    assert held["bundle_id"] == case_id
    assert pk_kinds[held["received_seq"]] == "bundle-received"
    assert [(s["kind"], s["consent_id"]) for s in held["shares"]] == [
        ("disclosure-blocked", None),
        ("disclosure-made", consent_id),
        ("disclosure-blocked", None),
    ]
    assert [pk_kinds[s["seq"]] for s in held["shares"]] == [s["kind"] for s in held["shares"]]
    assert pk_kinds[held["shares"][1]["consent_granted_seq"]] == "consent-granted"
    (received,) = held["consents"]
    assert pk_kinds[received["granted_seq"]] == "consent-granted"
    assert pk_kinds[received["revoked_seq"]] == "consent-revoked"

    with pair.jp.node.db.transaction() as session:
        ours_report = accounting.account(session, "jp")
    assert ours_report["held"] == []
    (ours,) = ours_report["ours"]
    jp_kinds = kinds_by_seq(pair.jp)
    assert jp_kinds[ours["sent_seq"]] == "bundle-sent"
    (request,) = ours["requests"]
    assert (request["status"], jp_kinds[request["requested_seq"]]) == (
        "granted",
        "consent-requested",
    )
    (issued,) = ours["consents"]
    assert issued["consent_id"] == consent_id
    assert jp_kinds[issued["granted_seq"]] == "consent-granted"
    assert jp_kinds[issued["revoked_seq"]] == "consent-revoked"
    (use,) = issued["uses"]
    assert (use["use_number"], use["violation"]) == (1, None)
    assert jp_kinds[use["seq"]] == "consent-used"
    assert use["peer_ledger_seq"] == held["shares"][1]["seq"]

    # One bundle, as CSV: one row per event, each with its ledger entry.
    rows = list(csv.DictReader(io.StringIO(account_view.account_csv(ours_report))))
    assert [r["event"] for r in rows] == [
        "sent",
        "consent-requested",
        "consent-granted",
        "consent-used",
        "consent-revoked",
    ]
    assert all(jp_kinds[int(r["ledger_seq"])] in {r["event"], "bundle-sent"} for r in rows)
    text = account_view.account_text(ours_report)
    assert case_id in text
    assert "consent-used" in text


def test_cli_and_api_give_the_account_to_compliance_only(pair: Pair, tmp_path: Path) -> None:
    case_id, consent_id = story(pair, tmp_path)
    shown = pair.pk.cli(
        "ledger", "account", "--bundle", case_id, "--format", "json", role="compliance"
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["held"][0]["bundle_id"] == case_id
    as_csv = pair.jp.cli("ledger", "account", "--format", "csv", role="compliance")
    assert as_csv.exit_code == 0, as_csv.output
    assert as_csv.stdout.startswith(",".join(account_view.CSV_COLUMNS))
    assert consent_id in as_csv.stdout
    text = pair.jp.cli("ledger", "account", role="compliance")
    assert "items of ours held by pk" in text.stdout
    refused = pair.jp.cli("ledger", "account", role="officer")
    assert refused.exit_code != 0
    unknown = pair.jp.cli("ledger", "account", "--bundle", "no-such-bundle", role="compliance")
    assert unknown.exit_code == 1
    assert "no case no-such-bundle" in unknown.stderr

    answers = pair.jp.api(
        [
            ("GET", "/api/v1/ledger/account", None),
            ("GET", f"/api/v1/ledger/account?bundle={case_id}&format=csv", None),
            ("GET", "/api/v1/ledger/account?format=xml", None),
        ],
        role="compliance",
    )
    assert answers[0].status == 200
    assert answers[0].body["ours"][0]["consents"][0]["consent_id"] == consent_id
    assert answers[1].status == 200
    assert answers[1].text.startswith(",".join(account_view.CSV_COLUMNS))
    assert answers[2].status == 422
    (officer,) = pair.jp.api([("GET", "/api/v1/ledger/account", None)], role="officer")
    assert officer.status == 403


def test_unknown_bundle_is_refused_naming_it(pair: Pair) -> None:
    with pair.jp.node.db.transaction() as session, pytest.raises(NotFound, match="no case x-1"):
        accounting.account(session, "jp", bundle="x-1")
