"""The envelope: the signed, encrypted wire form of one case bundle (SPEC §5).

Byte layout, reasons and test vectors: ``docs/envelope.md``. Pure: every
function takes file objects the caller opened, the time as ``now`` and the
randomness through the ``random`` seam; nothing here opens a path, reads a
clock or draws randomness of its own accord.

Public interface::

    seal(out: BinaryIO, *, case_type: str, case: Mapping[str, Any] | BaseModel,
         attachments: Sequence[AttachmentSource] = (), keyring: NodeKeyring,
         peer_manifest: KeyManifest, policy: Policy, sequence: int, now: datetime,
         marking: Marking | None = None, reply_to: str | None = None,
         random: Callable[[int], bytes] = nacl.utils.random) -> SealedEnvelope

    read_header(stream: BinaryIO, limits: Limits) -> tuple[EnvelopeHeader, bytes]

    verify_envelope(stream: BinaryIO, *, keyring: NodeKeyring,
                    peer_manifest: KeyManifest, policy: Policy,
                    now: datetime) -> EnvelopeHeader

    open_envelope(stream: BinaryIO, *, keyring: NodeKeyring,
                  peer_manifest: KeyManifest, policy: Policy, now: datetime,
                  sink_factory: Callable[[AttachmentInfo], BinaryIO] | None = None
                  ) -> OpenedEnvelope

``seal`` needs a seekable ``out`` (a file, or ``io.BytesIO``): it writes the
ciphertext while hashing it, then goes back to write the header, whose length
is known in advance, and its signature. If it raises, what it wrote is
garbage the caller discards (the shell writes to a temporary file).

``verify_envelope`` is the receiver's check before it stores anything: format
and sizes against the policy limits, sender pinned, signing key valid and
unrevoked at the creation time, recipient is this node with a key it holds,
signature, freshness, the ciphertext hash (one pass over the bytes, decrypting
nothing), and that the sealed content key opens and matches its commitment.

``open_envelope`` does all of that on a seekable stream, then goes back and
decrypts: the case is validated against its schema, each attachment is
decrypted into the file object ``sink_factory`` returns for it. A node opens
its own archive copy the same way (the content key is sealed to it as well).
Freshness is judged against ``now``; when opening a stored envelope pass the
time it was received (or, for an archive copy, its creation time).

Every failure raises a subclass of :class:`EnvelopeInvalid`
(:class:`~gateway.errors.VerificationError`) whose ``check`` names the step:
``format``, ``size``, ``sender``, ``signing-key``, ``recipient``,
``signature``, ``ciphertext-hash``, ``key-commitment``, ``freshness``,
``decrypt``, ``content``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import re
import struct
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any, BinaryIO, Final

import nacl.bindings as sodium
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils
from pydantic import BaseModel

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.cases import CASE_TYPES, InvalidCase, case_type_for, validate_case
from gateway.core.domain import SHA256_HEX, Purpose, tagged
from gateway.core.keys import (
    KeyManifest,
    KeyNotUsable,
    NodeKeyring,
    SignatureSuspect,
    StoredTrust,
    format_time,
    parse_time,
)
from gateway.core.policy import Limits, Marking, Policy
from gateway.core.secretstream import (
    CHUNK_SIZE,
    KEY_BYTES,
    StreamDecryptError,
    StreamSourceError,
    ciphertext_size,
    decrypt_stream,
    encrypt_stream,
    read_exact,
)
from gateway.errors import InvalidInput, PolicyRefused, VerificationError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_NAME_BYTES",
    "PREFIX_BYTES",
    "SEALED_KEY_BYTES",
    "SIGNATURE_BYTES",
    "AttachmentInfo",
    "AttachmentSource",
    "CiphertextHasher",
    "EnvelopeCiphertextHashMismatch",
    "EnvelopeContentInvalid",
    "EnvelopeDecryptFailed",
    "EnvelopeFormatError",
    "EnvelopeHeader",
    "EnvelopeInvalid",
    "EnvelopeKeyCommitmentMismatch",
    "EnvelopeRecipientInvalid",
    "EnvelopeSenderInvalid",
    "EnvelopeSignatureInvalid",
    "EnvelopeSigningKeyInvalid",
    "EnvelopeStale",
    "EnvelopeSuspect",
    "EnvelopeTooLarge",
    "KnownCiphertext",
    "OpenedAttachment",
    "OpenedEnvelope",
    "SealedEnvelope",
    "check_content_key",
    "content_key_commitment",
    "open_envelope",
    "read_header",
    "seal",
    "sealed_box",
    "stream_key",
    "verify_envelope",
    "verify_envelope_signature",
]

MAGIC: Final = b"SSWG-ENV"
FORMAT_VERSION: Final = 1
_PREFIX = struct.Struct(">8sHI")  # magic, format version, header length
PREFIX_BYTES: Final = _PREFIX.size  # 14
SIGNATURE_BYTES: Final = 64
SEALED_KEY_BYTES: Final = 32 + KEY_BYTES + 16  # ephemeral public key, key, MAC
MAX_NAME_BYTES: Final = 1024
"""Longest attachment name (UTF-8 bytes) a sealer accepts; names are data."""
_CONTENT_OVERHEAD: Final = 4096
_PER_ATTACHMENT_OVERHEAD: Final = MAX_NAME_BYTES * 6 + 64  # JSON escaping of the worst name
STREAM_KEY_PURPOSE: Final = b"ssw-gateway/envelope-stream-key/v1"

_BUNDLE_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.\-]{0,31}")
_NODES = frozenset({"jp", "pk"})
_HEADER_FIELDS = frozenset(
    {
        "format",
        "bundle_id",
        "type",
        "schema_version",
        "policy_version",
        "sender",
        "recipient",
        "sequence",
        "created_at",
        "signing_key_id",
        "recipient_key_id",
        "archive_key_id",
        "sealed_key",
        "archive_sealed_key",
        "marking",
        "reply_to",
        "key_commitment",
        "chunk_size",
        "content_size",
        "attachment_sizes",
        "ciphertext_sha256",
    }
)
_OPTIONAL_HEADER_FIELDS = frozenset({"replaces"})
"""Header fields present only when used; absent, the header is byte for byte as before."""
_MAX_SEQUENCE = 2**53 - 1


# --- errors ------------------------------------------------------------------------


class EnvelopeInvalid(VerificationError):
    """An envelope failed a check; ``check`` names which one."""

    reason = "envelope"

    def __init__(self, message: str) -> None:
        super().__init__(message, check=self.check, reason=f"envelope.{self.check}")


class EnvelopeFormatError(EnvelopeInvalid):
    check = "format"


class EnvelopeTooLarge(EnvelopeInvalid):
    check = "size"


class EnvelopeSenderInvalid(EnvelopeInvalid):
    check = "sender"


class EnvelopeSigningKeyInvalid(EnvelopeInvalid):
    check = "signing-key"


class EnvelopeSuspect(EnvelopeInvalid):
    """A stored envelope signed by a key distrusted before it was stored (see
    :meth:`~gateway.core.keys.KeyManifest.stored_signing_key`)."""

    check = "suspect"


class EnvelopeRecipientInvalid(EnvelopeInvalid):
    check = "recipient"


class EnvelopeSignatureInvalid(EnvelopeInvalid):
    check = "signature"


class EnvelopeCiphertextHashMismatch(EnvelopeInvalid):
    check = "ciphertext-hash"


class EnvelopeKeyCommitmentMismatch(EnvelopeInvalid):
    check = "key-commitment"


class EnvelopeStale(EnvelopeInvalid):
    check = "freshness"


class EnvelopeDecryptFailed(EnvelopeInvalid):
    check = "decrypt"


class EnvelopeContentInvalid(EnvelopeInvalid):
    check = "content"


# --- values ------------------------------------------------------------------------


@dataclass(frozen=True)
class AttachmentSource:
    """An attachment to seal: its name (data, not a path), exact size, and an open file."""

    name: str
    size: int
    stream: BinaryIO


@dataclass(frozen=True)
class AttachmentInfo:
    """What the decrypted content says about attachment ``index`` (0-based)."""

    index: int
    name: str
    size: int


@dataclass(frozen=True)
class OpenedAttachment:
    index: int
    name: str
    size: int
    sha256: str
    """SHA-256 of the plaintext, hex; attachments are stored and named by it."""


@dataclass(frozen=True)
class EnvelopeHeader:
    """The parsed header; ``raw`` holds the exact signed bytes."""

    bundle_id: str
    type: str
    schema_version: str
    policy_version: str
    sender: str
    recipient: str
    sequence: int
    created_at: datetime
    signing_key_id: str
    recipient_key_id: str
    archive_key_id: str
    sealed_key: bytes
    archive_sealed_key: bytes
    marking: Marking
    reply_to: str | None
    key_commitment: bytes
    chunk_size: int
    content_size: int
    attachment_sizes: tuple[int, ...]
    ciphertext_sha256: bytes
    raw: bytes
    replaces: str | None = None
    """The bundle this one re-sends under current keys (``gateway resend``), if any."""

    @property
    def attachment_count(self) -> int:
        return len(self.attachment_sizes)

    @cached_property
    def ciphertext_size(self) -> int:
        """Bytes of the ciphertext section, fixed by the sizes in the header
        (computed once per header: the header is frozen)."""
        sizes = (self.content_size, *self.attachment_sizes)
        return sum(ciphertext_size(size, self.chunk_size) for size in sizes)

    @property
    def envelope_size(self) -> int:
        return PREFIX_BYTES + len(self.raw) + SIGNATURE_BYTES + self.ciphertext_size


@dataclass(frozen=True)
class SealedEnvelope:
    """What :func:`seal` wrote: the header (bundle id, sequence...) and the size."""

    header: EnvelopeHeader
    size: int

    @property
    def bundle_id(self) -> str:
        return self.header.bundle_id


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted envelope: header, validated case, attachments."""

    header: EnvelopeHeader
    case: BaseModel
    case_data: dict[str, Any]
    attachments: tuple[AttachmentInfo, ...]
    written: tuple[OpenedAttachment, ...]
    """The attachments decrypted into sinks (all of them when a sink factory was given)."""
    trust: StoredTrust = StoredTrust.VALID
    """How the signing key was judged (``verified-while-trusted`` for a key revoked
    after the envelope was stored; ``suspect-accepted`` when a person accepted it)."""


