"""Shared builders for the envelope tests: real keys, real manifests, fixed randomness.

No tests here; the envelope unit, attack and integration tests import it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose
from gateway.core.envelope import (
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    AttachmentSource,
    SealedEnvelope,
    seal,
)
from gateway.core.keys import (
    KeyManifest,
    ManifestKey,
    NodeKeyring,
    Revocation,
    key_id,
    manifest_payload,
    parse_manifest,
    sign_manifest,
)
from gateway.core.policy import Policy

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2028, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 25, 21, 0, 0, tzinfo=UTC)

POLICY = Policy.from_data(tomllib.loads((REPO / "policies" / "policy.toml").read_text("utf-8")))


def example(case_type: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"{case_type}.json").read_text("utf-8"))
    return data


@dataclass
class NodeKeys:
    """A node's real keys: root, signing and encryption, with its root-signed manifest."""

    node: str
    root: SigningKey
    sign: SigningKey
    enc: PrivateKey
    manifest: KeyManifest
    keyring: NodeKeyring


def node_keys(
    node: str,
    tag: int,
    *,
    revoked: Sequence[str] = (),
    sign_window: tuple[datetime, datetime] = (T0, T1),
) -> NodeKeys:
    """Keys derived from ``tag`` (so every run and every vector uses the same ones)."""
    root = SigningKey(bytes([tag]) * 32)
    sign = SigningKey(bytes([tag + 1]) * 32)
    enc = PrivateKey(bytes([tag + 2]) * 32)
    sign_id = key_id(bytes(sign.verify_key))
    enc_id = key_id(bytes(enc.public_key))
    which = {"sign": sign_id, "encrypt": enc_id}
    listed = [
        ManifestKey(sign_id, "sign", bytes(sign.verify_key), *sign_window),
        ManifestKey(enc_id, "encrypt", bytes(enc.public_key), T0, T1),
    ]
    if revoked:
        # A manifest always lists usable keys; the revoked ones have successors.
        for use, seed in (("sign", tag + 3), ("encrypt", tag + 4)):
            if use == "sign":
                public = bytes(SigningKey(bytes([seed]) * 32).verify_key)
            else:
                public = bytes(PrivateKey(bytes([seed]) * 32).public_key)
            listed.append(ManifestKey(key_id(public), use, public, T0, T1))  # type: ignore[arg-type]
    payload = manifest_payload(
        node=node,
        version=1,
        issued_at=T0,
        expires_at=T1,
        root_public=bytes(root.verify_key),
        keys=listed,
        revocations=[Revocation(which[use], T0, "compromised") for use in revoked],
    )
    manifest = parse_manifest(sign_manifest(payload, [root]))
    keyring = NodeKeyring(
        node=node,
        manifest=manifest,
        signing_key_id=sign_id,
        signing_key=sign,
        encryption_keys={enc_id: enc},
    )
    return NodeKeys(node, root, sign, enc, manifest, keyring)


JP = node_keys("jp", 10)
PK = node_keys("pk", 20)
IMPOSTOR_JP = node_keys("jp", 30)
IMPOSTOR_PK = node_keys("pk", 40)


class FixedRandom:
    """Deterministic randomness for vectors: SHAKE-256(seed || counter), drawn in order."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.counter = 0
        self.draws: list[bytes] = []

    def __call__(self, count: int) -> bytes:
        value = hashlib.shake_256(self.seed + self.counter.to_bytes(4, "big")).digest(count)
        self.counter += 1
        self.draws.append(value)
        return value


def seal_bytes(
    sender: NodeKeys,
    recipient: NodeKeys,
    case_type: str = "broker-misconduct",
    *,
    case: dict[str, Any] | None = None,
    attachments: Sequence[tuple[str, bytes]] = (),
    now: datetime = NOW,
    sequence: int = 1,
    policy: Policy = POLICY,
    random: Callable[[int], bytes] | None = None,
    **options: Any,
) -> tuple[bytes, SealedEnvelope]:
    out = io.BytesIO()
    sources = [AttachmentSource(name, len(data), io.BytesIO(data)) for name, data in attachments]
    extra: dict[str, Any] = {"random": random} if random is not None else {}
    sealed = seal(
        out,
        case_type=case_type,
        case=case if case is not None else example(case_type),
        attachments=sources,
        keyring=sender.keyring,
        peer_manifest=recipient.manifest,
        policy=policy,
        sequence=sequence,
        now=now,
        **extra,
        **options,
    )
    return out.getvalue(), sealed


def split(envelope: bytes) -> tuple[bytes, dict[str, Any], bytes, bytes]:
    """(prefix, header as JSON, signature, ciphertext section) of an envelope."""
    length = int.from_bytes(envelope[10:14], "big")
    header = envelope[PREFIX_BYTES : PREFIX_BYTES + length]
    signature = envelope[PREFIX_BYTES + length : PREFIX_BYTES + length + SIGNATURE_BYTES]
    rest = envelope[PREFIX_BYTES + length + SIGNATURE_BYTES :]
    return envelope[:PREFIX_BYTES], json.loads(header), signature, rest


def rebuild(
    envelope: bytes,
    edit: Callable[[dict[str, Any]], None] | None = None,
    *,
    signer: SigningKey | None = None,
    ciphertext: bytes | None = None,
) -> bytes:
    """The envelope with its header edited, optionally re-signed by ``signer``
    (otherwise the old signature stays), optionally with new ciphertext."""
    prefix, header, signature, rest = split(envelope)
    if edit is not None:
        edit(header)
    raw = canonical_bytes(header)
    if signer is not None:
        from gateway.core.domain import tagged  # noqa: PLC0415

        signature = bytes(signer.sign(tagged(Purpose.ENVELOPE_HEADER, raw)).signature)
    new_prefix = prefix[:10] + len(raw).to_bytes(4, "big")
    return new_prefix + raw + signature + (rest if ciphertext is None else ciphertext)
