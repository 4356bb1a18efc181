"""Envelope: round trips, known-answer vectors, and refusal of every tampering."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from gateway.core.canonical import canonical_bytes
from gateway.core.cases import CASE_TYPES, validate_case
from gateway.core.domain import Purpose, tagged
from gateway.core.envelope import (
    PREFIX_BYTES,
    AttachmentInfo,
    AttachmentSource,
    EnvelopeInvalid,
    OpenedEnvelope,
    content_key_commitment,
    open_envelope,
    read_header,
    seal,
    stream_key,
    verify_envelope,
)
from gateway.core.policy import Limits
from gateway.core.secretstream import CHUNK_SIZE, ciphertext_size
from gateway.errors import InvalidInput, PolicyRefused, VerificationError
from tests.unit.test_envelope_support import (
    JP,
    NOW,
    PK,
    POLICY,
    FixedRandom,
    NodeKeys,
    example,
    node_keys,
    seal_bytes,
    split,
)

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "envelope_vectors.json").read_text("utf-8")
)["vectors"]


def open_bytes(
    envelope: bytes,
    reader: NodeKeys,
    peer: NodeKeys,
    *,
    now: datetime = NOW,
    sinks: dict[int, io.BytesIO] | None = None,
) -> OpenedEnvelope:
    def sink_factory(info: AttachmentInfo) -> io.BytesIO:
        assert sinks is not None
        sinks[info.index] = io.BytesIO()
        return sinks[info.index]

    return open_envelope(
        io.BytesIO(envelope),
        keyring=reader.keyring,
        peer_manifest=peer.manifest,
        policy=POLICY,
        now=now,
        sink_factory=sink_factory if sinks is not None else None,
    )


def check(
    envelope: bytes, reader: NodeKeys = PK, peer: NodeKeys = JP, *, now: datetime = NOW
) -> str:
    """The name of the check that refuses ``envelope`` (or "accepted")."""
    try:
        open_bytes(envelope, reader, peer, now=now, sinks={})
    except EnvelopeInvalid as exc:
        return exc.check
    return "accepted"


ATTACHMENTS = [
    ("passport scan.pdf", bytes(range(256)) * 300),  # 76800 bytes: two chunks
    ("exactly one chunk.bin", b"\x01" * CHUNK_SIZE),
    ("empty.txt", b""),
]


@pytest.mark.parametrize("with_attachments", [False, True], ids=["bare", "attachments"])
@pytest.mark.parametrize("case_type", sorted(CASE_TYPES))
@pytest.mark.parametrize(("sender", "recipient"), [(JP, PK), (PK, JP)], ids=["jp-pk", "pk-jp"])
def test_round_trip_every_case_type(
    case_type: str, with_attachments: bool, sender: NodeKeys, recipient: NodeKeys
) -> None:
    attachments = ATTACHMENTS if with_attachments else []
    envelope, sealed = seal_bytes(sender, recipient, case_type, attachments=attachments)
    assert sealed.size == len(envelope) == sealed.header.envelope_size
    header = verify_envelope(
        io.BytesIO(envelope),
        keyring=recipient.keyring,
        peer_manifest=sender.manifest,
        policy=POLICY,
        now=NOW,
    )
    assert header == sealed.header
    sinks: dict[int, io.BytesIO] = {}
    opened = open_bytes(envelope, recipient, sender, sinks=sinks)
    assert opened.case_data == validate_case(case_type, example(case_type)).model_dump(mode="json")
    assert type(opened.case) is CASE_TYPES[case_type].model
    assert [(a.name, a.size) for a in opened.attachments] == [
        (name, len(data)) for name, data in attachments
    ]
    for index, (_, data) in enumerate(attachments):
        assert sinks[index].getvalue() == data
        assert opened.written[index].sha256 == hashlib.sha256(data).hexdigest()
    assert header.sender == sender.node
    assert header.recipient == recipient.node
    assert header.type == case_type


def test_header_names_everything_the_spec_asks_for() -> None:
    envelope, sealed = seal_bytes(
        JP, PK, "information-reply", sequence=7, reply_to="0f8fad5b-d9cb-469f-a165-70867728950e"
    )
    header = split(envelope)[1]
    assert header["format"] == 1
    assert header["sender"] == "jp"
    assert header["recipient"] == "pk"
    assert header["sequence"] == 7
    assert header["created_at"] == "2026-11-25T21:00:00Z"
    assert header["signing_key_id"] == JP.keyring.signing_key_id
    assert header["recipient_key_id"] == PK.manifest.current_encryption_key(now=NOW).key_id
    assert header["archive_key_id"] == JP.keyring.current_encryption_key_id
    assert header["marking"] == "confidential"
    assert header["reply_to"] == "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert header["schema_version"] == "1"
    assert header["policy_version"] == POLICY.version
    assert header["ciphertext_sha256"] == hashlib.sha256(split(envelope)[3]).hexdigest()
    assert sealed.bundle_id == header["bundle_id"]


def test_public_marking_travels_in_the_header() -> None:
    envelope, sealed = seal_bytes(JP, PK, marking="public")
    assert sealed.header.marking == "public"
    assert open_bytes(envelope, PK, JP).header.marking == "public"


def test_sender_opens_its_own_archive_copy() -> None:
    envelope, _ = seal_bytes(JP, PK, attachments=ATTACHMENTS[:1])
    sinks: dict[int, io.BytesIO] = {}
    opened = open_bytes(envelope, JP, PK, sinks=sinks)
    assert opened.case == validate_case("broker-misconduct", example("broker-misconduct"))
    assert sinks[0].getvalue() == ATTACHMENTS[0][1]


def test_fresh_bundle_id_and_content_key_per_bundle() -> None:
    first, one = seal_bytes(JP, PK)
    second, two = seal_bytes(JP, PK)
    assert one.bundle_id != two.bundle_id
    assert split(first)[1]["key_commitment"] != split(second)[1]["key_commitment"]


def test_read_header_needs_no_keys_and_stops_at_the_signature() -> None:
    envelope, sealed = seal_bytes(JP, PK)
    stream = io.BytesIO(envelope)
    header, raw = read_header(stream, POLICY.limits)
    assert header == sealed.header
    assert raw == sealed.header.raw
    assert stream.tell() == PREFIX_BYTES + len(raw)


# --- known-answer vectors ----------------------------------------------------------


def _vector_keys(spec: dict[str, Any]) -> tuple[NodeKeys, bytes]:
    tag = bytes.fromhex(spec["root_seed"])[0]
    keys = node_keys(spec["node"], tag)
    assert base64.b64encode(keys.manifest.raw).decode() == spec["manifest"]
    return keys, bytes.fromhex(spec["encryption_secret"])


def _vector_attachments(vector: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [
        (a["name"], bytes((a["start"] + 7 * i) % 251 for i in range(a["size"])))
        for a in vector["attachments"]
    ]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_vector_seals_to_the_same_bytes(vector: dict[str, Any]) -> None:
    sender, _ = _vector_keys(vector["sender"])
    recipient, _ = _vector_keys(vector["recipient"])
    feed = iter(bytes.fromhex(d) for d in vector["random_draws"])
    options: dict[str, Any] = {"marking": vector["marking"]}
    if vector["reply_to"] is not None:
        options["reply_to"] = vector["reply_to"]
    envelope, sealed = seal_bytes(
        sender,
        recipient,
        vector["case_type"],
        case=vector["case"],
        attachments=_vector_attachments(vector),
        sequence=vector["sequence"],
        now=datetime.fromisoformat(vector["now"].replace("Z", "+00:00")),
        random=lambda count: next(feed),
        **options,
    )
    assert sealed.header.raw.decode() == vector["header"]
    assert envelope[:PREFIX_BYTES].hex() == vector["envelope_prefix_hex"]
    assert split(envelope)[2].hex() == vector["signature"]
    assert len(envelope) == vector["envelope_size"]
    assert hashlib.sha256(envelope).hexdigest() == vector["envelope_sha256"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_vector_decrypts_with_bare_libsodium(vector: dict[str, Any]) -> None:
    """Another implementation's view: only libsodium calls and the documented layout."""
    sender, _ = _vector_keys(vector["sender"])
    recipient, secret = _vector_keys(vector["recipient"])
    feed = iter(bytes.fromhex(d) for d in vector["random_draws"])
    envelope, _ = seal_bytes(
        sender,
        recipient,
        vector["case_type"],
        case=vector["case"],
        attachments=_vector_attachments(vector),
        sequence=vector["sequence"],
        marking=vector["marking"],
        **({"reply_to": vector["reply_to"]} if vector["reply_to"] else {}),
        random=lambda count: next(feed),
    )
    header_raw = vector["header"].encode()
    header = json.loads(header_raw)
    SigningKey(bytes.fromhex(vector["sender"]["signing_seed"])).verify_key.verify(
        tagged(Purpose.ENVELOPE_HEADER, header_raw), bytes.fromhex(vector["signature"])
    )
    public = bytes(PrivateKey(secret).public_key)
    content_key = sodium.crypto_box_seal_open(
        base64.b64decode(header["sealed_key"]), public, secret
    )
    assert content_key.hex() == vector["content_key"]
    assert (
        content_key_commitment(content_key, header["bundle_id"]).hex() == header["key_commitment"]
    )
    body = envelope[PREFIX_BYTES + len(header_raw) + 64 :]
    assert hashlib.sha256(body).hexdigest() == header["ciphertext_sha256"]
    sizes = [header["content_size"], *header["attachment_sizes"]]
    offset = 0
    plain: list[bytes] = []
    for index, size in enumerate(sizes):
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        key = stream_key(content_key, header["bundle_id"], index)
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(
            state, body[offset : offset + 24], key
        )
        offset += 24
        out = b""
        remaining = size
        while True:
            take = min(CHUNK_SIZE, remaining)
            chunk, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                state, body[offset : offset + take + 17], None
            )
            offset += take + 17
            remaining -= take
            out += chunk
            if tag == sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL:
                break
        assert len(out) == size
        assert ciphertext_size(size) == 24 + size + 17 * max(1, -(-size // CHUNK_SIZE))
        plain.append(out)
    assert offset == len(body)
    content = json.loads(plain[0])
    assert content["case"] == validate_case(vector["case_type"], vector["case"]).model_dump(
        mode="json"
    )
    for data, spec in zip(plain[1:], vector["attachments"], strict=True):
        assert hashlib.sha256(data).hexdigest() == spec["sha256"]


# --- every bit matters -------------------------------------------------------------

SMALL, _SMALL_SEALED = seal_bytes(JP, PK, "consent-revocation", attachments=[("a", b"x" * 300)])


def test_small_envelope_is_accepted_untouched() -> None:
    assert check(SMALL) == "accepted"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, len(SMALL) * 8 - 1))
