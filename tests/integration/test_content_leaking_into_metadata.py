"""Class: content leaking into metadata.

A compliance officer sees metadata, never case contents (SPEC §2). Case
contents include the attachment names (encrypted with the case, and often a
person's name or passport number) and anything derived from the decrypted
bytes that allows a confirmation guess (a plain SHA-256 of a small case file).

The test plants a distinctive attachment name, case text and their hashes,
runs the whole story on both nodes (send, receive, show, internal share,
consent, disclosure, blocked disclosure, the use reported back, the node's own
disclosure) and then greps every output a compliance officer or an export can
read, through the CLI, the local API, the web console (every page, export and
report) and the core services, for each planted value. The
officer's own ``show`` is the control: the values are there to be found.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path

import pytest

from gateway.errors import ConsentRefused
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.consent import protocol as consent_protocol
from gateway.node.context import NodeContext
from gateway.node.inbox import read_bundle
from gateway.node.ledger import export as ledger_export
from gateway.node.ledger import read as ledger_read
from gateway.node.outbox import send_case
from gateway.node.runtime import utc_now
from tests.exchange_pair import (
    Pair,
    Side,
    example,
    pair,  # noqa: F401 - the shared fixture
)

ATTACHMENT_NAME = "passport-AB1234561-Qwzxvarian-Nadeem.pdf"
CASE_TEXT = "Qwzxvarian canary sentence about Mr Nadeem"
ATTACHMENT_BYTES = b"%PDF-1.7 passport AB1234561 scan\n"
THIRD_PARTY = "Embassy of Example"
PURPOSE = "visa screening"


def _story(pair: Pair, tmp_path: Path) -> dict[str, str]:
    """Every step that touches the planted case; returns the values to search for."""
    now = utc_now
    folder = tmp_path / "source"
    folder.mkdir()
    evidence = folder / ATTACHMENT_NAME
    evidence.write_bytes(ATTACHMENT_BYTES)
    case = example("exam-fraud")
    case["description"] = CASE_TEXT
    sent = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring),
        pair.jp.officer,
        "exam-fraud",
        case,
        [evidence],
        public=False,
        reply_to=None,
        now=now(),
    )
    bundle = sent.bundle_id
    pair.pk.receive_from(pair.jp, bundle)
    read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring), pair.pk.officer, bundle, out_dir=None, now=now()
    )
    shown = tmp_path / "shown"
    shown.mkdir()
    read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring),
        pair.pk.officer,
        bundle,
        out_dir=shown,
        now=now(),
    )

    def disclose(side: Side, recipient: str, out: str) -> consent_disclosure.DisclosureResult:
        return consent_disclosure.disclose(
            NodeContext(side.node, side.keyring), side.officer, [bundle], recipient, PURPOSE,
            tmp_path / out, now=now(),
        )  # fmt: skip

    shared = disclose(pair.pk, "beoe", "internal-share")
    with pytest.raises(ConsentRefused):
        disclose(pair.pk, THIRD_PARTY, "blocked")
    asked = consent_protocol.request_consent(
        NodeContext(pair.pk.node, pair.pk.keyring),
        pair.pk.officer,
        [bundle],
        THIRD_PARTY,
        PURPOSE,
        now=now(),
    )
    pair.jp.receive_from(pair.pk, asked.bundle_id)
    granted = consent_protocol.grant(
        NodeContext(pair.jp.node, pair.jp.keyring), pair.jp.officer, asked.request_id,
        valid_until=None, max_uses=None, conditions="", now=now(),
    )  # fmt: skip
    pair.pk.receive_from(pair.jp, granted.bundle_id)
    made = disclose(pair.pk, THIRD_PARTY, "disclosed")
    for notice in _use_notices(pair.pk):  # the use travels back to the originator
        pair.jp.receive_from(pair.pk, notice)
    own = disclose(pair.jp, THIRD_PARTY, "own-item")
    assert made.kind == "disclosure-made"
    assert shared.kind == "internal-share"
    assert own.kind == "disclosure-made"
    case_file = (tmp_path / "disclosed" / bundle / "case.json").read_bytes()
    assert CASE_TEXT.encode() in case_file
    return {
        "attachment name": ATTACHMENT_NAME,
        "passport number in the name": "AB1234561",
        "case text": "Qwzxvarian",
        "SHA-256 of case.json": hashlib.sha256(case_file).hexdigest(),
        "SHA-256 of the attachment": hashlib.sha256(ATTACHMENT_BYTES).hexdigest(),
        "bundle": bundle,
    }


def _use_notices(side: Side) -> list[str]:
    from sqlalchemy import select  # noqa: PLC0415

    from gateway.store.models_exchange import OutboxEntry  # noqa: PLC0415

    with side.node.db.transaction() as session:
        found = list(
            session.scalars(
                select(OutboxEntry.bundle_id).where(OutboxEntry.case_type == "consent-use")
            )
        )
    assert found, "the disclosure under consent queued a consent-use notice"
    return found


def _console_outputs(side: Side, bundle: str) -> dict[str, str]:
    """Every console page, export and report a compliance officer can open."""
    from tests.console_client import Browser, serve_console  # noqa: PLC0415

    out: dict[str, str] = {}

    async def main() -> None:
        async with serve_console(side) as base, Browser.open(base) as browser:
            signed = await browser.sign_in(side.tokens["compliance"])
            assert signed.status == 303
            paths = [
                "/console/ledger",
                f"/console/ledger?bundle={bundle}",
                "/console/consents",
                "/console/account",
                f"/console/account?bundle={bundle}",
                "/console/verify",
                "/console/report?from=2000-01-01&to=2999-12-31",
                "/console/export?format=csv",
                "/console/export?format=jsonl",
                f"/console/export?bundle={bundle}&format=csv",
            ]
            listing = await browser.get("/console/ledger")
            total = int(listing.text.split("Entries found: ")[1].split(" ")[0])
            paths += [f"/console/ledger/{seq}" for seq in range(total)]
            for path in paths:
                page = await browser.get(path)
                assert page.status == 200, (path, page.text[:300])
                out[f"console {path}"] = page.text

    asyncio.run(main())
    return out


def _cli_outputs(side: Side, tmp_path: Path, bundle: str) -> dict[str, str]:
    out: dict[str, str] = {}
    commands = [
        ("ledger", "list"),
        ("--json", "ledger", "list"),
        ("--json", "ledger", "list", "--bundle", bundle),
        ("ledger", "verify"),
        ("--json", "ledger", "verify"),
        ("--json", "consent", "list"),
        ("--json", "inbox"),
        ("--json", "outbox"),
        ("--json", "show", bundle),
        ("ledger", "account"),
        ("ledger", "account", "--format", "json"),
        ("ledger", "account", "--format", "csv", "--bundle", bundle),
    ]
    for args in commands:
        done = side.cli(*args, role="compliance")
        out[f"CLI {' '.join(args)}"] = done.stdout + done.stderr
    for fmt in ("csv", "jsonl"):
        target = tmp_path / f"export-{side.node.node_id}.{fmt}"
        done = side.cli(
            "ledger", "export", "--format", fmt, "--out", str(target), role="compliance"
        )
        assert done.exit_code == 0, done.output
        out[f"CLI ledger export --format {fmt}"] = done.output + target.read_text()
    return out


def _api_outputs(side: Side, bundle: str) -> dict[str, str]:
    calls = [
        ("GET", "/api/v1/ledger", None),
        ("GET", f"/api/v1/ledger?bundle={bundle}", None),
        ("GET", "/api/v1/ledger/export?format=csv", None),
        ("GET", "/api/v1/ledger/export?format=jsonl", None),
        ("POST", "/api/v1/ledger/verify", {}),
        ("GET", "/api/v1/consents", None),
        ("GET", "/api/v1/inbox", None),
        ("GET", "/api/v1/outbox", None),
        ("GET", f"/api/v1/bundles/{bundle}?attachments=true", None),
        ("GET", "/api/v1/ledger/account", None),
        ("GET", f"/api/v1/ledger/account?bundle={bundle}&format=csv", None),
    ]
    answers = side.api(calls, role="compliance")
    assert [a.status for a in answers[:5]] == [200] * 5, answers[0].text
    return {f"API {m} {p}": a.text for (m, p, _b), a in zip(calls, answers, strict=True)}


def _core_outputs(side: Side) -> dict[str, str]:
    with side.node.db.transaction() as session:
        listed = [entry.to_dict() for entry in ledger_read.list_entries(session)]
        exported = {}
        for fmt in ("csv", "jsonl"):
            buffer = io.BytesIO()
            ledger_export.export(session, fmt, buffer)  # type: ignore[arg-type]
            exported[fmt] = buffer.getvalue().decode("utf-8")
    return {
        "core ledger_read.list_entries": json.dumps(listed, default=str, ensure_ascii=False),
        "core ledger_export.export csv": exported["csv"],
        "core ledger_export.export jsonl": exported["jsonl"],
    }


def _leaks(outputs: dict[str, str], needles: dict[str, str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for where, text in outputs.items():
        hits = [what for what, value in needles.items() if value.lower() in text.lower()]
        if hits:
            found[where] = hits
    return found


def test_content_leaking_into_metadata(pair: Pair, tmp_path: Path) -> None:
    """No compliance-visible output of either node holds a value derived from content."""
    planted = _story(pair, tmp_path)
    bundle = planted.pop("bundle")
    control = pair.pk.cli("--json", "show", bundle, role="officer")
    assert control.exit_code == 0, control.output
    assert "Qwzxvarian" in control.stdout, "control: the officer sees the case"
    leaks: dict[str, list[str]] = {}
    for side in (pair.jp, pair.pk):
        outputs = {
            **_cli_outputs(side, tmp_path, bundle),
            **_api_outputs(side, bundle),
            **_core_outputs(side),
            **_console_outputs(side, bundle),
        }
        assert any("disclosure-made" in text for text in outputs.values())
        # the console did show the metadata: the bundle, where the content would be
        assert bundle in outputs[f"console /console/account?bundle={bundle}"]
        for where, hits in _leaks(outputs, planted).items():
            leaks[f"{side.node.node_id}: {where}"] = hits
    assert leaks == {}