# --- primitives --------------------------------------------------------------------


def _blake2b(key: bytes, message: bytes, size: int) -> bytes:
    return hashlib.blake2b(message, key=key, digest_size=size).digest()


@lru_cache(maxsize=256)
def _bundle_bytes(bundle_id: str) -> bytes:
    # Pure, and asked twice per envelope (key commitment, stream keys): cached.
    if _BUNDLE_ID_RE.fullmatch(bundle_id):  # the form every header carries: hex and dashes
        return bytes.fromhex(bundle_id.replace("-", ""))
    return uuid.UUID(bundle_id).bytes


def content_key_commitment(content_key: bytes, bundle_id: str) -> bytes:
    """BLAKE2b-256 keyed by the content key over the tagged bundle id.

    Published in the signed header, it commits the sender to one content key:
    both sealed copies must open to it, and no second key can be found that
    decrypts the same ciphertext to something else.
    """
    return _blake2b(
        content_key, tagged(Purpose.CONTENT_KEY_COMMITMENT, _bundle_bytes(bundle_id)), 32
    )


def stream_key(content_key: bytes, bundle_id: str, index: int) -> bytes:
    """The secretstream key of stream ``index`` (0 = content, 1.. = attachments)."""
    message = tagged(STREAM_KEY_PURPOSE, _bundle_bytes(bundle_id) + struct.pack(">I", index))
    return _blake2b(content_key, message, KEY_BYTES)


