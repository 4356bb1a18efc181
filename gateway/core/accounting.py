"""The disclosure account as rows and text: pure rendering of the report.

:func:`gateway.node.accounting.account` builds the report (a plain JSON
value: ``{"node", "peer", "held": [...], "ours": [...]}``) from the store; the
functions here turn it into one row per event (the CSV export, the console's
tables) or text for a terminal, with no I/O, so the command-line client can
render an answer of ``GET /api/v1/ledger/account`` without loading the node.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

__all__ = ["CSV_COLUMNS", "account_csv", "account_events", "account_text", "csv_cell"]

CSV_COLUMNS = (
    "direction",
    "bundle_id",
    "type",
    "event",
    "time",
    "actor",
    "recipient",
    "purpose",
    "consent_id",
    "detail",
    "ledger_seq",
)


def _events(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The account as one flat row per event (the CSV and text forms)."""
    for item in report["held"]:
        base = {"direction": "held", "bundle_id": item["bundle_id"], "type": item["type"]}
        yield {**base, "event": "received", "time": item["received_at"],
               "detail": f"marking {item['marking']}", "ledger_seq": item["received_seq"]}  # fmt: skip
        for read in item["reads"]:
            yield {**base, "event": "read", "time": read["time"], "actor": read["actor"],
                   "ledger_seq": read["seq"]}  # fmt: skip
        for consent in item["consents"]:
            yield {**base, "event": "consent-granted", "time": consent["granted_at"],
                   "recipient": consent["third_party"], "purpose": consent["purpose"],
                   "consent_id": consent["consent_id"],
                   "detail": f"valid until {consent['valid_until']}, max uses {consent['max_uses']}",
                   "ledger_seq": consent["granted_seq"]}  # fmt: skip
            if consent["revoked_at"]:
                yield {**base, "event": "consent-revoked", "time": consent["revoked_at"],
                       "consent_id": consent["consent_id"], "ledger_seq": consent["revoked_seq"]}  # fmt: skip
        for share in item["shares"]:
            yield {**base, "event": share["kind"], "time": share["time"], "actor": share["actor"],
                   "recipient": share["recipient"], "purpose": share["purpose"],
                   "consent_id": share["consent_id"],
                   "detail": f"disclosure {share['disclosure_id']}; consent granted at seq "
                   f"{share['consent_granted_seq']}" if share["consent_id"] else
                   f"disclosure {share['disclosure_id']}",
                   "ledger_seq": share["seq"]}  # fmt: skip
    for item in report["ours"]:
        base = {"direction": "ours", "bundle_id": item["bundle_id"], "type": item["type"]}
        yield {**base, "event": "sent", "time": item["sent_at"],
               "detail": f"delivered {item['delivered_at'] or 'not yet'}",
               "ledger_seq": item["sent_seq"]}  # fmt: skip
        for request in item["requests"]:
            yield {**base, "event": "consent-requested", "time": request["requested_at"],
                   "actor": request["requesting_officer"], "recipient": request["third_party"],
                   "purpose": request["purpose"], "detail": f"request {request['request_id']}: "
                   f"{request['status']}", "ledger_seq": request["requested_seq"]}  # fmt: skip
            if request["denied_at"]:
                yield {**base, "event": "consent-denied", "time": request["denied_at"],
                       "detail": f"request {request['request_id']}",
                       "ledger_seq": request["denied_seq"]}  # fmt: skip
        for consent in item["consents"]:
            yield {**base, "event": "consent-granted", "time": consent["granted_at"],
                   "recipient": consent["third_party"], "purpose": consent["purpose"],
                   "consent_id": consent["consent_id"],
                   "detail": f"valid until {consent['valid_until']}, max uses {consent['max_uses']}",
                   "ledger_seq": consent["granted_seq"]}  # fmt: skip
            for use in consent["uses"]:
                yield {**base, "event": "consent-use-violation" if use["violation"] else "consent-used",
                       "time": use["used_at"], "recipient": use["recipient"],
                       "purpose": use["purpose"], "consent_id": consent["consent_id"],
                       "detail": f"use {use['use_number']}, peer ledger seq "
                       f"{use['peer_ledger_seq']}" + (f"; VIOLATION: {use['violation']}"
                                                      if use["violation"] else ""),
                       "ledger_seq": use["seq"]}  # fmt: skip
            if consent["revoked_at"]:
                yield {**base, "event": "consent-revoked", "time": consent["revoked_at"],
                       "consent_id": consent["consent_id"], "detail": consent["revocation_reason"],
                       "ledger_seq": consent["revoked_seq"]}  # fmt: skip


def account_events(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per event with every key of :data:`CSV_COLUMNS` (missing ones ``None``)."""
    return [{column: event.get(column) for column in CSV_COLUMNS} for event in _events(report)]


def csv_cell(value: Any) -> str:
    """A CSV cell; a value a spreadsheet would run as a formula is prefixed with '."""
    text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula is quoted as text (CSV injection).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def account_csv(report: dict[str, Any]) -> str:
    """The account as CSV: a header of :data:`CSV_COLUMNS`, one row per event."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for event in account_events(report):
        writer.writerow([csv_cell(event[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def account_text(report: dict[str, Any]) -> str:
    """The account for a terminal: per item, its events with their ledger entries."""
    lines = [f"disclosure account of node {report['node']} (peer {report['peer']})"]
    for title, key in (
        (f"items of {report['peer']} held here", "held"),
        (f"items of ours held by {report['peer']}", "ours"),
    ):
        lines.append(f"{title}:" if report[key] else f"{title}: none")
        current = None
        for event in account_events({**report, "held": [], "ours": []} | {key: report[key]}):
            if event["bundle_id"] != current:
                current = event["bundle_id"]
                lines.append(f"  {current} ({event['type']})")
            who = f" by {event['actor']}" if event["actor"] else ""
            to = (
                f" to {event['recipient']!r} for {event['purpose']!r}" if event["recipient"] else ""
            )
            consent = f" consent={event['consent_id']}" if event["consent_id"] else ""
            detail = f" ({event['detail']})" if event["detail"] else ""
            seq = "-" if event["ledger_seq"] is None else event["ledger_seq"]
            lines.append(
                f"    {event['time'] or '-':<27} {event['event']:<22}{who}{to}{consent}{detail}"
                f"  [ledger {seq}]"
            )
    return "\n".join(lines)
