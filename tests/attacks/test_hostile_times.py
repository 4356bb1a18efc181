"""Hostile input, class 2: times at the edge of the calendar.

A user-supplied time that is shifted by a zone or a day before use can leave
the calendar Python holds (years 1 to 9999) and raise ``OverflowError``. Every
such time is read by the one parser in ``gateway.core.times``, which refuses it
naming the option and the accepted range; the wire formats share its grammar
and answer their own error family, never ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from gateway.core import consent, keys, ledger, peer_auth, times
from gateway.core.times import DateMeans, Precision
from gateway.errors import GatewayError, InvalidInput
from gateway.node.ledger import read as ledger_service_read
from gateway.store.models_consent import ConsentGrantRecord
from tests.hostile import (
    Side,
    api_call,
    pair,  # noqa: F401 - the shared fixture
)
from tests.nodes import RawSigner

# The class: what a user may type that the calendar cannot hold once shifted.
EDGE_TIMES = {
    "last day, valid through it (a day is added)": ("9999-12-31", DateMeans.END),
    "year 1 at midnight, one hour east of UTC": ("0001-01-01T00:00:00+01:00", DateMeans.START),
    "year 1, the widest eastern offset": ("0001-01-01T23:00:00+23:59", DateMeans.START),
    "year 9999, the last hour, one hour west": ("9999-12-31T23:30:00-01:00", DateMeans.START),
    "year 9999, the last second, half an hour west": ("9999-12-31T23:59:59-00:30", DateMeans.END),
}
# Not a time at all: refused as such (never a ValueError or a silent guess).
NOT_TIMES = (
    "0000-01-01",
    "2026-02-30",
    "2026-12-31T24:00:00Z",
    "2026-12-31T23:59:60Z",
    "2026-12-31T12:00:00+24:00",
    "2026-12-31T12:00:00+05:60",
    "+10000-01-01",
    "2026-W01-1",
    "20261231",
    "9" * 5000,
    "\uff12\uff10\uff12\uff16-11-25",  # full-width digits
    "\u0662\u0660\u0662\u0666-11-25T00:00:00Z",  # Arabic-Indic digits
    "2026-11-25T00:00:00.\u0665Z",
)


@pytest.mark.parametrize(("text", "dates"), EDGE_TIMES.values(), ids=list(EDGE_TIMES))
def test_times_at_the_edge_of_the_calendar_are_refused_by_the_core(
    text: str, dates: DateMeans
) -> None:
    user_parsers: dict[str, Callable[[], Any]] = {
        "parse_user_time": lambda: times.parse_user_time(text, option="--x", dates=dates),
        "consent.parse_valid_until": lambda: consent.parse_valid_until(text, option="--x"),
        "ledger.parse_since": lambda: ledger_service_read.parse_since(text, option="--x"),
    }
    for name, parse in user_parsers.items():
        if name == "ledger.parse_since" and "T" not in text:
            continue  # a bare date starts a listing at its midnight: 9999-12-31 is fine
        with pytest.raises(InvalidInput) as caught:
            parse()
        message = str(caught.value)
        assert message.startswith("--x "), (name, message)
        assert times.RANGE_TEXT in message, (name, message)


@pytest.mark.parametrize("text", NOT_TIMES)
def test_text_that_is_no_time_is_refused_by_every_parser(text: str) -> None:
    parsers: list[Callable[[], Any]] = [
        lambda: times.parse_user_time(text, option="--x", dates=DateMeans.START),
        lambda: consent.parse_valid_until(text, option="--x"),
        lambda: ledger_service_read.parse_since(text, option="--x"),
        lambda: consent.parse_time(text, field="valid_until"),
        lambda: keys.parse_time(text, "expires_at"),
        lambda: ledger.parse_time(text),
    ]
    parsers += [
        lambda p=p: times.parse_utc(text, field="t", precision=p)  # type: ignore[misc]
        for p in Precision
    ]
    for parse in parsers:
        with pytest.raises(GatewayError):
            parse()


def test_the_edges_themselves_are_accepted() -> None:
    assert (
        times.parse_user_time("0001-01-01T00:00:00Z", option="--x", dates=DateMeans.START)
        == times.EARLIEST
    )
    assert times.parse_user_time("9999-12-30", option="--x", dates=DateMeans.END) == datetime(
        9999, 12, 31, tzinfo=UTC
    )
    assert (
        times.parse_user_time("9999-12-31T23:59:59.999999Z", option="--x", dates=DateMeans.END)
        == times.LATEST
    )
    for precision in Precision:
        for edge in (times.EARLIEST, times.LATEST.replace(microsecond=0), times.LATEST):
            moment = edge.replace(microsecond=0) if precision is Precision.SECONDS else edge
            text = times.format_utc(moment, precision)
            assert times.parse_utc(text, field="t", precision=precision) == moment


def test_wire_times_keep_their_one_text_per_instant() -> None:
    """Each format refuses the others' precision: a signed time has one spelling."""
    forms = {
        Precision.SECONDS: "2026-01-31T12:00:00Z",
        Precision.MICROSECONDS: "2026-01-31T12:00:00.000000Z",
    }
    assert times.parse_utc(forms[Precision.SECONDS], field="t", precision=Precision.SECONDS)
    for precision, text in (
        (Precision.SECONDS, forms[Precision.MICROSECONDS]),
        (Precision.MICROSECONDS, forms[Precision.SECONDS]),
        (Precision.OPTIONAL_MICROSECONDS, "2026-01-31T12:00:00.5Z"),
        (Precision.SECONDS, "2026-01-31T12:00:00+00:00"),
        (Precision.SECONDS, "2026-01-31t12:00:00z"),
        (Precision.SECONDS, "2026-01-31T12:00:00Z\n"),
    ):
        with pytest.raises(InvalidInput):
            times.parse_utc(text, field="t", precision=precision)