def sealed_box(message: bytes, recipient_public: bytes, ephemeral_seed: bytes) -> bytes:
    """libsodium's ``crypto_box_seal`` with the ephemeral key drawn from a given seed.

    ``eph_pk || crypto_box(message, nonce=BLAKE2b-192(eph_pk || recipient_pk))``,
    exactly the bytes ``crypto_box_seal`` makes, so ``crypto_box_seal_open`` opens it.
    """
    eph_public, eph_secret = sodium.crypto_box_seed_keypair(ephemeral_seed)
    nonce = hashlib.blake2b(eph_public + recipient_public, digest_size=24).digest()
    try:
        boxed = sodium.crypto_box(message, nonce, recipient_public, eph_secret)
    except RuntimeError:  # libsodium refuses the all-zero secret of a low-order key
        raise KeyNotUsable(
            "the recipient's encryption key is a low-order point: nothing can be sealed "
            "to it; the peer must publish a new key manifest",
            check="recipient-key",
        ) from None
    return bytes(eph_public) + bytes(boxed)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- header ------------------------------------------------------------------------


def _fail_format(message: str) -> EnvelopeFormatError:
    return EnvelopeFormatError(f"envelope format: {message}")


def _str_field(body: Mapping[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = body[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _fail_format(f"header field {name} is malformed")
    return value


def _int_field(body: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail_format(f"header field {name} must be an integer from {low} to {high}")
    return value


def _bytes_field(body: Mapping[str, Any], name: str, size: int) -> bytes:
    value = body[name]
    if not isinstance(value, str):
        raise _fail_format(f"header field {name} must be base64 text")
    try:
        # Strict: only the alphabet, padding only at the end (as b64decode's validate).
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _fail_format(f"header field {name} is not valid base64") from None
    if len(data) != size or binascii.b2a_base64(data, newline=False) != value.encode("ascii"):
        raise _fail_format(f"header field {name} must be {size} bytes in canonical base64")
    return data


def _parse_header(raw: bytes, limits: Limits) -> EnvelopeHeader:
    try:
        body = parse_canonical(raw, max_bytes=limits.max_header_bytes, max_depth=3)
    except InvalidInput as exc:
        raise _fail_format(f"header: {exc.message}") from None
    if not isinstance(body, dict):
        raise _fail_format("header must be a JSON object")
    missing = _HEADER_FIELDS - set(body)
    extra = set(body) - _HEADER_FIELDS - _OPTIONAL_HEADER_FIELDS
    if missing or extra:
        raise _fail_format(
            "header fields "
            + "; ".join(
                part
                for part in (
                    f"missing: {', '.join(sorted(missing))}" if missing else "",
                    f"unknown: {', '.join(sorted(extra))}" if extra else "",
                )
                if part
            )
        )
    if body["format"] != FORMAT_VERSION or isinstance(body["format"], bool):
        raise _fail_format(f"header format must be {FORMAT_VERSION}")
    case_type = body["type"]
    if not isinstance(case_type, str) or case_type not in CASE_TYPES:
        raise _fail_format("header names an unknown case type")
    schema_version = body["schema_version"]
    if not isinstance(schema_version, str) or schema_version != CASE_TYPES[case_type].version:
        raise _fail_format(f"schema version of {case_type} is not supported by this node")
    sender, recipient = body["sender"], body["recipient"]
    if (
        not isinstance(sender, str)
        or not isinstance(recipient, str)
        or sender not in _NODES
        or recipient not in _NODES
        or sender == recipient
    ):
        raise _fail_format("sender and recipient must be jp and pk, one each")
    if body["marking"] not in ("confidential", "public"):
        raise _fail_format("marking must be confidential or public")
    reply_to = body["reply_to"]
    if reply_to is not None and (
        not isinstance(reply_to, str) or not _BUNDLE_ID_RE.fullmatch(reply_to)
    ):
        raise _fail_format("header field reply_to is malformed")
    replaces = None
    if "replaces" in body:
        replaces = body["replaces"]
        if not isinstance(replaces, str) or not _BUNDLE_ID_RE.fullmatch(replaces):
            raise _fail_format("header field replaces is malformed")
        if replaces == body.get("bundle_id"):
            raise _fail_format("a bundle cannot replace itself")
    chunk_size = _int_field(body, "chunk_size", CHUNK_SIZE, CHUNK_SIZE)
    sizes = body["attachment_sizes"]
    if not isinstance(sizes, list) or len(sizes) > limits.max_attachments:
        if isinstance(sizes, list):
            raise EnvelopeTooLarge(
                f"envelope size: {len(sizes)} attachments exceed the limit of "
                f"{limits.max_attachments}"
            )
        raise _fail_format("header field attachment_sizes must be a list")
    attachment_sizes: list[int] = []
    for index, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail_format(f"attachment_sizes[{index}] must be a non-negative integer")
        if size > limits.max_attachment_bytes:
            raise EnvelopeTooLarge(
                f"envelope size: attachment {index} of {size} bytes exceeds the limit of "
                f"{limits.max_attachment_bytes}"
            )
        attachment_sizes.append(size)
    content_size = _int_field(body, "content_size", 0, 2**53 - 1)
    content_limit = _content_limit(limits, len(attachment_sizes))
    if content_size > content_limit:
        raise EnvelopeTooLarge(
            f"envelope size: content of {content_size} bytes exceeds the limit of {content_limit}"
        )
    created_text = body["created_at"]
    try:
        created_at = parse_time(created_text, "created_at")
    except VerificationError:
        raise _fail_format("header field created_at must be like 2026-01-31T12:00:00Z") from None
    header = EnvelopeHeader(
        bundle_id=_str_field(body, "bundle_id", _BUNDLE_ID_RE),
        type=case_type,
        schema_version=schema_version,
        policy_version=_str_field(body, "policy_version", _VERSION_RE),
        sender=sender,
        recipient=recipient,
        sequence=_int_field(body, "sequence", 1, _MAX_SEQUENCE),
        created_at=created_at,
        signing_key_id=_str_field(body, "signing_key_id", _KEY_ID_RE),
        recipient_key_id=_str_field(body, "recipient_key_id", _KEY_ID_RE),
        archive_key_id=_str_field(body, "archive_key_id", _KEY_ID_RE),
        sealed_key=_bytes_field(body, "sealed_key", SEALED_KEY_BYTES),
        archive_sealed_key=_bytes_field(body, "archive_sealed_key", SEALED_KEY_BYTES),
        marking=body["marking"],
        reply_to=reply_to,
        key_commitment=bytes.fromhex(_str_field(body, "key_commitment", SHA256_HEX)),
        chunk_size=chunk_size,
        content_size=content_size,
        attachment_sizes=tuple(attachment_sizes),
        ciphertext_sha256=bytes.fromhex(_str_field(body, "ciphertext_sha256", SHA256_HEX)),
        raw=raw,
        replaces=replaces,
    )
    if header.envelope_size > limits.max_envelope_bytes:
        raise EnvelopeTooLarge(
            f"envelope size: {header.envelope_size} bytes exceed the limit of "
            f"{limits.max_envelope_bytes}"
        )
    return header


def _content_limit(limits: Limits, attachments: int) -> int:
    return limits.max_case_bytes + _CONTENT_OVERHEAD + attachments * _PER_ATTACHMENT_OVERHEAD


def read_header(stream: BinaryIO, limits: Limits) -> tuple[EnvelopeHeader, bytes]:
    """Read and parse the prefix and header, bounded by ``limits``; no keys needed.

    Leaves ``stream`` positioned at the signature. Checks ``format`` and
    ``size`` only: nothing in the header is trusted until verified.
    """
    prefix = read_exact(stream, PREFIX_BYTES)
    if len(prefix) != PREFIX_BYTES:
        raise _fail_format("truncated before the end of the prefix")
    magic, version, header_length = _PREFIX.unpack(prefix)
    if not hmac.compare_digest(magic, MAGIC):
        raise _fail_format("not an ssw-gateway envelope (bad magic)")
    if version != FORMAT_VERSION:
        raise _fail_format(f"format version {version} is not supported (this node reads 1)")
    if header_length > limits.max_header_bytes:
        raise EnvelopeTooLarge(
            f"envelope size: header of {header_length} bytes exceeds the limit of "
            f"{limits.max_header_bytes}"
        )
    raw = read_exact(stream, header_length)
    if len(raw) != header_length:
        raise _fail_format("truncated inside the header")
    return _parse_header(raw, limits), raw


@dataclass(frozen=True, slots=True)
class KnownCiphertext:
    """The SHA-256 of everything after an envelope's header and signature, taken
    by a :class:`CiphertextHasher` while the envelope's bytes were written.

    ``offset`` is where that hash starts (prefix, header and signature before
    it), ``envelope_size`` the number of bytes written in all. The verifier
    uses it only when ``offset`` is where the header it reads says the
    ciphertext starts; it then needs no second read of the ciphertext.
    """

    offset: int
    sha256: bytes
    envelope_size: int


class CiphertextHasher:
    """Hashes the ciphertext section of an envelope fed in order, in chunks.

    The prefix (its header length) says where the ciphertext starts; nothing
    in it is trusted: :func:`verify_envelope` checks the header, its
    signature, the sizes and then compares this hash with the signed one,
    exactly as when it reads the ciphertext itself. A prefix that is not an
    envelope's gives no :meth:`result` (the verifier refuses the file).
    """

    def __init__(self) -> None:
        self._prefix = b""
        self._offset: int | None = None
        self._valid = True
        self._hash = hashlib.sha256()
        self._seen = 0

    def update(self, chunk: bytes) -> None:
        position = self._seen
        self._seen += len(chunk)
        if self._offset is None:
            if not self._valid:
                return
            self._prefix += chunk[: PREFIX_BYTES - len(self._prefix)]
            if len(self._prefix) < PREFIX_BYTES:
                return
            magic, version, header_length = _PREFIX.unpack(self._prefix)
            if magic != MAGIC or version != FORMAT_VERSION:
                self._valid = False
                return
            self._offset = PREFIX_BYTES + header_length + SIGNATURE_BYTES
        start = self._offset - position
        if start <= 0:
            self._hash.update(chunk)
        elif start < len(chunk):
            self._hash.update(memoryview(chunk)[start:])

    def result(self) -> KnownCiphertext | None:
        """The hash of what followed the signature, or None (not an envelope's
        prefix, or the bytes ended before the ciphertext)."""
        if self._offset is None or self._seen < self._offset:
            return None
        return KnownCiphertext(self._offset, self._hash.digest(), self._seen)


# --- seal --------------------------------------------------------------------------


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.count = 0

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)
        self.out.write(data)
        self.count += len(data)


def _header_json(fields: Mapping[str, Any]) -> bytes:
    return canonical_bytes(dict(fields))


def seal(
    out: BinaryIO,
    *,
    case_type: str,
    case: Mapping[str, Any] | BaseModel,
    attachments: Sequence[AttachmentSource] = (),
    keyring: NodeKeyring,
    peer_manifest: KeyManifest,
    policy: Policy,
    sequence: int,
    now: datetime,
    marking: Marking | None = None,
    reply_to: str | None = None,
    replaces: str | None = None,
    random: Callable[[int], bytes] = nacl.utils.random,
) -> SealedEnvelope:
    """Seal a case and its attachments for the peer (and for our own archive).

    Raises :class:`~gateway.errors.InvalidInput` (bad case data, names, sizes,
    arguments), :class:`~gateway.errors.PolicyRefused` (over a limit) or
    :class:`~gateway.core.keys.KeyNotUsable` (no valid key to use) before
    writing anything, and ``InvalidInput`` if an attachment's file turns out
    shorter or longer than its stated size while writing.

    ``case`` is JSON-shaped data, validated here against the schema of
    ``case_type`` (:func:`~gateway.core.cases.validate_case`), or the model that
    ``validate_case`` returned for that type, which is taken as validated (a
    caller that checked the case first does not pay for a second validation).
    """
    limits = policy.limits
    if not out.seekable():
        raise InvalidInput("the envelope must be written to a seekable file")
    if keyring.node not in _NODES or peer_manifest.node not in _NODES:
        raise InvalidInput("sender and recipient must be the nodes jp and pk")
    if peer_manifest.node == keyring.node:
        raise InvalidInput("an envelope is sealed for the peer, not for this node")
    if isinstance(sequence, bool) or not 1 <= sequence <= _MAX_SEQUENCE:
        raise InvalidInput("sequence must be a positive integer")
    if reply_to is not None and not _BUNDLE_ID_RE.fullmatch(reply_to):
        raise InvalidInput("reply_to must be a bundle id")
    if replaces is not None and not _BUNDLE_ID_RE.fullmatch(replaces):
        raise InvalidInput("replaces must be a bundle id")
    chosen_marking: Marking = marking if marking is not None else policy.default_marking
    if chosen_marking not in ("confidential", "public"):
        raise InvalidInput("marking must be confidential or public")
    entry = case_type_for(case_type)
    if isinstance(case, entry.model):
        validated: BaseModel = case  # validated when it was made (validate_case)
    else:
        data = case.model_dump(mode="json") if isinstance(case, BaseModel) else dict(case)
        validated = validate_case(case_type, data, max_bytes=limits.max_case_bytes)
    sizes = [item.size for item in attachments]
    limits.check_attachments(sizes)
    names: list[dict[str, Any]] = []
    for index, item in enumerate(attachments):
        if not isinstance(item.name, str) or not item.name:
            raise InvalidInput(f"attachment {index} needs a name")
        if len(item.name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidInput(f"attachment {index}: name longer than {MAX_NAME_BYTES} bytes")
        if isinstance(item.size, bool) or not isinstance(item.size, int) or item.size < 0:
            raise InvalidInput(f"attachment {index}: size must be a non-negative integer")
        names.append({"name": item.name, "size": item.size})
    case_bytes = canonical_bytes(validated.model_dump(mode="json"))
    if len(case_bytes) > limits.max_case_bytes:
        raise InvalidCase(
            f"{case_type}: case data of {len(case_bytes)} bytes exceeds the limit of "
            f"{limits.max_case_bytes}",
            field="",
        )
    # The canonical content object, written around the case's canonical bytes:
    # its two keys sort "attachments" < "case" (RFC 8785 §3.2.3).
    content = b"".join((b'{"attachments":', canonical_bytes(names), b',"case":', case_bytes, b"}"))
    if len(content) > _content_limit(limits, len(attachments)):
        raise PolicyRefused(
            f"case content of {len(content)} bytes exceeds the limit", reason="policy.case-size"
        )

    created = now.replace(microsecond=0)  # the header carries whole seconds
    keyring.manifest.signing_key(keyring.signing_key_id, at=created)  # may our key sign now?
    recipient_entry = peer_manifest.current_encryption_key(now=now)
    archive_key_id = keyring.current_encryption_key_id
    archive_public = bytes(keyring.encryption_private(archive_key_id).public_key)

    bundle_id = str(uuid.UUID(bytes=_draw(random, 16), version=4))
    content_key = _draw(random, KEY_BYTES)
    sealed_recipient = sealed_box(content_key, recipient_entry.public, _draw(random, 32))
    sealed_archive = sealed_box(content_key, archive_public, _draw(random, 32))
    stream_headers = [_draw(random, 24) for _ in range(1 + len(attachments))]

    fields: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "bundle_id": bundle_id,
        "type": case_type,
        "schema_version": entry.version,
        "policy_version": policy.version,
        "sender": keyring.node,
        "recipient": peer_manifest.node,
        "sequence": sequence,
        "created_at": format_time(created),
        "signing_key_id": keyring.signing_key_id,
        "recipient_key_id": recipient_entry.key_id,
        "archive_key_id": archive_key_id,
        "sealed_key": _b64(sealed_recipient),
        "archive_sealed_key": _b64(sealed_archive),
        "marking": chosen_marking,
        "reply_to": reply_to,
        "key_commitment": content_key_commitment(content_key, bundle_id).hex(),
        "chunk_size": CHUNK_SIZE,
        "content_size": len(content),
        "attachment_sizes": sizes,
        "ciphertext_sha256": "0" * 64,
    }
    if replaces is not None:
        fields["replaces"] = replaces  # signed with the rest of the header
    placeholder = _header_json(fields)
    if len(placeholder) > limits.max_header_bytes:
        raise PolicyRefused("envelope header exceeds the limit", reason="policy.header-size")
    expected_total = (
        PREFIX_BYTES
        + len(placeholder)
        + SIGNATURE_BYTES
        + sum(ciphertext_size(size) for size in (len(content), *sizes))
    )
    if expected_total > limits.max_envelope_bytes:
        raise PolicyRefused(
            f"envelope of {expected_total} bytes exceeds the limit of {limits.max_envelope_bytes}",
            reason="policy.envelope-size",
        )

    start = out.tell()
    out.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(placeholder)))
    out.write(b"\x00" * (len(placeholder) + SIGNATURE_BYTES))
    writer = _HashingWriter(out)
    encrypt_stream(
        stream_key(content_key, bundle_id, 0),
        stream_headers[0],
        io.BytesIO(content),
        len(content),
        writer,
    )
    for index, item in enumerate(attachments, start=1):
        try:
            encrypt_stream(
                stream_key(content_key, bundle_id, index),
                stream_headers[index],
                item.stream,
                item.size,
                writer,
            )
        except StreamSourceError as exc:
            raise InvalidInput(f"attachment {index - 1}: {exc}") from None
    fields["ciphertext_sha256"] = writer.hash.hexdigest()
    # The hash takes the place of its 64 zeros: the same canonical text, written once.
    # The quoted key followed by ":" occurs once: quotes inside string values are escaped.
    slot = b'"ciphertext_sha256":"' + b"0" * 64 + b'"'
    if placeholder.count(slot) != 1:  # pragma: no cover - the header's own fields
        raise AssertionError("the header's hash slot is not unique")
    header_bytes = placeholder.replace(
        slot, b'"ciphertext_sha256":"' + fields["ciphertext_sha256"].encode("ascii") + b'"'
    )
    signature = keyring.sign(Purpose.ENVELOPE_HEADER, header_bytes)
    end = out.tell()
    out.seek(start + PREFIX_BYTES)
    out.write(header_bytes)
    out.write(signature)
    out.seek(end)
    header = EnvelopeHeader(
        bundle_id=bundle_id,
        type=case_type,
        schema_version=entry.version,
        policy_version=policy.version,
        sender=keyring.node,
        recipient=peer_manifest.node,
        sequence=sequence,
        created_at=created,
        signing_key_id=keyring.signing_key_id,
        recipient_key_id=recipient_entry.key_id,
        archive_key_id=archive_key_id,
        sealed_key=sealed_recipient,
        archive_sealed_key=sealed_archive,
        marking=chosen_marking,
        reply_to=reply_to,
        key_commitment=bytes.fromhex(fields["key_commitment"]),
        chunk_size=CHUNK_SIZE,
        content_size=len(content),
        attachment_sizes=tuple(sizes),
        ciphertext_sha256=writer.hash.digest(),
        raw=header_bytes,
        replaces=replaces,
    )
    return SealedEnvelope(header=header, size=end - start)


def _draw(random: Callable[[int], bytes], count: int) -> bytes:
    value = random(count)
    if not isinstance(value, bytes) or len(value) != count:
        raise ValueError(f"the randomness source must return {count} bytes")
    return value


# --- verify and open ---------------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    header: EnvelopeHeader
    content_key: bytes
    ciphertext_offset: int
    trust: StoredTrust


def _choose_signer(
    header: EnvelopeHeader,
    *,
    node: str,
    held_key_ids: Collection[str],
    peer_manifest: KeyManifest,
    own_manifest: KeyManifest | None,
) -> tuple[KeyManifest, str, bytes]:
    """Whose keys sign ``header`` and which of our keys its content key is sealed to.

    ``own_manifest`` is given only where our own sent envelopes may be read
    (the archive copy); a receiver passes ``None``.
    """
    if header.recipient == node:
        signer = peer_manifest
        our_key_id, sealed = header.recipient_key_id, header.sealed_key
        if header.sender != peer_manifest.node or peer_manifest.node == node:
            raise EnvelopeSenderInvalid(
                f"envelope sender {header.sender!r} is not the pinned peer {peer_manifest.node!r}"
            )
    elif own_manifest is not None and header.sender == node:
        signer = own_manifest
        our_key_id, sealed = header.archive_key_id, header.archive_sealed_key
    else:
        raise EnvelopeRecipientInvalid(
            f"envelope is addressed to {header.recipient!r}, not to this node {node!r}"
        )
    if header.sender != signer.node:
        raise EnvelopeSenderInvalid(
            f"envelope sender {header.sender!r} does not match the key manifest of {signer.node!r}"
        )
    if our_key_id not in held_key_ids:
        raise EnvelopeRecipientInvalid(
            f"envelope is sealed to encryption key {our_key_id}, which this node does not hold"
        )
    return signer, our_key_id, sealed


def _check_signed(
    stream: BinaryIO,
    header: EnvelopeHeader,
    raw: bytes,
    *,
    signer: KeyManifest,
    limits: Limits,
    now: datetime,
    stored_at: datetime | None,
    accept_suspect: bool,
    known: KnownCiphertext | None = None,
) -> StoredTrust:
    """Signature, age and ciphertext hash of an envelope whose header was just read.

    With ``known`` (taken while the envelope was written, and starting where
    this header says the ciphertext starts) the ciphertext is not read again:
    its size and hash are checked from ``known``, with the same answers."""
    try:
        if stored_at is None:
            verify_key = signer.signing_key(header.signing_key_id, at=header.created_at)
            trust = StoredTrust.VALID
        else:
            verify_key, trust = signer.stored_signing_key(
                header.signing_key_id,
                at=header.created_at,
                stored_at=stored_at,
                accept_suspect=accept_suspect,
            )
    except SignatureSuspect as exc:
        raise EnvelopeSuspect(f"envelope {header.bundle_id}: {exc.message}") from None
    except KeyNotUsable as exc:
        raise EnvelopeSigningKeyInvalid(f"envelope signing key refused: {exc.message}") from None
    signature = read_exact(stream, SIGNATURE_BYTES)
    if len(signature) != SIGNATURE_BYTES:
        raise _fail_format("truncated inside the signature")
    try:
        verify_key.verify(tagged(Purpose.ENVELOPE_HEADER, raw), signature)
    except nacl.exceptions.BadSignatureError:
        raise EnvelopeSignatureInvalid(
            f"envelope header signature does not verify with key {header.signing_key_id} "
            f"of node {signer.node!r}"
        ) from None
    if header.created_at > now + limits.clock_skew:
        raise EnvelopeStale(
            f"envelope created at {format_time(header.created_at)} lies in the future "
            f"(beyond {limits.clock_skew_seconds} s of clock skew); check both clocks"
        )
    if header.created_at < now - limits.max_envelope_age:
        raise EnvelopeStale(
            f"envelope created at {format_time(header.created_at)} is older than "
            f"{limits.max_envelope_age_seconds} s"
        )
    if known is not None and known.offset == PREFIX_BYTES + len(raw) + SIGNATURE_BYTES:
        available = known.envelope_size - known.offset
        if available < header.ciphertext_size:
            missing = header.ciphertext_size - available
            raise _fail_format(f"truncated: {missing} bytes of ciphertext missing")
        if available > header.ciphertext_size:
            raise _fail_format("bytes follow the end of the envelope")
        actual = known.sha256
    else:
        actual = _ciphertext_digest(stream, header.ciphertext_size)
    if not hmac.compare_digest(actual, header.ciphertext_sha256):
        raise EnvelopeCiphertextHashMismatch(
            "envelope ciphertext does not match the hash in its signed header"
        )
    return trust


def _ciphertext_digest(stream: BinaryIO, size: int) -> bytes:
    """SHA-256 of the ``size`` bytes left in ``stream``, which must end there."""
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        block = stream.read(min(remaining, 1 << 20))
        if not block:
            raise _fail_format(f"truncated: {remaining} bytes of ciphertext missing")
        digest.update(block)
        remaining -= len(block)
    if stream.read(1):
        raise _fail_format("bytes follow the end of the envelope")
    return digest.digest()


def _open_content_key(
    header: EnvelopeHeader, keyring: NodeKeyring, our_key_id: str, sealed: bytes
) -> bytes:
    private = keyring.encryption_private(our_key_id)
    try:
        content_key = bytes(
            sodium.crypto_box_seal_open(sealed, bytes(private.public_key), bytes(private))
        )
    except nacl.exceptions.CryptoError:
        raise EnvelopeDecryptFailed(
            f"the content key sealed to key {our_key_id} does not open"
        ) from None
    if len(content_key) != KEY_BYTES or not hmac.compare_digest(
        content_key_commitment(content_key, header.bundle_id), header.key_commitment
    ):
        raise EnvelopeKeyCommitmentMismatch(
            "the sealed content key does not match the commitment in the signed header"
        )
    return content_key


def _verify(
    stream: BinaryIO,
    *,
    keyring: NodeKeyring,
    peer_manifest: KeyManifest,
    policy: Policy,
    now: datetime,
    allow_archive: bool,
    stored_at: datetime | None = None,
    accept_suspect: bool = False,
    known: KnownCiphertext | None = None,
) -> _Verified:
    limits = policy.limits
    start = stream.tell() if stream.seekable() else 0
    header, raw = read_header(stream, limits)
    signer, our_key_id, sealed = _choose_signer(
        header,
        node=keyring.node,
        held_key_ids=keyring.encryption_keys,
        peer_manifest=peer_manifest,
        own_manifest=keyring.manifest if allow_archive else None,
    )
    trust = _check_signed(
        stream,
        header,
        raw,
        signer=signer,
        limits=limits,
        now=now,
        stored_at=stored_at,
        accept_suspect=accept_suspect,
        known=known if start == 0 else None,
    )
    content_key = _open_content_key(header, keyring, our_key_id, sealed)
    return _Verified(
        header=header,
        content_key=content_key,
        ciphertext_offset=start + PREFIX_BYTES + len(raw) + SIGNATURE_BYTES,
        trust=trust,
    )


def verify_envelope(
    stream: BinaryIO,
    *,
    keyring: NodeKeyring,
    peer_manifest: KeyManifest,
    policy: Policy,
    now: datetime,
    known: KnownCiphertext | None = None,
) -> EnvelopeHeader:
    """Every check a receiver makes before storing; decrypts nothing but the content key.

    Reads ``stream`` to its end (it need not be seekable). The envelope must be
    addressed to this node by the pinned peer. The same checks, in the same
    order, as :func:`verify_envelope_signature` followed by
    :func:`check_content_key`. ``known``: the ciphertext's hash and the
    envelope's size taken while the bytes ``stream`` reads were written
    (:class:`CiphertextHasher`); the ciphertext is then not read again.
    """
    verified = _verify(
        stream,
        keyring=keyring,
        peer_manifest=peer_manifest,
        policy=policy,
        now=now,
        allow_archive=False,
        known=known,
    )
    return verified.header


def verify_envelope_signature(
    stream: BinaryIO,
    *,
    node: str,
    held_key_ids: Collection[str],
    peer_manifest: KeyManifest,
    limits: Limits,
    now: datetime,
) -> EnvelopeHeader:
    """The public half of :func:`verify_envelope`: needs no private key.

    ``node`` is this node's id, ``held_key_ids`` the ids of the encryption keys
    it holds (public facts), ``peer_manifest`` the pinned peer's manifest. Checks
    format and bounds, sender and recipient, that the content key is sealed to
    a key we hold, the header signature, the age against ``now`` and the
    ciphertext hash (SPEC §5), reading ``stream`` to its end. Raises the
    :class:`EnvelopeInvalid` family exactly as :func:`verify_envelope` does.
    Every input is picklable, so it can run in another process; the caller
    must still run :func:`check_content_key` on the header before storing.
    """
    header, raw = read_header(stream, limits)
    signer, _key_id, _sealed = _choose_signer(
        header,
        node=node,
        held_key_ids=held_key_ids,
        peer_manifest=peer_manifest,
        own_manifest=None,
    )
    _check_signed(
        stream,
        header,
        raw,
        signer=signer,
        limits=limits,
        now=now,
        stored_at=None,
        accept_suspect=False,
    )
    return header


def check_content_key(header: EnvelopeHeader, *, keyring: NodeKeyring) -> None:
    """The private half of :func:`verify_envelope` for a header that passed
    :func:`verify_envelope_signature`: the content key sealed to us opens and
    matches the signed commitment. Decrypts nothing else. Raises
    :class:`EnvelopeDecryptFailed` or :class:`EnvelopeKeyCommitmentMismatch`.
    """
    _open_content_key(header, keyring, header.recipient_key_id, header.sealed_key)


class _Collect:
    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise EnvelopeContentInvalid("decrypted content exceeds its stated size")
        self.parts.append(data)


class _SinkWriter:
    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)
        self.sink.write(data)