def test_any_single_bit_flip_is_refused(position: int) -> None:
    tampered = bytearray(SMALL)
    tampered[position // 8] ^= 1 << (position % 8)
    assert check(bytes(tampered)) != "accepted"


@settings(max_examples=150, deadline=None)
@given(length=st.integers(0, len(SMALL) - 1))
def test_any_truncation_is_refused(length: int) -> None:
    assert check(SMALL[:length]) != "accepted"


@pytest.mark.parametrize("extra", [b"\x00", b"junk" * 10])
def test_appended_bytes_are_refused(extra: bytes) -> None:
    assert check(SMALL + extra) == "format"


@pytest.mark.parametrize(
    ("region", "expected"),
    [
        (0, "format"),  # magic
        (9, "format"),  # version
        (PREFIX_BYTES + 3, "format"),  # header JSON broken or non-canonical
        (-1, "ciphertext-hash"),  # last ciphertext byte
        (len(SMALL) - 400, "ciphertext-hash"),
    ],
)
def test_flip_names_the_check(region: int, expected: str) -> None:
    tampered = bytearray(SMALL)
    tampered[region] ^= 0x01
    assert check(bytes(tampered)) == expected


def test_signature_flip_names_the_signature_check() -> None:
    header_length = int.from_bytes(SMALL[10:14], "big")
    tampered = bytearray(SMALL)
    tampered[PREFIX_BYTES + header_length + 5] ^= 0x80
    assert check(bytes(tampered)) == "signature"


# --- time and keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(0), "accepted"),
        (timedelta(seconds=-299), "accepted"),  # receiver's clock 299 s behind
        (timedelta(seconds=-301), "freshness"),  # header 301 s in the receiver's future
        (timedelta(days=364), "accepted"),
        (timedelta(days=365, seconds=1), "freshness"),  # older than the policy allows
    ],
)
def test_freshness_window(delta: timedelta, expected: str) -> None:
    assert check(SMALL, now=NOW + delta) == expected


