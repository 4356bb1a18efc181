"""Approvers in the signed consent grant (two-person rule): signed when present, and
documents made before the field existed read and verify unchanged."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nacl.signing
import pytest

from gateway.core.canonical import canonical_bytes
from gateway.core.consent import (
    ConsentGrant,
    ConsentSignatureInvalid,
    SignedGrant,
    sign_grant,
    verify_grant,
)
from gateway.errors import InvalidInput
from tests.unit.test_consent_rule import PK_KEY, grant

DATA = Path(__file__).parent.parent / "data"


def _verify(signed: SignedGrant) -> ConsentGrant:
    return verify_grant(
        signed, public_key=bytes(PK_KEY.verify_key), key_id="k-1", granting_node="jp"
    )


def test_approvers_are_signed_and_read_back() -> None:
    approved = replace(grant(), approvers=("asma", "bilal"))
    signed = sign_grant(approved, lambda m: PK_KEY.sign(m).signature)
    assert json.loads(signed.document)["approvers"] == ["asma", "bilal"]
    assert _verify(signed).approvers == ("asma", "bilal")
    # changing the approvers after signing breaks the signature
    forged = json.loads(signed.document)
    forged["approvers"] = ["asma"]
    with pytest.raises(ConsentSignatureInvalid):
        _verify(replace(signed, document=canonical_bytes(forged)))


def test_a_grant_without_approvers_has_no_field_and_old_documents_verify() -> None:
    plain = sign_grant(grant(), lambda m: PK_KEY.sign(m).signature)
    assert "approvers" not in json.loads(plain.document)
    assert _verify(plain).approvers == ()
    vector = json.loads((DATA / "consent_grant_v1.json").read_text(encoding="utf-8"))
    key = nacl.signing.SigningKey(bytes.fromhex(vector["signing_seed_hex"]))
    parsed = ConsentGrant.from_document(vector["document"])
    assert parsed.approvers == ()
    again = sign_grant(parsed, lambda m: key.sign(m).signature)
    assert again.document == vector["document_utf8"].encode("utf-8")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "at least one"),
        ("asma", "list of names"),
        (["bilal", "asma"], "distinct and sorted"),
        (["asma", "asma"], "distinct and sorted"),
        ([""], "must not be empty"),
        ([f"n{i:02d}" for i in range(17)], "at most 16"),
    ],
)
def test_bad_approvers_are_refused(value: object, message: str) -> None:
    document = grant().document()
    document["approvers"] = value
    with pytest.raises(InvalidInput, match=message):
        ConsentGrant.from_document(document)