def _parse_content(
    raw: bytes, header: EnvelopeHeader, limits: Limits
) -> tuple[BaseModel, dict[str, Any], tuple[AttachmentInfo, ...]]:
    try:
        body = parse_canonical(raw, max_bytes=header.content_size, max_depth=40)
    except InvalidInput as exc:
        raise EnvelopeContentInvalid(f"decrypted content: {exc.message}") from None
    if not isinstance(body, dict) or set(body) != {"attachments", "case"}:
        raise EnvelopeContentInvalid("decrypted content must hold exactly attachments and case")
    listed = body["attachments"]
    if not isinstance(listed, list) or len(listed) != header.attachment_count:
        raise EnvelopeContentInvalid("decrypted content lists a different number of attachments")
    infos: list[AttachmentInfo] = []
    for index, (item, size) in enumerate(zip(listed, header.attachment_sizes, strict=True)):
        if (
            not isinstance(item, dict)
            or set(item) != {"name", "size"}
            or not isinstance(item["name"], str)
            or not item["name"]
            or item["size"] != size
            or isinstance(item["size"], bool)
        ):
            raise EnvelopeContentInvalid(
                f"decrypted content describes attachment {index} unlike the header"
            )
        infos.append(AttachmentInfo(index=index, name=item["name"], size=size))
    # ``raw`` is canonical, so the case's canonical bytes are the slice between
    # the attachments list and the closing brace; they are not written again.
    listed_bytes = canonical_bytes(listed) if listed else b"[]"
    lead = b'{"attachments":' + listed_bytes + b',"case":'
    if not raw.startswith(lead) or not raw.endswith(b"}"):  # pragma: no cover - canonical
        raise EnvelopeContentInvalid("decrypted content is not laid out canonically")
    try:
        case = validate_case(
            header.type,
            body["case"],
            version=header.schema_version,
            max_bytes=limits.max_case_bytes,
            encoded=raw[len(lead) : -1],
        )
    except InvalidCase as exc:
        raise EnvelopeContentInvalid(f"decrypted case refused: {exc.message}") from None
    return case, body["case"], tuple(infos)


