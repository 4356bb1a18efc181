"""A refusal reason the peer sends is kept only as a reason code.

It becomes a bundle's last error (a database column), a log line and a metric
label. Valid JSON can carry a lone surrogate, which the database's text encoding
refuses (a failed pass, again on every retry), or free text of any length: both
are kept as ``other``, push answers, error bodies and pull receipts alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.metrics import peer_reason
from gateway.peer.client import _parse_results, _reason_from

HOSTILE = ["\ud800", "refused \udfff here", "x" * 5000, "Free text, with spaces", ""]


@pytest.mark.parametrize("reason", HOSTILE)
def test_a_pushed_batch_answer_keeps_only_a_reason_code(reason: str) -> None:
    answer = json.dumps({"results": [{"index": 0, "status": "refused", "reason": reason}]}).encode()
    [result] = _parse_results(answer, [Path("envelope-0")])
    assert result.status == "refused"
    assert result.reason == "other"


@pytest.mark.parametrize("reason", HOSTILE)
def test_an_error_body_keeps_only_a_reason_code(reason: str) -> None:
    body = json.dumps({"error": {"reason": reason, "message": "no"}}).encode()
    assert _reason_from(body) in ("other", "unknown")


def test_codes_pass_and_what_is_not_text_is_unknown() -> None:
    answer = json.dumps(
        {
            "results": [
                {"index": 0, "status": "refused", "reason": "envelope.signature"},
                {"index": 1, "status": "error", "reason": 7},
            ]
        }
    ).encode()
    first, second = _parse_results(answer, [Path("a"), Path("b")])
    assert first.reason == "envelope.signature"
    assert (second.reason, second.retryable) == ("unknown", True)
    assert _reason_from(b'{"error": {"reason": "auth.clock"}}') == "auth.clock"
    assert peer_reason(None) == "unknown"
    assert peer_reason("limit.envelope") == "limit.envelope"
