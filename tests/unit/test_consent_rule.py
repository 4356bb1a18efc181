"""The disclosure rule and the written consent, case by case (SPEC §7)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nacl.signing
import pytest

from gateway.core.consent import (
    Basis,
    ConsentGrant,
    ConsentSignatureInvalid,
    ConsentState,
    DisclosureItem,
    EntryKind,
    Missing,
    SignedGrant,
    decide_disclosure,
    normalise_name,
    sign_grant,
    verify_grant,
)
from gateway.errors import InvalidInput

DATA = Path(__file__).parent.parent / "data"
T0 = datetime(2026, 11, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=5)
INTERNAL = ("MOP&HRD", "Bureau of Emigration and Overseas Employment")
PK_KEY = nacl.signing.SigningKey(bytes(range(32)))


def grant(
    consent_id: str = "c-1",
    items: tuple[str, ...] = ("jp-1",),
    third_party: str = "Embassy of Example",
    purpose: str = "visa screening",
    valid_from: datetime = T0,
    valid_until: datetime = T0 + timedelta(days=30),
    max_uses: int | None = None,
    granting_node: str = "jp",
) -> ConsentGrant:
    return ConsentGrant(
        consent_id=consent_id,
        request_id="r-1",
        items=tuple(sorted(items)),
        third_party=third_party,
        purpose=purpose,
        valid_from=valid_from,
        valid_until=valid_until,
        max_uses=max_uses,
        conditions="",
        granting_officer="Aoki Hana",
        granting_node=granting_node,
        key_id="k-1",
    )


def peer_item(bundle_id: str = "jp-1", marking: str | None = "confidential") -> DisclosureItem:
    return DisclosureItem(bundle_id=bundle_id, origin_node="jp", marking=marking)


def decide(
    items: list[DisclosureItem],
    consents: list[ConsentState],
    recipient: str = "Embassy of Example",
    purpose: str = "visa screening",
    now: datetime = NOW,
):
    return decide_disclosure(
        items,
        recipient,
        purpose,
        own_node="pk",
        internal_recipients=INTERNAL,
        consents=consents,
        now=now,
    )


# -- allowed without consent ---------------------------------------------------


@pytest.mark.parametrize(
    ("item", "recipient", "basis"),
    [
        (DisclosureItem("pk-1", "pk", "confidential"), "Embassy of Example", Basis.OWN),
        (peer_item(marking="public"), "Embassy of Example", Basis.PUBLIC),
        (peer_item(), "MOP&HRD", Basis.INTERNAL),
        (peer_item(), "  bureau of  EMIGRATION and overseas employment ", Basis.INTERNAL),
    ],
)
def test_items_needing_no_consent_are_allowed(item, recipient, basis):
    decision = decide([item], [], recipient=recipient)
    assert decision.allowed
    assert decision.items[0].basis is basis
    assert decision.consent_id is None


def test_internal_share_is_its_own_entry_kind():
    assert decide([peer_item()], [], recipient="MOP&HRD").entry_kind is EntryKind.INTERNAL
    own = DisclosureItem("pk-1", "pk", "confidential")
    assert decide([own], []).entry_kind is EntryKind.MADE


@pytest.mark.parametrize("marking", ["confidential", None, "", "PUBLIC", "restricted"])
def test_any_marking_but_public_counts_as_confidential(marking):
    decision = decide([peer_item(marking=marking)], [])
    assert not decision.allowed
    assert decision.items[0].missing is Missing.NO_CONSENT


# -- consent checks -------------------------------------------------------------


def test_valid_consent_allows_and_is_named():
    decision = decide([peer_item()], [ConsentState(grant())])
    assert decision.allowed
    assert decision.consent_id == "c-1"
    assert decision.entry_kind is EntryKind.MADE
    assert decision.items[0].basis is Basis.CONSENT


@pytest.mark.parametrize(
    ("state", "kwargs", "missing"),
    [
        (None, {}, Missing.NO_CONSENT),
        (ConsentState(grant(third_party="Other Embassy")), {}, Missing.OTHER_RECIPIENT),
        (ConsentState(grant(purpose="press release")), {}, Missing.OTHER_PURPOSE),
        (ConsentState(grant(), revoked_at=NOW), {}, Missing.REVOKED),
        # a recorded revocation counts whatever time it carries
        (ConsentState(grant(), revoked_at=NOW + timedelta(days=1)), {}, Missing.REVOKED),
        (ConsentState(grant()), {"now": T0 + timedelta(days=30)}, Missing.EXPIRED),
        (ConsentState(grant()), {"now": T0 - timedelta(seconds=1)}, Missing.NOT_YET_VALID),
        (ConsentState(grant(max_uses=2), uses_spent=2), {}, Missing.USES_SPENT),
        (ConsentState(grant(items=("jp-9",))), {}, Missing.NOT_COVERED),
        # a consent granted by another node does not cover the peer's item
        (ConsentState(grant(granting_node="pk")), {}, Missing.NOT_COVERED),
    ],
)
def test_blocked_disclosure_names_what_is_missing(state, kwargs, missing):
    decision = decide([peer_item()], [] if state is None else [state], **kwargs)
    assert not decision.allowed
    assert decision.entry_kind is EntryKind.BLOCKED
    assert decision.consent_id is None
    assert decision.items[0].missing is missing
    assert missing.value in decision.explain()


def test_expiry_boundary_is_exclusive_and_start_inclusive():
    state = ConsentState(grant())
    assert decide([peer_item()], [state], now=T0).allowed
    end = T0 + timedelta(days=30)
    assert decide([peer_item()], [state], now=end - timedelta(microseconds=1)).allowed
    assert not decide([peer_item()], [state], now=end).allowed


def test_last_use_allowed_then_spent():
    assert decide([peer_item()], [ConsentState(grant(max_uses=2), uses_spent=1)]).allowed
    assert not decide([peer_item()], [ConsentState(grant(max_uses=2), uses_spent=2)]).allowed


@pytest.mark.parametrize(
    ("asked", "granted"),
    [
        ("Visa Screening", "visa screening"),
        ("  visa\tscreening\n", "visa screening"),
        ("\uff36\uff29\uff33\uff21 screening", "visa screening"),  # full-width VISA folds (NFKC)
    ],
)
def test_purpose_matches_after_normalisation(asked, granted):
    assert decide([peer_item()], [ConsentState(grant(purpose=granted))], purpose=asked).allowed


@pytest.mark.parametrize("asked", ["visa-screening", "visa screenings", "visa"])
def test_purpose_differing_in_words_does_not_match(asked):
    decision = decide([peer_item()], [ConsentState(grant())], purpose=asked)
    assert decision.items[0].missing is Missing.OTHER_PURPOSE


def test_one_consent_must_cover_every_item():
    items = [peer_item("jp-1"), peer_item("jp-2")]
    split = [
        ConsentState(grant("c-1", items=("jp-1",))),
        ConsentState(grant("c-2", items=("jp-2",))),
    ]
    decision = decide(items, split)
    assert not decision.allowed
    assert [item.missing for item in decision.missing] == [Missing.NOT_COVERED]
    both = ConsentState(grant("c-3", items=("jp-1", "jp-2")))
    decision = decide(items, [*split, both])
    assert decision.allowed
    assert decision.consent_id == "c-3"


def test_own_public_and_consented_items_mix():
    items = [
        DisclosureItem("pk-1", "pk", "confidential"),
        peer_item("jp-pub", marking="public"),
        peer_item("jp-1"),
    ]
    decision = decide(items, [ConsentState(grant(items=("jp-1",)))])
    assert decision.allowed
    assert [item.basis for item in decision.items] == [Basis.OWN, Basis.PUBLIC, Basis.CONSENT]


def test_consent_ending_first_is_spent_first():
    later = ConsentState(grant("c-a", valid_until=T0 + timedelta(days=60)))
    sooner = ConsentState(grant("c-z", valid_until=T0 + timedelta(days=20)))
    assert decide([peer_item()], [later, sooner]).consent_id == "c-z"


def test_closest_failing_consent_is_reported():
    states = [
        ConsentState(grant("c-1", third_party="Other")),
        ConsentState(grant("c-2"), revoked_at=NOW),
        ConsentState(grant("c-3", max_uses=1), uses_spent=1),
    ]
    decision = decide([peer_item()], states)
    assert decision.items[0].missing is Missing.USES_SPENT
    assert decision.items[0].consent_id == "c-3"


@pytest.mark.parametrize(
    ("items", "recipient", "purpose"),
    [
        ([], "Embassy", "p"),
        ([peer_item(), peer_item()], "Embassy", "p"),
        ([peer_item()], "   ", "p"),
        ([peer_item()], "Embassy", ""),
        ([peer_item()], "Embassy\x00", "p"),
    ],
)
def test_bad_disclosure_input_is_refused(items, recipient, purpose):
    with pytest.raises(InvalidInput):
        decide(items, [], recipient=recipient, purpose=purpose)


def test_normalise_name_table():
    assert normalise_name("  Ministry  of\tForeign\nAffairs ") == "ministry of foreign affairs"
    assert normalise_name("STRASSE") == normalise_name("straße")


# -- the signed grant -------------------------------------------------------------


def test_grant_signature_known_answer():
    vector = json.loads((DATA / "consent_grant_v1.json").read_text(encoding="utf-8"))
    key = nacl.signing.SigningKey(bytes.fromhex(vector["signing_seed_hex"]))
    parsed = ConsentGrant.from_document(vector["document"])
    signed = sign_grant(parsed, lambda message: key.sign(message).signature)
    assert signed.document == vector["document_utf8"].encode("utf-8")
    assert signed.signature.hex() == vector["signature_hex"]
    # independent check: the signed message is the purpose tag, NUL, the document
    message = b"ssw-gateway/consent/v1\x00" + signed.document
    nacl.signing.VerifyKey(bytes.fromhex(vector["public_key_hex"])).verify(
        message, signed.signature
    )
    assert (
        verify_grant(
            signed,
            public_key=bytes.fromhex(vector["public_key_hex"]),
            key_id="k-test",
            granting_node="jp",
        )
        == parsed
    )


def _signed(g: ConsentGrant | None = None) -> SignedGrant:
    return sign_grant(g or grant(), lambda message: PK_KEY.sign(message).signature)


def _verify(signed: SignedGrant, **overrides):
    args = {"public_key": bytes(PK_KEY.verify_key), "key_id": "k-1", "granting_node": "jp"}
    args.update(overrides)
    return verify_grant(signed, **args)


def test_wire_form_round_trips():
    signed = _signed()
    assert SignedGrant.from_wire(json.loads(json.dumps(signed.to_wire()))) == signed
    assert _verify(signed) == grant()


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    ("tamper", "overrides"),
    [
        (lambda s: replace(s, signature=_flip(s.signature, 0)), {}),
        (lambda s: replace(s, document=_flip(s.document, 20)), {}),
        (lambda s: replace(s, document=s.document + b" "), {}),
        (lambda s: s, {"public_key": bytes(nacl.signing.SigningKey.generate().verify_key)}),
        (lambda s: s, {"granting_node": "pk"}),
        (lambda s: s, {"key_id": "k-2"}),
        (lambda s: s, {"public_key": b"short"}),
    ],
    ids=[
        "signature-flipped",
        "document-flipped",
        "document-extended",
        "other-key",
        "other-node",
        "other-key-id",
        "bad-key-size",
    ],
)
def test_tampered_or_misattributed_grant_is_refused(tamper, overrides):
    with pytest.raises(ConsentSignatureInvalid):
        _verify(tamper(_signed()), **overrides)


def test_signed_but_not_canonical_document_is_refused():
    document = json.dumps(grant().document(), indent=1).encode()
    signature = PK_KEY.sign(b"ssw-gateway/consent/v1\x00" + document).signature
    with pytest.raises(ConsentSignatureInvalid, match="canonical"):
        _verify(SignedGrant(document=document, signature=signature))


def test_signature_for_another_purpose_is_refused():
    signed = _signed()
    other = PK_KEY.sign(b"ssw-gateway/envelope/v1\x00" + signed.document).signature
    with pytest.raises(ConsentSignatureInvalid):
        _verify(SignedGrant(document=signed.document, signature=other))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "consent-denial"}, "type"),
        ({"version": 2}, "version"),
        ({"items": []}, "items"),
        ({"items": ["a", "a"]}, "items"),
        ({"items": ["b", "a"]}, "items"),
        ({"max_uses": 0}, "max_uses"),
        ({"max_uses": True}, "max_uses"),
        ({"valid_until": "2026-10-01T00:00:00Z"}, "valid_until"),
        ({"valid_from": "2026-11-01 00:00:00"}, "valid_from"),
        ({"granting_node": "xx"}, "granting_node"),
        ({"third_party": ""}, "third_party"),
        ({"extra": 1}, "extra"),
        ({"consent_id": "../etc"}, "consent_id"),
    ],
)
def test_malformed_grant_document_names_the_field(change, field):
    document = grant().document()
    document.update(change)
    with pytest.raises(InvalidInput, match=field):
        ConsentGrant.from_document(document)


def test_missing_field_is_named():
    document = grant().document()
    del document["purpose"]
    with pytest.raises(InvalidInput, match="missing field purpose"):
        ConsentGrant.from_document(document)


@pytest.mark.parametrize(
    "wire",
    [
        {"document": "!!", "signature": "AA=="},
        {"document": "", "signature": ""},
        {"document": "e30="},
        "not an object",
    ],
)
def test_bad_wire_form_is_refused(wire):
    with pytest.raises(InvalidInput):
        SignedGrant.from_wire(wire)
