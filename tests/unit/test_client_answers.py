"""The node's error answers become the exception (and exit code) the command gave
when it ran in the node itself (SPEC §8: 3 consent refusal, 4 verification)."""

from __future__ import annotations

import json

import pytest

from gateway.client.framing import check_member_name
from gateway.client.transport import error_from_answer, path_of
from gateway.errors import (
    AccessDenied,
    AlreadyExists,
    ConsentRefused,
    Gone,
    InvalidInput,
    NotFound,
    PolicyRefused,
    RefusedError,
    StorageError,
    TransportError,
    VerificationError,
)


def body(reason: str, message: str = "m", **extra: str) -> bytes:
    return json.dumps({"error": {"reason": reason, "message": message, **extra}}).encode()


@pytest.mark.parametrize(
    ("status", "answer", "family", "exit_code"),
    [
        (403, body("consent", "no consent for b1"), ConsentRefused, 3),
        (422, body("envelope.signature", check="signature"), VerificationError, 4),
        (422, body("verification", check="chain"), VerificationError, 4),
        (401, body("access.disabled"), AccessDenied, 1),
        (403, body("access.role"), AccessDenied, 1),
        (404, body("not-found"), NotFound, 1),
        (410, body("bundle.purged"), Gone, 1),
        (409, body("exists"), AlreadyExists, 1),
        (409, body("consent.revoked"), RefusedError, 1),
        (413, body("request.too-large"), PolicyRefused, 1),
        (422, body("invalid-input"), InvalidInput, 1),
        (502, body("transport"), TransportError, 1),
        (503, body("storage"), StorageError, 1),
        (500, b"<html>not json</html>", Exception, 1),
    ],
)
def test_answers_map_to_the_exception_tree_and_exit_codes(
    status: int, answer: bytes, family: type[Exception], exit_code: int
) -> None:
    error = error_from_answer(status, answer)
    assert isinstance(error, family)
    assert error.exit_code == exit_code


def test_the_message_and_check_are_kept() -> None:
    error = error_from_answer(422, body("ledger.chain", "entry 7 is broken", check="chain"))
    assert isinstance(error, VerificationError)
    assert (error.message, error.check, error.reason) == (
        "entry 7 is broken",
        "chain",
        "ledger.chain",
    )


def test_path_segments_are_encoded_so_an_id_cannot_reach_another_route() -> None:
    assert path_of("bundles", "../users") == "/api/v1/bundles/..%2Fusers"
    assert path_of("ledger", query={"kind": "a b", "since": None}) == "/api/v1/ledger?kind=a+b"


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", "a/../b", ".hidden", "a//b", "a\\b", "a/b/c/d", "x\x00y", "a/\nb", ""],
)
def test_stream_member_names_that_could_leave_the_folder_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="member name"):
        check_member_name(name)


def test_plain_member_names_pass() -> None:
    assert check_member_name("b1/attachments/scan 1.pdf") == ("b1", "attachments", "scan 1.pdf")