def test_peer_request_times_at_the_calendar_edge_are_refused_as_stale() -> None:
    """The ``Gateway-Time`` header: year 1 and year 9999 are merely far from now."""
    signer = RawSigner.make("jp", "jp-op-1")
    for moment in (times.EARLIEST, times.LATEST.replace(microsecond=0)):
        headers = peer_auth.sign_request(
            signer,
            method="POST",
            path="/v1/envelopes",
            body_sha256=bytes(32),
            recipient="pk",
            now=moment,
            nonce=bytes(16),
        )
        parsed = peer_auth.parse_signed_request(headers)
        with pytest.raises(peer_auth.PeerAuthFailed):
            peer_auth.verify_request(
                parsed,
                method="POST",
                path="/v1/envelopes",
                recipient="pk",
                expected_sender="jp",
                now=datetime(2026, 11, 29, tzinfo=UTC),
                lookup_key=lambda _k, _t: signer.public_key,
                remember_nonce=lambda *_a, **_k: True,
                skew=timedelta(minutes=5),
            )


def test_one_time_parser_in_the_code() -> None:
    """No module but ``gateway/core/times.py`` parses time text itself."""
    root = Path(__file__).resolve().parents[2] / "gateway"
    pattern = re.compile(r"fromisoformat\(|strptime\(|dateutil|\.isoparse\(")
    offenders = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "times.py" and pattern.search(path.read_text())
    )
    assert offenders == []


# --- the doors: CLI and local API ---------------------------------------------------------


def test_times_at_the_edge_of_the_calendar_are_refused_at_every_entry_point(
    pair: dict[str, Side],
) -> None:
    jp = pair["jp"]
    consents = jp.count(ConsentGrantRecord)
    valid_until = [
        "9999-12-31",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:30:00-01:00",
    ]
    since = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-00:30"]
    for text in valid_until:
        done = jp.cli("consent", "grant", "req-none", "--valid-until", text, role="officer")
        assert done.returncode == 1, done.stderr
        assert "internal error" not in done.stderr
        assert f"--valid-until {text!r}" in done.stderr, done.stderr
        assert times.RANGE_TEXT in done.stderr, done.stderr
        answer = api_call(
            jp,
            "POST",
            "/api/v1/consents/requests/req-none/grant",
            data=f'{{"valid_until": "{text}"}}'.encode(),
        )
        assert answer.status == 422, answer.body
        assert answer.body["error"]["message"].startswith(f"valid_until {text!r}")
        assert times.RANGE_TEXT in answer.body["error"]["message"]
    for text in since:
        done = jp.cli("ledger", "list", "--since", text, role="compliance")
        assert done.returncode == 1, done.stderr
        assert "internal error" not in done.stderr
        assert f"--since {text!r}" in done.stderr, done.stderr
        assert times.RANGE_TEXT in done.stderr
        answer = api_call(jp, "GET", f"/api/v1/ledger?since={quote(text)}", role="compliance")
        assert answer.status == 422, answer.body
        assert answer.body["error"]["message"].startswith(f"since {text!r}")
    assert jp.count(ConsentGrantRecord) == consents
