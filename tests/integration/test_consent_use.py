"""Consent uses travel back to the originator (SPEC §8a): exactly once, judged there.

pk holds jp's items and discloses them under jp's consents; each use goes
back to jp as a signed ``consent-use`` notice through the outbox, and jp
records it (``consent-used``) or flags it (``consent-use-violation``) when it
breaks the consent's terms. Notices that break them are made here the way a
faulty or dishonest discloser would: signed by pk's real key, through pk's
real outbox.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.core.consent import format_time
from gateway.core.roles import SYSTEM
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent import queries as consent_queries
from gateway.node.consent import receive as consent_receive
from gateway.node.consent.uses import send_use_notices
from gateway.node.context import NodeContext
from gateway.node.outbox import send_case, send_protocol_bundle
from gateway.node.runtime import utc_now
from gateway.store.models_consent import DisclosureRecord
from gateway.store.models_consent_use import ConsentUseNoticeRecord, ConsentUseReport
from gateway.store.models_exchange import OutboxEntry
from tests.integration.test_consent import (
    EMBASSY,
    NOW,
    PURPOSE,
    Pair,
    Side,
    clock,
    deliver,
    do_disclose,
    entries,
    grant_for,
    pair,
    send_case_to_peer,
)

__all__ = ["clock", "pair"]  # fixtures shared with test_consent


def notices(side: Side) -> list[OutboxEntry]:
    with side.node.db.transaction() as session:
        return list(
            session.scalars(
                select(OutboxEntry)
                .where(OutboxEntry.case_type == "consent-use")
                .order_by(OutboxEntry.id)
            )
        )


def deliver_and_apply(sender: Side, receiver: Side, bundle_id: str) -> list[str]:
    deliver(sender, receiver, bundle_id)
    return consent_receive.apply_pending(NodeContext(receiver.node, receiver.keyring), now=NOW)


def reports(side: Side) -> list[ConsentUseReport]:
    with side.node.db.transaction() as session:
        return list(session.scalars(select(ConsentUseReport).order_by(ConsentUseReport.used_at)))


def forged_notice(pair: Pair, **fields: Any) -> str:
    """A consent-use notice from pk saying what ``fields`` say, signed and queued for real."""
    case = {
        "consent_id": str(uuid.uuid4()),
        "disclosure_id": str(uuid.uuid4()),
        "items": [str(uuid.uuid4())],
        "recipient": EMBASSY,
        "purpose": PURPOSE,
        "used_at": format_time(NOW),
        "use_number": 1,
        "ledger_seq": 7,
        "ledger_entry_hash": "ab" * 32,
        **fields,
    }
    sent = send_protocol_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring), SYSTEM, "consent-use", case, [],
        reply_to=None, now=NOW, in_transaction=lambda _s, _b: None,
    )  # fmt: skip
    return sent.bundle_id


def test_each_use_travels_back_and_the_originator_lists_it(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id], max_uses=3)
    first = do_disclose(pair.pk, [case_id], tmp_path / "out1")
    second = do_disclose(pair.pk, [case_id], tmp_path / "out2")

    sent = notices(pair.pk)
    assert len(sent) == 2
    for notice in sent:
        deliver_and_apply(pair.pk, pair.jp, notice.bundle_id)

    listing = consent_queries.list_consents(NodeContext(pair.jp.node, pair.jp.keyring), now=NOW)
    (issued,) = listing["consents"]
    assert issued["consent_id"] == granted.consent_id
    assert (issued["uses_spent"], issued["max_uses"], issued["use_violations"]) == (2, 3, 0)
    used = entries(pair.jp, "consent-used")
    assert [e.body["use_number"] for e in used] == [1, 2]
    assert [e.body["peer_ledger_seq"] for e in used] == [first.ledger_seq, second.ledger_seq]
    assert [e.body["peer_ledger_entry_hash"] for e in used] == [
        first.ledger_hash,
        second.ledger_hash,
    ]
    assert {e.consent_id for e in used} == {granted.consent_id}
    assert all(e.actor_name == "system" and e.body["items"] == [case_id] for e in used)
    assert entries(pair.jp, "consent-use-violation") == []


def test_a_notice_carries_metadata_only(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    grant_for(pair, [case_id], max_uses=3)
    do_disclose(pair.pk, [case_id], tmp_path / "out1")
    (notice,) = notices(pair.pk)
    deliver_and_apply(pair.pk, pair.jp, notice.bundle_id)
    (used,) = entries(pair.jp, "consent-used")
    assert set(used.body) == {
        "from", "disclosure_id", "items", "recipient", "purpose", "used_at",
        "use_number", "peer_ledger_seq", "peer_ledger_entry_hash", "violations",
    }  # fmt: skip


def test_duplicate_delivery_and_repeated_sending_record_one_use(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    grant_for(pair, [case_id], max_uses=3)
    made = do_disclose(pair.pk, [case_id], tmp_path / "out1")
    # the discloser queues one notice however often it is asked to
    assert send_use_notices(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW) == []
    consent_receive.apply_pending(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)
    (notice,) = notices(pair.pk)
    with pair.pk.node.db.transaction() as session:
        (row,) = session.scalars(select(ConsentUseNoticeRecord)).all()
    assert (row.disclosure_id, row.notice_bundle_id) == (made.disclosure_id, notice.bundle_id)

    # the same envelope delivered twice, and a second notice for the same disclosure
    deliver_and_apply(pair.pk, pair.jp, notice.bundle_id)
    deliver_and_apply(pair.pk, pair.jp, notice.bundle_id)
    again = forged_notice(
        pair,
        consent_id=made.consent_id,
        disclosure_id=made.disclosure_id,
        items=[case_id],
        ledger_seq=made.ledger_seq,
        ledger_entry_hash=made.ledger_hash,
    )
    done = deliver_and_apply(pair.pk, pair.jp, again)
    assert any("recorded already" in line for line in done)
    assert len(reports(pair.jp)) == 1
    assert len(entries(pair.jp, "consent-used")) == 1
    (issued,) = consent_queries.list_consents(NodeContext(pair.jp.node, pair.jp.keyring), now=NOW)[
        "consents"
    ]
    assert issued["uses_spent"] == 1


def test_use_of_an_unknown_consent_is_flagged(pair: Pair) -> None:
    bundle_id = forged_notice(pair)
    deliver_and_apply(pair.pk, pair.jp, bundle_id)
    (flagged,) = entries(pair.jp, "consent-use-violation")
    assert flagged.body["violations"][0].startswith("unknown consent")
    (report,) = reports(pair.jp)
    assert report.violation is not None
    assert "unknown consent" in report.violation


def test_use_over_the_limit_is_flagged(pair: Pair, tmp_path: Path) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id], max_uses=1)
    do_disclose(pair.pk, [case_id], tmp_path / "out1")
    (honest,) = notices(pair.pk)
    deliver_and_apply(pair.pk, pair.jp, honest.bundle_id)
    extra = forged_notice(pair, consent_id=granted.consent_id, items=[case_id], use_number=1)
    deliver_and_apply(pair.pk, pair.jp, extra)

    assert len(entries(pair.jp, "consent-used")) == 1
    (flagged,) = entries(pair.jp, "consent-use-violation")
    assert flagged.body["violations"] == ["over the limit: use 2 of at most 1"]
    (issued,) = consent_queries.list_consents(NodeContext(pair.jp.node, pair.jp.keyring), now=NOW)[
        "consents"
    ]
    assert (issued["uses_spent"], issued["use_violations"]) == (2, 1)


def test_use_after_the_peer_received_the_revocation_is_flagged(pair: Pair) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id], max_uses=5)
    assert granted.consent_id is not None
    revoked = consent_protocol.revoke(
        NodeContext(pair.jp.node, pair.jp.keyring), pair.jp.officer, granted.consent_id,
        reason="investigation reopened", now=NOW,
    )  # fmt: skip
    # Before the peer holds the revocation, a use is still within the terms.
    in_transit = forged_notice(pair, consent_id=granted.consent_id, items=[case_id])
    deliver_and_apply(pair.pk, pair.jp, in_transit)
    assert len(entries(pair.jp, "consent-used")) == 1

    deliver(pair.jp, pair.pk, revoked.bundle_id)
    with pair.jp.node.db.transaction() as session:  # what the sender stores with the receipt
        row = session.scalars(
            select(OutboxEntry).where(OutboxEntry.bundle_id == revoked.bundle_id)
        ).one()
        row.state, row.delivered_at = "delivered", NOW
    late = forged_notice(
        pair,
        consent_id=granted.consent_id,
        items=[case_id],
        use_number=2,
        used_at=format_time(NOW + timedelta(minutes=1)),
    )
    deliver_and_apply(pair.pk, pair.jp, late)
    (flagged,) = entries(pair.jp, "consent-use-violation")
    assert flagged.body["violations"][0].startswith("revoked: used after the peer received")


def test_use_beyond_the_terms_names_each_broken_term(pair: Pair) -> None:
    case_id = send_case_to_peer(pair.jp, pair.pk)
    other_id = send_case_to_peer(pair.jp, pair.pk)
    granted = grant_for(pair, [case_id], max_uses=5)
    bundle_id = forged_notice(
        pair,
        consent_id=granted.consent_id,
        items=sorted([case_id, other_id]),
        recipient="Someone Else",
        purpose="press release",
    )
    deliver_and_apply(pair.pk, pair.jp, bundle_id)
    (flagged,) = entries(pair.jp, "consent-use-violation")
    assert flagged.body["violations"] == [
        f"names item(s) the consent does not cover: {other_id}",
        "disclosed to another recipient than the consent names",
        "disclosed for another purpose than the consent names",
    ]


# -- killed mid-way: the notice is neither lost nor doubled ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "queued_before"), [("before-use-notice", 0), ("after-outbox-insert", 1)]
)
def test_a_disclosure_killed_before_its_notice_commits_sends_exactly_one_later(
    point: str, queued_before: int, tmp_path: Path, database_url: str,
    pg_database_factory: Callable[[], str], clean_environ: dict[str, str],
) -> None:  # fmt: skip
    """``gateway disclose`` is killed (SIGKILL) after the disclosure committed: before
    its notice is queued, or right after; either way exactly one notice goes out."""
    from tests.exchange_pair import PASSPHRASE, example, open_pair, second_url  # noqa: PLC0415
    from tests.nodes import gateway_env, kill, run_gateway, start_serve, wait_ready  # noqa: PLC0415

    urls = {"jp": database_url, "pk": second_url(tmp_path, database_url, pg_database_factory)}
    with open_pair(tmp_path, urls, clean_environ) as two:
        jp, pk = two.jp, two.pk
        sent = send_case(
            NodeContext(jp.node, jp.keyring), jp.officer, "exam-fraud", example("exam-fraud"), [],
            public=False, reply_to=None, now=utc_now(),
        )  # fmt: skip
        pk.receive_from(jp, sent.bundle_id)
        asked = consent_protocol.request_consent(
            NodeContext(pk.node, pk.keyring),
            pk.officer,
            [sent.bundle_id],
            EMBASSY,
            PURPOSE,
            now=utc_now(),
        )
        jp.receive_from(pk, asked.bundle_id)
        granted = consent_protocol.grant(
            NodeContext(jp.node, jp.keyring), jp.officer, asked.request_id,
            valid_until=None, max_uses=None, conditions="", now=utc_now(),
        )  # fmt: skip
        pk.receive_from(jp, granted.bundle_id)
        # `disclose` is a client: the node serving it is killed at the crash point.
        serving = start_serve(
            pk.home, env=gateway_env(pk.home, GATEWAY_PASSPHRASE=PASSPHRASE, GATEWAY_CRASH_AT=point)
        )
        try:
            wait_ready(serving)
            client = run_gateway(
                pk.home, "disclose", sent.bundle_id, "--recipient", EMBASSY, "--purpose", PURPOSE,
                "--out", str(tmp_path / "out"),
                env=gateway_env(pk.home, GATEWAY_TOKEN=pk.tokens["officer"]),
            )  # fmt: skip
            assert client.returncode == 1, client.stderr  # the node died under the request
            assert serving.process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if serving.process.poll() is None:
                kill(serving)
        assert not (tmp_path / "out").exists()
        with pk.node.db.transaction() as session:
            made = session.scalars(
                select(DisclosureRecord).where(DisclosureRecord.allowed.is_(True))
            ).all()
        assert len(made) == 1  # the disclosure itself committed
        assert len(notices(pk)) == queued_before

        for _ in range(2):  # the next consent steps queue it, once
            consent_queries.list_consents(NodeContext(pk.node, pk.keyring), now=utc_now())
        (notice,) = notices(pk)
        for _ in range(2):
            jp.receive_from(pk, notice.bundle_id)
        (issued,) = consent_queries.list_consents(NodeContext(jp.node, jp.keyring), now=utc_now())[
            "consents"
        ]
        assert issued["uses_spent"] == 1
