"""The pure ledger core: entry bytes, chain checks, checkpoints, witness audits."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import merkle
from gateway.core.domain import Purpose, tagged, tagged_sha256
from gateway.core.ledger import (
    GENESIS_PREV_HASH,
    MAX_BODY_BYTES,
    CheckpointInvalid,
    EntryKind,
    LedgerEntry,
    LedgerVerificationFailed,
    StoredEntry,
    WitnessMismatch,
    audit_peer_answer,
    check_checkpoint_root,
    format_time,
    make_checkpoint,
    make_entry,
    parse_entry,
    parse_signed_checkpoint,
    parse_time,
    sign_checkpoint,
    verify_chain,
    verify_checkpoint,
)
from gateway.core.roles import SYSTEM, Actor, Role
from gateway.errors import InvalidInput

VECTORS = json.loads(
    (Path(__file__).parent.parent / "data" / "ledger" / "vectors.json").read_text()
)
T0 = datetime(2026, 11, 25, 21, 15, 0, 123456, tzinfo=UTC)
OFFICER = Actor("aiko", Role.OFFICER)


class Signer:
    def __init__(self, seed: bytes, key_id: str = "0123456789abcdef") -> None:
        self.key = nacl.signing.SigningKey(seed)
        self.signing_key_id = key_id

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        return bytes(self.key.sign(tagged(purpose, payload)).signature)


class Keys:
    def __init__(self, *signers: Signer) -> None:
        self.by_id = {s.signing_key_id: s.key.verify_key for s in signers}

    def signing_key(self, key_id: str, *, at: datetime) -> nacl.signing.VerifyKey:
        if key_id not in self.by_id:
            raise InvalidInput(f"unknown key {key_id}")
        return self.by_id[key_id]


def chain(n: int) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    prev = GENESIS_PREV_HASH
    for i in range(n):
        entry = make_entry(
            seq=i,
            now=T0 + timedelta(seconds=i),
            kind=EntryKind.BUNDLE_READ,
            actor=OFFICER,
            prev_hash=prev,
            bundle_id=f"b-{i}",
            body={"i": i},
        )
        entries.append(entry)
        prev = entry.entry_hash
    return entries


def stored(entry: LedgerEntry, **changes: Any) -> StoredEntry:
    return dataclasses.replace(entry.as_stored(), **changes)


# --- known answers -----------------------------------------------------------


def test_entries_match_the_known_answer_vectors() -> None:
    prev = GENESIS_PREV_HASH
    for vector in VECTORS["entries"]:
        given = vector["input"]
        role = given["actor"]["role"]
        entry = make_entry(
            seq=given["seq"],
            now=T0,
            kind=given["kind"],
            actor=Actor(given["actor"]["name"], None if role is None else Role(role)),
            prev_hash=prev,
            bundle_id=given["bundle_id"],
            consent_id=given["consent_id"],
            body=given["body"],
        )
        assert entry.canonical.decode() == vector["canonical"]
        assert entry.entry_hash.hex() == vector["entry_hash"]
        assert entry.entry_hash == tagged_sha256(Purpose.LEDGER_ENTRY, entry.canonical)
        assert entry.leaf_hash.hex() == vector["leaf_hash"]
        assert parse_entry(entry.canonical) == entry
        prev = entry.entry_hash
    leaves = [bytes.fromhex(v["leaf_hash"]) for v in VECTORS["entries"]]
    assert merkle.root_from_leaf_hashes(leaves).hex() == VECTORS["root"]


def test_checkpoint_matches_the_known_answer_vector() -> None:
    vector = VECTORS["checkpoint"]
    signer = Signer(bytes.fromhex(vector["signing_seed"]), vector["key_id"])
    checkpoint = make_checkpoint(
        node="jp", size=4, root=bytes.fromhex(VECTORS["root"]), now=T0, key_id=vector["key_id"]
    )
    signed = sign_checkpoint(checkpoint, signer)
    assert signed.body.decode() == vector["body"]
    assert base64.b64encode(signed.signature).decode() == vector["signature"]
    assert signed.to_wire().decode() == vector["wire"]
    parsed = parse_signed_checkpoint(vector["wire"].encode())
    assert verify_checkpoint(parsed, Keys(signer), node="jp") == checkpoint


# --- entries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "gossip"}, "unknown ledger entry kind"),
        ({"seq": -1}, "start at 0"),
        ({"prev_hash": b"short"}, "32 bytes"),
        ({"seq": 1, "prev_hash": GENESIS_PREV_HASH}, "only entry 0"),
        ({"seq": 0, "prev_hash": b"\x01" * 32}, "only entry 0"),
        ({"bundle_id": "two words"}, "bundle_id"),
        ({"consent_id": ""}, "consent_id"),
        ({"actor": Actor("", Role.OFFICER)}, "actor name"),
        ({"body": {"x": "y" * 17000}}, "exceeds"),
        ({"body": {"x": float("nan")}}, "canonicalised"),
        ({"now": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
    ids=[
        "unknown-kind",
        "negative-seq",
        "short-prev",
        "genesis-not-first",
        "first-not-genesis",
        "bad-bundle-id",
        "empty-consent-id",
        "empty-actor",
        "oversized-body",
        "nan-in-body",
        "naive-time",
    ],
)
def test_bad_entry_is_refused(changes: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "seq": 0,
        "now": T0,
        "kind": "bundle-read",
        "actor": OFFICER,
        "prev_hash": GENESIS_PREV_HASH,
    }
    arguments.update(changes)
    with pytest.raises(InvalidInput, match=message):
        make_entry(**arguments)


def test_system_actor_has_no_role() -> None:
    entry = make_entry(seq=0, now=T0, kind="key-event", actor=SYSTEM, prev_hash=GENESIS_PREV_HASH)
    assert json.loads(entry.canonical)["actor"] == {"name": "system", "role": None}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("body"), "exactly the entry fields"),
        (lambda d: d.update(extra=1), "exactly the entry fields"),
        (lambda d: d.update(v=2), "format"),
        (lambda d: d.update(seq=True), "seq"),
        (lambda d: d.update(kind="gossip"), "unknown"),
        (lambda d: d.update(prev_hash="zz"), "prev_hash"),
        (lambda d: d.update(time="yesterday"), "time"),
        (lambda d: d.update(actor={"name": 1, "role": None}), "actor name"),
        (lambda d: d.update(body=[]), "body"),
    ],
    ids=["no-body", "extra-field", "format", "bool-seq", "kind", "prev", "time", "actor", "body"],
)
def test_malformed_stored_entry_is_refused(mutate: Any, message: str) -> None:
    fields = json.loads(chain(1)[0].canonical)
    mutate(fields)
    with pytest.raises(InvalidInput, match=message):
        parse_entry(json.dumps(fields).encode())


def test_deeply_nested_or_huge_stored_entry_is_refused() -> None:
    with pytest.raises(InvalidInput, match="exceeds"):
        parse_entry(b"[" * 30000)
    with pytest.raises(InvalidInput):
        parse_entry(b"[" * 12000 + b"]" * 12000)


# --- the chain ---------------------------------------------------------------


def test_intact_chain_has_no_problem() -> None:
    assert verify_chain(stored(e) for e in chain(20)) is None
    assert verify_chain([]) is None


def _replace_entry(entries: list[LedgerEntry], seq: int, **body: Any) -> list[LedgerEntry]:
    forged = make_entry(
        seq=seq,
        now=entries[seq].time,
        kind=entries[seq].kind,
        actor=OFFICER,
        prev_hash=entries[seq].prev_hash,
        bundle_id=entries[seq].bundle_id,
        body=body,
    )
    return [*entries[:seq], forged, *entries[seq + 1 :]]


CHAIN_CASES: list[tuple[str, Any, int, str, str]] = [
    ("gap", lambda rows: rows[:3] + rows[4:], 3, "chain", "entry 3 is missing"),
    ("repeat", lambda rows: [*rows[:4], rows[3], *rows[4:]], 4, "chain", "repeated"),
    ("reorder", lambda rows: [rows[0], rows[2], rows[1], *rows[3:]], 1, "chain", "missing"),
    (
        "column-kind",
        lambda rows: [*rows[:2], dataclasses.replace(rows[2], kind="bundle-sent"), *rows[3:]],
        2,
        "entry-hash",
        "kind",
    ),
    (
        "column-time",
        lambda rows: [*rows[:2], dataclasses.replace(rows[2], time=T0), *rows[3:]],
        2,
        "entry-hash",
        "time",
    ),
    (
        "recorded-hash",
        lambda rows: [*rows[:5], dataclasses.replace(rows[5], entry_hash=b"\0" * 32), *rows[6:]],
        5,
        "entry-hash",
        "recorded hash",
    ),
    (
        "canonical-garbage",
        lambda rows: [*rows[:1], dataclasses.replace(rows[1], canonical=b"{"), *rows[2:]],
        1,
        "entry-hash",
        "malformed",
    ),
    (
        "rehashed-rewrite",
        lambda rows: [stored(e) for e in _replace_entry(RAW, 4, hidden=True)],
        5,
        "chain",
        "between entries 4 and 5",
    ),
    (
        "seq-inside-bytes",
        lambda rows: [*rows[:6], dataclasses.replace(stored(RAW[7]), seq=6), *rows[7:]],
        6,
        "entry-hash",
        "recorded as entry 7",
    ),
]
RAW = chain(10)


@pytest.mark.parametrize(
    ("tamper", "seq", "check", "words"),
    [case[1:] for case in CHAIN_CASES],
    ids=[case[0] for case in CHAIN_CASES],
)
def test_chain_problem_names_the_entry(tamper: Any, seq: int, check: str, words: str) -> None:
    problem = verify_chain(tamper([stored(e) for e in RAW]))
    assert problem is not None
    assert (problem.seq, problem.check) == (seq, check)
    assert words in problem.message
    error = problem.error()
    assert isinstance(error, LedgerVerificationFailed)
    assert error.exit_code == 4


# --- checkpoints -------------------------------------------------------------


def _signed(size: int, signer: Signer, *, node: str = "jp") -> Any:
    leaves = [e.leaf_hash for e in RAW[:size]]
    checkpoint = make_checkpoint(
        node=node,
        size=size,
        root=merkle.root_from_leaf_hashes(leaves),
        now=T0,
        key_id=signer.signing_key_id,
    )
    return sign_checkpoint(checkpoint, signer)


def _rewrap(wire: bytes, **changes: Any) -> bytes:
    doc = json.loads(wire)
    doc.update(changes)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


SIGNER = Signer(b"k" * 32)


def _body_with(**changes: Any) -> str:
    fields = json.loads(_signed(3, SIGNER).body)
    fields.update(changes)
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "signed checkpoint"),
        (b'{"body":"{}"}', "exactly {body, signature}"),
        (_rewrap(_signed(3, SIGNER).to_wire(), signature="***"), "base64"),
        (_rewrap(_signed(3, SIGNER).to_wire(), signature="AAAA"), "64 bytes"),
        (_rewrap(_signed(3, SIGNER).to_wire(), body=_body_with(size=-1)), "size"),
        (_rewrap(_signed(3, SIGNER).to_wire(), body=_body_with(root="00")), "root"),
        (_rewrap(_signed(3, SIGNER).to_wire(), body=_body_with(node="xx")), "node"),
        (_rewrap(_signed(3, SIGNER).to_wire(), body=_body_with(v=9)), "format"),
        (_rewrap(_signed(3, SIGNER).to_wire(), body='{"size": 1}'), "canonical"),
        (b"{" * 5000, "signed checkpoint"),
    ],
    ids=[
        "not-json",
        "no-signature",
        "signature-not-base64",
        "short-signature",
        "negative-size",
        "short-root",
        "unknown-node",
        "format",
        "non-canonical-body",
        "oversized",
    ],
)
def test_malformed_checkpoint_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(CheckpointInvalid, match=message):
        parse_signed_checkpoint(raw)


def test_checkpoint_signature_and_identity_are_checked() -> None:
    signed = _signed(5, SIGNER)
    assert verify_checkpoint(signed, Keys(SIGNER), node="jp").size == 5
    with pytest.raises(CheckpointInvalid, match="not 'pk'"):
        verify_checkpoint(signed, Keys(SIGNER), node="pk")
    impostor = Signer(b"m" * 32)  # same key id, another key
    with pytest.raises(CheckpointInvalid, match="bad signature"):
        verify_checkpoint(signed, Keys(impostor), node="jp")
    with pytest.raises(CheckpointInvalid, match="not usable"):
        verify_checkpoint(signed, Keys(Signer(b"k" * 32, "fedcba9876543210")), node="jp")
    flipped = bytearray(signed.signature)
    flipped[0] ^= 0x80
    with pytest.raises(CheckpointInvalid, match="bad signature"):
        verify_checkpoint(
            dataclasses.replace(signed, signature=bytes(flipped)), Keys(SIGNER), node="jp"
        )


def test_checkpoint_signature_is_domain_separated() -> None:
    signed = _signed(2, SIGNER)
    # The same bytes signed for another purpose do not verify as a checkpoint.
    other = bytes(SIGNER.key.sign(tagged(Purpose.RECEIPT, signed.body)).signature)
    with pytest.raises(CheckpointInvalid, match="bad signature"):
        verify_checkpoint(dataclasses.replace(signed, signature=other), Keys(SIGNER), node="jp")


def test_signer_must_hold_the_key_the_checkpoint_names() -> None:
    checkpoint = make_checkpoint(node="jp", size=0, root=merkle.EMPTY_ROOT, now=T0, key_id="other")
    with pytest.raises(InvalidInput, match="another key"):
        sign_checkpoint(checkpoint, SIGNER)


def test_checkpoint_root_check() -> None:
    signed = _signed(6, SIGNER)
    check_checkpoint_root(
        signed.checkpoint, merkle.root_from_leaf_hashes(e.leaf_hash for e in RAW[:6])
    )
    with pytest.raises(LedgerVerificationFailed, match="not the signed root") as info:
        check_checkpoint_root(
            signed.checkpoint, merkle.root_from_leaf_hashes(e.leaf_hash for e in RAW[:5])
        )
    assert (info.value.check, info.value.seq) == ("checkpoint", 5)
    with pytest.raises(LedgerVerificationFailed, match="does not have"):
        check_checkpoint_root(signed.checkpoint, None)


# --- witness audits ----------------------------------------------------------


def test_audit_accepts_a_grown_history() -> None:
    old, new = _signed(3, SIGNER).checkpoint, _signed(9, SIGNER).checkpoint
    proof = merkle.consistency_proof(3, [e.leaf_hash for e in RAW[:9]])
    audit_peer_answer(old, new, proof)
    audit_peer_answer(new, new, [])


def test_audit_refuses_rewritten_shrunk_or_foreign_history() -> None:
    old = _signed(3, SIGNER).checkpoint
    rewritten = _replace_entry(RAW, 1, hidden=True)
    leaves = [e.leaf_hash for e in rewritten[:9]]
    new = dataclasses.replace(old, size=9, root=merkle.root_from_leaf_hashes(leaves))
    with pytest.raises(WitnessMismatch, match="rewritten"):
        audit_peer_answer(old, new, merkle.consistency_proof(3, leaves))
    with pytest.raises(WitnessMismatch, match="shrank"):
        audit_peer_answer(_signed(9, SIGNER).checkpoint, old, [])
    with pytest.raises(WitnessMismatch, match="another node"):
        audit_peer_answer(old, _signed(9, SIGNER, node="pk").checkpoint, [])
    same_size_other_root = dataclasses.replace(old, root=b"\x07" * 32)
    with pytest.raises(WitnessMismatch, match="rewritten"):
        audit_peer_answer(old, same_size_other_root, [])


def test_audit_from_an_empty_witness_accepts_anything_grown() -> None:
    empty = make_checkpoint(node="jp", size=0, root=merkle.EMPTY_ROOT, now=T0, key_id="k")
    audit_peer_answer(empty, _signed(4, SIGNER).checkpoint, [])
    bogus_empty = dataclasses.replace(empty, root=b"\x01" * 32)
    with pytest.raises(WitnessMismatch, match="non-empty root"):
        audit_peer_answer(bogus_empty, _signed(4, SIGNER).checkpoint, [])


# --- the peer's consistency answer, parsed with bounds ----------------------------


def _answer_doc(**changes: Any) -> bytes:
    signed = _signed(3, SIGNER)
    doc: dict[str, Any] = {
        "first": 2,
        "checkpoint": json.loads(signed.to_wire()),
        "proof": [base64.b64encode(b"\x01" * 32).decode()],
    }
    doc.update(changes)
    return json.dumps(doc).encode()


def test_consistency_answer_keeps_the_signed_checkpoint_bytes() -> None:
    from gateway.peer.ledger_client import parse_consistency_answer  # noqa: PLC0415

    answer = parse_consistency_answer(_answer_doc())
    assert answer.proof == [b"\x01" * 32]
    assert parse_signed_checkpoint(answer.checkpoint).body == _signed(3, SIGNER).body


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[]", "not {checkpoint, proof}"),
        (_answer_doc(proof="AAAA"), "list of at most 128"),
        (_answer_doc(proof=["x"] * 129), "list of at most 128"),
        (_answer_doc(proof=[7]), "not text"),
        (_answer_doc(proof=["%%%"]), "not base64"),
        (_answer_doc(checkpoint=[]), "not an object"),
        (b"{" * 100, "nesting"),
        (b" " * 70000, "exceeds"),
    ],
    ids=[
        "not-object",
        "proof-not-list",
        "proof-too-long",
        "proof-item",
        "proof-b64",
        "checkpoint",
        "deep",
        "huge",
    ],
)
def test_unusable_consistency_answer_is_refused(raw: bytes, message: str) -> None:
    from gateway.errors import TransportError  # noqa: PLC0415
    from gateway.peer.ledger_client import parse_consistency_answer  # noqa: PLC0415

    with pytest.raises(TransportError, match=message):
        parse_consistency_answer(raw)


# --- property: any single change to any stored row is caught at that row -----------

_FIELDS = (
    "time",
    "kind",
    "actor_name",
    "actor_role",
    "bundle_id",
    "consent_id",
    "prev_hash",
    "entry_hash",
    "canonical",
)


def _mutated(row: StoredEntry, name: str) -> StoredEntry:
    value = getattr(row, name)
    if isinstance(value, bytes):
        flipped = bytearray(value)
        flipped[len(flipped) // 2] ^= 0x01
        return dataclasses.replace(row, **{name: bytes(flipped)})
    if isinstance(value, datetime):
        return dataclasses.replace(row, time=value + timedelta(microseconds=1))
    return dataclasses.replace(row, **{name: f"{value}x"})


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=1, max_value=10), st.data())
def test_any_single_field_change_is_caught_at_its_row(n: int, data: st.DataObject) -> None:
    rows = [stored(e) for e in RAW[:n]]
    seq = data.draw(st.integers(min_value=0, max_value=n - 1))
    name = data.draw(st.sampled_from(_FIELDS))
    rows[seq] = _mutated(rows[seq], name)
    problem = verify_chain(rows)
    assert problem is not None
    assert problem.seq == seq


# --- the fast canonical form of entries ---------------------------------------

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=6))
def test_entry_canonical_is_rfc8785_byte_for_byte(value: dict[str, Any]) -> None:
    """The C-encoder path may be taken only where it writes exactly the RFC 8785 bytes."""
    from gateway.core.canonical import canonical_bytes  # noqa: PLC0415
    from gateway.core.ledger import entry_canonical  # noqa: PLC0415
    from gateway.errors import InvalidInput  # noqa: PLC0415

    try:
        expected = canonical_bytes(value)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            entry_canonical(value)
        return
    assert entry_canonical(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"\ue000": 1, "\U0001f600": 2},  # UTF-16 order differs from code-point order
        {"a": '\u2028\x7f\x00\x1f"\\'},
        {"n": 2**53 - 1, "m": -(2**53 - 1)},
        {"f": 1.0, "g": 1e21},
    ],
    ids=["non-bmp-keys", "escapes", "safe-integers", "floats"],
)
def test_entry_canonical_edge_cases(value: dict[str, Any]) -> None:
    from gateway.core.canonical import canonical_bytes  # noqa: PLC0415
    from gateway.core.ledger import entry_canonical  # noqa: PLC0415

    assert entry_canonical(value) == canonical_bytes(value)


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=6),
    name=st.text(min_size=1, max_size=12),
    seq=st.integers(min_value=1, max_value=2**62),
    moment=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
)
def test_an_entry_is_the_rfc8785_text_of_its_fields(
    body: dict[str, Any], name: str, seq: int, moment: datetime
) -> None:
    """make_entry picks the encoder once from the body: the result is still RFC 8785."""
    from gateway.core.canonical import canonical_bytes  # noqa: PLC0415

    fields = {
        "v": 1,
        "seq": seq,
        "time": format_time(moment),
        "kind": "bundle-read",
        "actor": {"name": name, "role": "officer"},
        "bundle_id": None,
        "consent_id": None,
        "body": body,
        "prev_hash": (b"\x01" * 32).hex(),
    }
    try:
        expected = canonical_bytes(fields)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            make_entry(
                seq=seq,
                now=moment,
                kind="bundle-read",
                actor=Actor(name, Role.OFFICER),
                prev_hash=b"\x01" * 32,
                body=body,
            )
        return
    if len(canonical_bytes(body)) > MAX_BODY_BYTES:
        return
    entry = make_entry(
        seq=seq,
        now=moment,
        kind="bundle-read",
        actor=Actor(name, Role.OFFICER),
        prev_hash=b"\x01" * 32,
        body=body,
    )
    assert entry.canonical == expected
    assert entry.time == parse_time(format_time(moment))
    assert entry.time.tzinfo is UTC