def test_revoked_signing_key_is_refused() -> None:
    revoked = node_keys("jp", 10, revoked=["sign"])
    assert check(SMALL, PK, revoked) == "signing-key"


def test_signing_key_outside_its_window_is_refused() -> None:
    early = node_keys("jp", 10, sign_window=(NOW + timedelta(days=1), NOW + timedelta(days=90)))
    assert check(SMALL, PK, early) == "signing-key"


def test_revoked_signing_key_cannot_seal() -> None:
    revoked = node_keys("jp", 10, revoked=["sign"])
    with pytest.raises(VerificationError):
        seal_bytes(revoked, PK)


# --- refusing to seal bad input ----------------------------------------------------


def test_bad_case_data_is_refused_before_anything_is_written() -> None:
    out = io.BytesIO()
    data = example("broker-misconduct")
    del data["broker"]["licence_number"]
    with pytest.raises(InvalidInput, match=r"broker\.licence_number: field required"):
        seal(
            out,
            case_type="broker-misconduct",
            case=data,
            keyring=JP.keyring,
            peer_manifest=PK.manifest,
            policy=POLICY,
            sequence=1,
            now=NOW,
        )
    assert out.getvalue() == b""


@pytest.mark.parametrize(
    ("declared", "actual", "words"),
    [(100, b"x" * 50, "ended 50 bytes before"), (10, b"x" * 11, "more bytes than")],
)
def test_attachment_that_changed_size_is_refused(declared: int, actual: bytes, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        seal(
            io.BytesIO(),
            case_type="consultation",
            case=example("consultation"),
            attachments=[AttachmentSource("a", declared, io.BytesIO(actual))],
            keyring=JP.keyring,
            peer_manifest=PK.manifest,
            policy=POLICY,
            sequence=1,
            now=NOW,
        )


def test_attachment_limits_apply_when_sealing() -> None:
    tight = POLICY.model_copy(
        update={"limits": Limits(max_attachments=1, max_attachment_bytes=100 * 1024)}
    )
    with pytest.raises(PolicyRefused, match="2 attachments exceed"):
        seal_bytes(JP, PK, attachments=[("a", b"1"), ("b", b"2")], policy=tight)
    with pytest.raises(PolicyRefused, match="exceeds the limit"):
        seal_bytes(JP, PK, attachments=[("a", b"1" * (100 * 1024 + 1))], policy=tight)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"sequence": 0}, "sequence"),
        ({"reply_to": "../etc"}, "reply_to"),
        ({"marking": "secret"}, "marking"),
    ],
)
def test_bad_sealing_arguments_are_refused(options: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        seal_bytes(JP, PK, **options)


def test_sealing_for_oneself_is_refused() -> None:
    with pytest.raises(InvalidInput, match="for the peer"):
        seal_bytes(JP, JP)


def test_randomness_is_drawn_in_the_documented_order() -> None:
    random = FixedRandom(b"order")
    _, sealed = seal_bytes(JP, PK, attachments=[("a", b"1")], random=random)
    assert [len(d) for d in random.draws] == [16, 32, 32, 32, 24, 24]
    assert sealed.bundle_id.replace("-", "")[:12] == random.draws[0].hex()[:12]


def test_created_at_is_whole_seconds_utc() -> None:
    _, sealed = seal_bytes(JP, PK, now=datetime(2026, 11, 25, 21, 0, 0, 999999, tzinfo=UTC))
    assert sealed.header.created_at == datetime(2026, 11, 25, 21, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("case_type", sorted(CASE_TYPES))
def test_a_validated_model_seals_to_the_same_bytes_without_a_second_validation(
    case_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.core.envelope as envelope_module  # noqa: PLC0415

    model = validate_case(case_type, example(case_type))
    from_data, sealed = seal_bytes(JP, PK, case_type, random=FixedRandom(b"same"))
    calls: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return validate_case(*args, **kwargs)

    monkeypatch.setattr(envelope_module, "validate_case", counting)
    out = io.BytesIO()
    from_model = seal(
        out,
        case_type=case_type,
        case=model,
        keyring=JP.keyring,
        peer_manifest=PK.manifest,
        policy=POLICY,
        sequence=1,
        now=NOW,
        random=FixedRandom(b"same"),
    )
    assert out.getvalue() == from_data
    assert from_model.header == sealed.header
    assert calls == []
    seal_bytes(JP, PK, case_type, random=FixedRandom(b"same"))
    assert calls == [case_type]  # plain data is validated, once


def test_the_header_seal_returns_is_the_one_a_reader_parses() -> None:
    envelope, sealed = seal_bytes(JP, PK, "consultation", reply_to=None)
    header, raw = read_header(io.BytesIO(envelope), POLICY.limits)
    assert header == sealed.header
    assert raw == sealed.header.raw


def test_a_model_of_another_case_type_is_validated_as_data() -> None:
    other = validate_case("consultation", example("consultation"))
    with pytest.raises(InvalidInput, match="broker-misconduct"):
        seal_bytes(JP, PK, "broker-misconduct", case=other)  # type: ignore[arg-type]


def test_a_validated_model_over_the_case_limit_is_refused() -> None:
    data = {**example("consultation"), "minutes": "m" * 2000}
    model = validate_case("consultation", data)
    size = len(canonical_bytes(model.model_dump(mode="json")))
    tight = POLICY.model_copy(update={"limits": Limits(max_case_bytes=size - 1)})
    with pytest.raises(InvalidInput, match="exceeds the limit"):
        seal_bytes(JP, PK, "consultation", case=model, policy=tight)  # type: ignore[arg-type]