def open_envelope(
    stream: BinaryIO,
    *,
    keyring: NodeKeyring,
    peer_manifest: KeyManifest,
    policy: Policy,
    now: datetime,
    sink_factory: Callable[[AttachmentInfo], BinaryIO] | None = None,
    stored_at: datetime | None = None,
    accept_suspect: bool = False,
) -> OpenedEnvelope:
    """Verify everything (as :func:`verify_envelope`), then decrypt.

    ``stored_at`` is given when opening an envelope this node stored earlier:
    the time it recorded it (received it, or for an archive copy made it). A
    signing key revoked since is then judged by
    :meth:`~gateway.core.keys.KeyManifest.stored_signing_key`: stored before the
    key was distrusted, it opens (``trust`` says ``verified-while-trusted``);
    stored after, :class:`EnvelopeSuspect` unless ``accept_suspect``. Without
    ``stored_at`` a revoked key is refused, as on receipt.

    ``stream`` must be seekable: the first pass verifies the signature and the
    ciphertext hash without decrypting a byte; the second decrypts. The case is
    validated against its schema; with ``sink_factory``, each attachment is
    decrypted into the file object it returns for that attachment (the shell
    makes these temporary files and keeps them only if this returns).
    Opens envelopes addressed to this node, and this node's own archive copies.
    """
    if not stream.seekable():
        raise InvalidInput("opening an envelope needs a seekable file")
    verified = _verify(
        stream,
        keyring=keyring,
        peer_manifest=peer_manifest,
        policy=policy,
        now=now,
        allow_archive=True,
        stored_at=stored_at,
        accept_suspect=accept_suspect,
    )
    header = verified.header
    stream.seek(verified.ciphertext_offset)
    collected = _Collect(header.content_size)
    try:
        decrypt_stream(
            stream_key(verified.content_key, header.bundle_id, 0),
            stream,
            header.content_size,
            collected,
            chunk_size=header.chunk_size,
        )
    except StreamDecryptError as exc:
        raise EnvelopeDecryptFailed(f"envelope content does not decrypt: {exc}") from None
    case, case_data, infos = _parse_content(b"".join(collected.parts), header, policy.limits)
    written: list[OpenedAttachment] = []
    if sink_factory is not None:
        for info in infos:
            writer = _SinkWriter(sink_factory(info))
            try:
                decrypt_stream(
                    stream_key(verified.content_key, header.bundle_id, info.index + 1),
                    stream,
                    info.size,
                    writer,
                    chunk_size=header.chunk_size,
                )
            except StreamDecryptError as exc:
                raise EnvelopeDecryptFailed(
                    f"attachment {info.index} does not decrypt: {exc}"
                ) from None
            written.append(
                OpenedAttachment(
                    index=info.index,
                    name=info.name,
                    size=info.size,
                    sha256=writer.hash.hexdigest(),
                )
            )
    return OpenedEnvelope(
        header=header,
        case=case,
        case_data=case_data,
        attachments=infos,
        written=tuple(written),
        trust=verified.trust,
    )
