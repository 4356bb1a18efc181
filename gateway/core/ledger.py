"""The tamper-evident ledger: entry chain, Merkle checkpoints, witness checks.

Pure core: values in, values out, no clock, no database.

**Entries.** Entry ``n`` is the RFC 8785 canonical JSON of::

    {"v": 1, "seq": n, "time": "2026-11-25T21:15:00.000000Z", "kind": "bundle-read",
     "actor": {"name": "aiko", "role": "officer"}, "bundle_id": "..." | null,
     "consent_id": "..." | null, "body": {...}, "prev_hash": "<hex of entry n-1's hash>"}

and its hash is ``tagged_sha256(Purpose.LEDGER_ENTRY, canonical)``; entry 0
names 32 zero bytes as ``prev_hash``. Those canonical bytes are stored as
they are and hashed as they are; the columns kept beside them for queries
are checked against them on every verification.

**Merkle tree.** Leaf ``n`` of the RFC 9162 tree is entry ``n``'s *hash*
(32 bytes), so the leaf hash is ``SHA-256(0x00 || entry_hash)``. The tree
over the first ``size`` entries has a root that a **checkpoint** signs.

**Checkpoints.** ``{"v": 1, "node": "jp", "size": N, "root": "<hex>",
"time": "...", "key_id": "..."}`` in canonical form, signed by the node's
operational Ed25519 key over ``tagged(Purpose.CHECKPOINT, body)``. On the
wire a signed checkpoint is the canonical JSON ``{"body": "<body text>",
"signature": "<base64>"}``; the body text is kept and verified byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gateway.core import merkle
from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.domain import SHA256_HEX, Purpose, tagged, tagged_sha256
from gateway.core.roles import Actor
from gateway.core.times import Precision, format_utc, parse_utc
from gateway.errors import GatewayError, InvalidInput, VerificationError

__all__ = [
    "ENTRY_FORMAT",
    "GENESIS_PREV_HASH",
    "MAX_BODY_BYTES",
    "MAX_CHECKPOINT_BYTES",
    "MAX_ENTRY_BYTES",
    "ChainProblem",
    "ChainVerifier",
    "Checkpoint",
    "CheckpointInvalid",
    "CheckpointSigner",
    "EntryKind",
    "LedgerEntry",
    "LedgerVerificationFailed",
    "SignedCheckpoint",
    "SigningKeyLookup",
    "StoredEntry",
    "WitnessMismatch",
    "audit_peer_answer",
    "broken_link",
    "check_checkpoint_root",
    "entry_canonical",
    "format_time",
    "load_signed_checkpoint",
    "make_checkpoint",
    "make_entry",
    "parse_entry",
    "parse_signed_checkpoint",
    "parse_time",
    "sign_checkpoint",
    "verify_chain",
    "verify_checkpoint",
]

ENTRY_FORMAT = 1
CHECKPOINT_FORMAT = 1
GENESIS_PREV_HASH = bytes(32)
MAX_BODY_BYTES = 16 * 1024
MAX_ENTRY_BYTES = 24 * 1024
MAX_CHECKPOINT_BYTES = 4 * 1024
MAX_ID_LENGTH = 128

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")
_ENTRY_KEYS = frozenset(
    {"v", "seq", "time", "kind", "actor", "bundle_id", "consent_id", "body", "prev_hash"}
)
_CHECKPOINT_KEYS = frozenset({"v", "node", "size", "root", "time", "key_id"})


class EntryKind(StrEnum):
    """What an entry records (SPEC §7)."""

    BUNDLE_RECEIVED = "bundle-received"
    BUNDLE_SENT = "bundle-sent"
    BUNDLE_READ = "bundle-read"
    CONSENT_REQUESTED = "consent-requested"
    CONSENT_GRANTED = "consent-granted"
    CONSENT_DENIED = "consent-denied"
    CONSENT_REVOKED = "consent-revoked"
    CONSENT_USED = "consent-used"
    CONSENT_USE_VIOLATION = "consent-use-violation"
    DISCLOSURE_MADE = "disclosure-made"
    DISCLOSURE_BLOCKED = "disclosure-blocked"
    INTERNAL_SHARE = "internal-share"
    KEY_EVENT = "key-event"
    CHECKPOINT_MADE = "checkpoint-made"
    CHECKPOINT_RECEIVED = "checkpoint-received"
    EQUIVOCATION = "equivocation"
    BUNDLE_PURGED = "bundle-purged"
    OUTPUT_PURGED = "output-purged"
    BUNDLE_SUSPECT = "bundle-suspect"
    SUSPECT_ACCEPTED = "suspect-accepted"
    BUNDLE_RESENT = "bundle-resent"
    BUNDLE_REFUSED = "bundle-refused"
    APPROVAL_PROPOSED = "approval-proposed"
    APPROVAL_GIVEN = "approval-given"
    APPROVAL_REJECTED = "approval-rejected"
    APPROVAL_EXPIRED = "approval-expired"
    APPROVAL_EXECUTED = "approval-executed"
    APPROVER_CHANGED = "approver-changed"
    USER_ADDED = "user-added"
    USER_DISABLED = "user-disabled"
    TOKEN_REISSUED = "token-reissued"  # noqa: S105 (a ledger kind, not a secret)
    TOKEN_ROTATED = "token-rotated"  # noqa: S105 (a ledger kind, not a secret)
    USER_ENROLLED = "user-enrolled"
    APPROVAL_RULES = "approval-rules"


_KINDS = {kind.value: kind for kind in EntryKind}
_DECODER = json.JSONDecoder()


class LedgerVerificationFailed(VerificationError):
    """The ledger is not what was recorded: ``seq`` names the first bad entry.

    ``check`` is one of ``"chain"`` (an entry does not follow the one
    before, or a sequence number is missing), ``"entry-hash"`` (an entry's
    stored fields do not hash to its recorded hash), ``"checkpoint"`` (a
    signed checkpoint disagrees with the entries) or ``"witness"`` (the
    peer's witnessed checkpoints disagree with ours).
    """

    reason = "ledger.tampered"
    check = "chain"

    def __init__(self, message: str, *, check: str, seq: int | None = None) -> None:
        super().__init__(message, check=check)
        self.seq = seq


class CheckpointInvalid(VerificationError):
    """A signed checkpoint is malformed, from the wrong node, or badly signed."""

    reason = "ledger.checkpoint"
    check = "checkpoint"


class WitnessMismatch(VerificationError):
    """A peer's history does not extend what we witnessed: it was rewritten."""

    reason = "ledger.witness"
    check = "witness"


class SigningKeyLookup(Protocol):
    """What checkpoint verification needs of a key manifest."""

    def signing_key(self, key_id: str, *, at: datetime) -> VerifyKey: ...


class CheckpointSigner(Protocol):
    """What checkpoint signing needs of a node keyring."""

    @property
    def signing_key_id(self) -> str: ...

    def sign(self, purpose: bytes, payload: bytes) -> bytes: ...


# --- time -----------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """UTC with exactly six fractional digits and a ``Z``: one text per instant."""
    return format_utc(moment, Precision.MICROSECONDS)


def parse_time(text: Any) -> datetime:
    """A ledger time (``YYYY-MM-DDTHH:MM:SS.ffffffZ``); anything else: InvalidInput."""
    return parse_utc(text, field="time", precision=Precision.MICROSECONDS)


# --- entries --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One entry, with the canonical bytes it was hashed from."""

    seq: int
    time: datetime
    kind: EntryKind
    actor_name: str
    actor_role: str | None
    bundle_id: str | None
    consent_id: str | None
    body: dict[str, Any]
    prev_hash: bytes
    canonical: bytes
    entry_hash: bytes

    def as_stored(self) -> StoredEntry:
        """The row a store keeps for this entry: query columns beside the hashed bytes."""
        return StoredEntry(
            seq=self.seq,
            time=self.time,
            kind=self.kind.value,
            actor_name=self.actor_name,
            actor_role=self.actor_role,
            bundle_id=self.bundle_id,
            consent_id=self.consent_id,
            prev_hash=self.prev_hash,
            entry_hash=self.entry_hash,
            canonical=self.canonical,
        )

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.entry_hash)

    def to_dict(self) -> dict[str, Any]:
        """Metadata for listings and exports (the body holds no case content)."""
        return {
            "seq": self.seq,
            "time": format_time(self.time),
            "kind": self.kind.value,
            "actor": self.actor_name,
            "role": self.actor_role,
            "bundle_id": self.bundle_id,
            "consent_id": self.consent_id,
            "body": self.body,
            "prev_hash": self.prev_hash.hex(),
            "entry_hash": self.entry_hash.hex(),
        }


def _check_id(name: str, value: str | None) -> None:
    if value is not None and not _ID_PATTERN.fullmatch(value):
        raise InvalidInput(
            f"{name} must be 1-{MAX_ID_LENGTH} characters of letters, digits and ._:@/+=-"
        )


def make_entry(
    *,
    seq: int,
    now: datetime,
    kind: EntryKind | str,
    actor: Actor,
    prev_hash: bytes,
    bundle_id: str | None = None,
    consent_id: str | None = None,
    body: dict[str, Any] | None = None,
) -> LedgerEntry:
    """Build entry ``seq`` following the entry whose hash is ``prev_hash``."""
    try:
        entry_kind = EntryKind(kind)
    except ValueError:
        raise InvalidInput(f"unknown ledger entry kind {kind!r}") from None
    if seq < 0:
        raise InvalidInput("ledger sequence numbers start at 0")
    if len(prev_hash) != 32:
        raise InvalidInput("prev_hash must be 32 bytes")
    if (seq == 0) != (prev_hash == GENESIS_PREV_HASH):
        raise InvalidInput("only entry 0 follows the genesis hash")
    if not actor.name or len(actor.name) > MAX_ID_LENGTH:
        raise InvalidInput(f"actor name must be 1-{MAX_ID_LENGTH} characters")
    _check_id("bundle_id", bundle_id)
    _check_id("consent_id", consent_id)
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise InvalidInput("a ledger entry body is a JSON object")
    # The body decides which encoder writes the entry: every other field is a
    # string, null or a small integer, which both write alike (see _plain).
    plain = _plain(body)
    if len(_encode(body, plain=plain)) > MAX_BODY_BYTES:
        raise InvalidInput(f"ledger entry body exceeds {MAX_BODY_BYTES} bytes")
    role = None if actor.role is None else actor.role.value
    fields = {
        "v": ENTRY_FORMAT,
        "seq": seq,
        "time": format_time(now),
        "kind": entry_kind.value,
        "actor": {"name": actor.name, "role": role},
        "bundle_id": bundle_id,
        "consent_id": consent_id,
        "body": body,
        "prev_hash": prev_hash.hex(),
    }
    canonical = _encode(fields, plain=plain and seq <= _SAFE_INTEGER)
    return LedgerEntry(
        seq=seq,
        # The instant the text names: format_time keeps every microsecond.
        time=now.astimezone(UTC),
        kind=entry_kind,
        actor_name=actor.name,
        actor_role=role,
        bundle_id=bundle_id,
        consent_id=consent_id,
        body=body,
        prev_hash=prev_hash,
        canonical=canonical,
        entry_hash=tagged_sha256(Purpose.LEDGER_ENTRY, canonical),
    )


_SAFE_INTEGER = 2**53 - 1
_FIRST_SURROGATE = "\ud800"
_COMPACT = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
)


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether RFC 8785 and sorted compact JSON write ``value`` the same.

    They agree on ``null``, booleans, integers of at most 2**53 - 1 in
    magnitude, strings (both escape only ``"``, ``\\`` and control characters,
    in the same spellings) and on objects whose keys all sort alike by UTF-16
    code unit (RFC 8785 §3.2.3) and by code point: keys without characters
    from U+D800 up. Floats and anything else are left to the RFC 8785 encoder.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_SAFE_INTEGER <= value <= _SAFE_INTEGER)
    if depth > 32:
        return False
    if kind is dict:
        return all(
            type(key) is str
            and (key.isascii() or max(key) < _FIRST_SURROGATE)
            and _plain(item, depth + 1)
            for key, item in value.items()
        )
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False


def entry_canonical(value: Any) -> bytes:
    """The RFC 8785 canonical bytes of ``value``, fast for the values ledger entries hold.

    For :func:`_plain` values the C JSON encoder (sorted keys, compact, no
    ASCII escaping) writes exactly the RFC 8785 bytes; everything else goes
    through :func:`gateway.core.canonical.canonical_bytes`. A test checks the
    two agree on generated values.
    """
    return _encode(value, plain=_plain(value))


def _encode(value: Any, *, plain: bool) -> bytes:
    """:func:`entry_canonical` with ``plain`` = ``_plain(value)`` already known."""
    if plain:
        try:
            return _COMPACT.encode(value).encode("utf-8")
        except (UnicodeEncodeError, ValueError):
            pass  # a lone surrogate: the RFC 8785 encoder gives the error
    return canonical_bytes(value)


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidInput(f"entry field {name} is not text")


def parse_entry(canonical: bytes) -> LedgerEntry:
    """Read stored entry bytes (bounded); raises :class:`InvalidInput` if malformed.

    The bytes are hashed as they are: no re-serialisation. This parse uses the
    standard library directly (size bounded first, recursion caught) because
    verification reads a million of them.
    """
    if len(canonical) > MAX_ENTRY_BYTES:
        raise InvalidInput(f"entry of {len(canonical)} bytes exceeds {MAX_ENTRY_BYTES}")
    try:
        fields = _DECODER.decode(canonical.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InvalidInput("entry bytes are not JSON") from None
    if not isinstance(fields, dict) or set(fields) != _ENTRY_KEYS:
        raise InvalidInput("entry does not have exactly the entry fields")
    if fields["v"] != ENTRY_FORMAT:
        raise InvalidInput(f"entry format {fields['v']!r} is not {ENTRY_FORMAT}")
    seq = fields["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise InvalidInput("entry seq is not a non-negative integer")
    kind = _KINDS.get(fields["kind"]) if isinstance(fields["kind"], str) else None
    if kind is None:
        raise InvalidInput(f"entry kind {fields['kind']!r} is unknown")
    actor = fields["actor"]
    if not isinstance(actor, dict) or set(actor) != {"name", "role"}:
        raise InvalidInput("entry actor is not {name, role}")
    prev = fields["prev_hash"]
    if not isinstance(prev, str) or not SHA256_HEX.fullmatch(prev):
        raise InvalidInput("entry prev_hash is not 64 hex digits")
    body = fields["body"]
    if not isinstance(body, dict):
        raise InvalidInput("entry body is not an object")
    name = actor["name"]
    if not isinstance(name, str):
        raise InvalidInput("entry actor name is not text")
    return LedgerEntry(
        seq=seq,
        time=parse_time(fields["time"]),
        kind=kind,
        actor_name=name,
        actor_role=_optional_str(actor["role"], "actor.role"),
        bundle_id=_optional_str(fields["bundle_id"], "bundle_id"),
        consent_id=_optional_str(fields["consent_id"], "consent_id"),
        body=body,
        prev_hash=bytes.fromhex(prev),
        canonical=canonical,
        entry_hash=tagged_sha256(Purpose.LEDGER_ENTRY, canonical),
    )


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as a database row holds it: query columns beside the hashed bytes."""

    seq: int
    time: datetime
    kind: str
    actor_name: str
    actor_role: str | None
    bundle_id: str | None
    consent_id: str | None
    prev_hash: bytes
    entry_hash: bytes
    canonical: bytes


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first thing wrong with a ledger: which entry, which check, what."""

    seq: int | None
    check: str
    message: str

    def error(self) -> LedgerVerificationFailed:
        return LedgerVerificationFailed(self.message, check=self.check, seq=self.seq)


def broken_link(seq: int) -> ChainProblem:
    """Entry ``seq`` is intact on its own but does not name the hash of the entry before it."""
    return ChainProblem(
        seq,
        "chain",
        f"ledger entry {seq} does not follow entry {seq - 1}: the chain breaks "
        f"between entries {seq - 1} and {seq} (one of them was altered)",
    )


def _column_mismatch(row: StoredEntry, entry: LedgerEntry) -> str | None:
    pairs: Sequence[tuple[str, object, object]] = (
        ("time", row.time, entry.time),
        ("kind", row.kind, entry.kind.value),
        ("actor", row.actor_name, entry.actor_name),
        ("role", row.actor_role, entry.actor_role),
        ("bundle_id", row.bundle_id, entry.bundle_id),
        ("consent_id", row.consent_id, entry.consent_id),
    )
    for name, stored, hashed in pairs:
        if stored != hashed:
            return name
    if not hmac.compare_digest(row.prev_hash, entry.prev_hash):
        return "prev_hash"
    return None


@dataclass
class ChainVerifier:
    """Checks entries one at a time, in order, with O(log n) memory.

    :meth:`feed` returns the first problem (and keeps returning it);
    :attr:`roots` collects the Merkle root at every size named in
    ``root_sizes`` as the entries stream past, for checkpoint checks.
    """

    root_sizes: frozenset[int] = frozenset()
    roots: dict[int, bytes] = field(default_factory=dict)
    problem: ChainProblem | None = None
    last: LedgerEntry | None = None
    _tree: merkle.CompactRange = field(default_factory=merkle.CompactRange)
    _prev_hash: bytes = GENESIS_PREV_HASH

    @classmethod
    def resume(cls, compact: merkle.CompactRange, prev_hash: bytes) -> ChainVerifier:
        """A verifier that continues after ``compact.size`` entries already checked.

        ``compact`` is the compact range over those entries and ``prev_hash``
        the hash of the last of them: the next row fed must be entry
        ``compact.size``.
        """
        verifier = cls()
        verifier._tree = compact.copy()
        verifier._prev_hash = prev_hash
        return verifier

    @property
    def size(self) -> int:
        return self._tree.size

    @property
    def head_hash(self) -> bytes:
        """The hash of the last entry fed (32 zero bytes before the first)."""
        return self._prev_hash

    @property
    def compact(self) -> merkle.CompactRange:
        """A copy of the compact range over the entries fed so far."""
        return self._tree.copy()

    def root(self) -> bytes:
        return self._tree.root()

    def feed(self, row: StoredEntry) -> ChainProblem | None:
        if self.problem is not None:
            return self.problem
        expected = self._tree.size
        self.problem = self._check(row, expected)
        return self.problem

    def _check(self, row: StoredEntry, expected: int) -> ChainProblem | None:
        if row.seq != expected:
            missing = "missing" if row.seq > expected else "repeated or out of order"
            return ChainProblem(
                expected,
                "chain",
                f"ledger entry {expected} is {missing}: found entry {row.seq} in its place",
            )
        try:
            entry = parse_entry(row.canonical)
        except GatewayError as exc:
            return ChainProblem(
                row.seq, "entry-hash", f"ledger entry {row.seq} is malformed: {exc.message}"
            )
        if not hmac.compare_digest(entry.entry_hash, row.entry_hash):
            return ChainProblem(
                row.seq,
                "entry-hash",
                f"ledger entry {row.seq}: its contents do not match its recorded hash",
            )
        if entry.seq != row.seq:
            return ChainProblem(
                row.seq, "entry-hash", f"ledger entry {row.seq} is recorded as entry {entry.seq}"
            )
        column = _column_mismatch(row, entry)
        if column is not None:
            return ChainProblem(
                row.seq,
                "entry-hash",
                f"ledger entry {row.seq}: stored {column} differs from the hashed entry",
            )
        if not hmac.compare_digest(entry.prev_hash, self._prev_hash):
            return broken_link(row.seq)
        self._prev_hash = entry.entry_hash
        self._tree.append_leaf_hash(entry.leaf_hash)
        if self._tree.size in self.root_sizes:
            self.roots[self._tree.size] = self._tree.root()
        self.last = entry
        return None


def verify_chain(entries: Iterable[StoredEntry]) -> ChainProblem | None:
    """The first problem of a ledger read in order, or ``None`` when it is intact."""
    verifier = ChainVerifier()
    for row in entries:
        problem = verifier.feed(row)
        if problem is not None:
            return problem
    return None


# --- checkpoints ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A node's ledger as it stood: ``size`` entries with Merkle ``root``."""

    node: str
    size: int
    root: bytes
    time: datetime
    key_id: str

    def body(self) -> bytes:
        return canonical_bytes(
            {
                "v": CHECKPOINT_FORMAT,
                "node": self.node,
                "size": self.size,
                "root": self.root.hex(),
                "time": format_time(self.time),
                "key_id": self.key_id,
            }
        )


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint with its signed body bytes, kept as signed."""

    checkpoint: Checkpoint
    body: bytes
    signature: bytes

    def to_wire(self) -> bytes:
        return canonical_bytes(
            {
                "body": self.body.decode("utf-8"),
                "signature": base64.b64encode(self.signature).decode("ascii"),
            }
        )


def make_checkpoint(*, node: str, size: int, root: bytes, now: datetime, key_id: str) -> Checkpoint:
    if size < 0 or len(root) != merkle.HASH_SIZE:
        raise InvalidInput("a checkpoint needs a size >= 0 and a 32-byte root")
    return Checkpoint(
        node=node, size=size, root=root, time=parse_time(format_time(now)), key_id=key_id
    )


def sign_checkpoint(checkpoint: Checkpoint, signer: CheckpointSigner) -> SignedCheckpoint:
    """Sign ``checkpoint`` with the keyring's operational key (which it must name)."""
    if checkpoint.key_id != signer.signing_key_id:
        raise InvalidInput("the checkpoint names another key than the one signing it")
    body = checkpoint.body()
    return SignedCheckpoint(
        checkpoint=checkpoint, body=body, signature=signer.sign(Purpose.CHECKPOINT, body)
    )


def _parse_checkpoint_body(body: bytes) -> Checkpoint:
    try:
        fields = parse_canonical(body, max_bytes=MAX_CHECKPOINT_BYTES, max_depth=2)
    except InvalidInput as exc:
        raise CheckpointInvalid(f"checkpoint body: {exc.message}") from None
    if not isinstance(fields, dict) or set(fields) != _CHECKPOINT_KEYS:
        raise CheckpointInvalid("checkpoint body does not have exactly the checkpoint fields")
    if fields["v"] != CHECKPOINT_FORMAT:
        raise CheckpointInvalid(f"checkpoint format {fields['v']!r} is not {CHECKPOINT_FORMAT}")
    size, root, node, key_id = fields["size"], fields["root"], fields["node"], fields["key_id"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise CheckpointInvalid("checkpoint size is not a non-negative integer")
    if not isinstance(root, str) or not SHA256_HEX.fullmatch(root):
        raise CheckpointInvalid("checkpoint root is not 64 hex digits")
    if node not in ("jp", "pk"):
        raise CheckpointInvalid("checkpoint node is not jp or pk")
    if not isinstance(key_id, str) or not _ID_PATTERN.fullmatch(key_id):
        raise CheckpointInvalid("checkpoint key id is malformed")
    try:
        moment = parse_time(fields["time"])
    except InvalidInput as exc:
        raise CheckpointInvalid(f"checkpoint {exc.message}") from None
    return Checkpoint(node=node, size=size, root=bytes.fromhex(root), time=moment, key_id=key_id)


def load_signed_checkpoint(body: bytes, signature: bytes) -> SignedCheckpoint:
    """A signed checkpoint from its kept parts (as stored); the signature is NOT checked here."""
    if len(signature) != 64:
        raise CheckpointInvalid("checkpoint signature is not 64 bytes")
    return SignedCheckpoint(
        checkpoint=_parse_checkpoint_body(body), body=bytes(body), signature=bytes(signature)
    )


def parse_signed_checkpoint(raw: bytes) -> SignedCheckpoint:
    """Parse a signed checkpoint from the wire (bounded); the signature is NOT checked here."""
    try:
        outer = parse_canonical(raw, max_bytes=MAX_CHECKPOINT_BYTES * 2, max_depth=2)
    except InvalidInput as exc:
        raise CheckpointInvalid(f"signed checkpoint: {exc.message}") from None
    if not isinstance(outer, dict) or set(outer) != {"body", "signature"}:
        raise CheckpointInvalid("a signed checkpoint is exactly {body, signature}")
    body_text, signature_text = outer["body"], outer["signature"]
    if not isinstance(body_text, str) or not isinstance(signature_text, str):
        raise CheckpointInvalid("checkpoint body and signature are text")
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointInvalid("checkpoint signature is not base64") from None
    return load_signed_checkpoint(body_text.encode("utf-8"), signature)


def verify_checkpoint(signed: SignedCheckpoint, keys: SigningKeyLookup, *, node: str) -> Checkpoint:
    """Check that ``node`` signed this checkpoint with a key valid at its time."""
    checkpoint = _parse_checkpoint_body(signed.body)
    if checkpoint != signed.checkpoint:
        raise CheckpointInvalid("checkpoint fields do not match its signed body")
    if checkpoint.node != node:
        raise CheckpointInvalid(f"checkpoint is from node {checkpoint.node!r}, not {node!r}")
    try:
        verify_key = keys.signing_key(checkpoint.key_id, at=checkpoint.time)
    except GatewayError as exc:
        raise CheckpointInvalid(
            f"checkpoint key {checkpoint.key_id} is not usable: {exc.message}",
            check="checkpoint-signature",
        ) from None
    try:
        verify_key.verify(tagged(Purpose.CHECKPOINT, signed.body), signed.signature)
    except BadSignatureError:
        raise CheckpointInvalid(
            f"checkpoint of size {checkpoint.size} has a bad signature",
            check="checkpoint-signature",
        ) from None
    return checkpoint


def check_checkpoint_root(checkpoint: Checkpoint, computed_root: bytes | None) -> None:
    """Raise unless the entries' recomputed root at the checkpoint's size is the signed one."""
    if computed_root is None:
        raise LedgerVerificationFailed(
            f"checkpoint of size {checkpoint.size} covers entries the ledger does not have",
            check="checkpoint",
            seq=checkpoint.size - 1,
        )
    if not hmac.compare_digest(computed_root, checkpoint.root):
        raise LedgerVerificationFailed(
            f"checkpoint of size {checkpoint.size}: the entries' root is not the signed root",
            check="checkpoint",
            seq=checkpoint.size - 1,
        )


def audit_peer_answer(witnessed: Checkpoint, current: Checkpoint, proof: Sequence[bytes]) -> None:
    """Check that the peer's ``current`` checkpoint extends the one we ``witnessed``.

    Both checkpoints must already be signature-verified. A smaller tree, a
    different root at the same size, or a proof that fails means the peer's
    history was rewritten after we witnessed it: :class:`WitnessMismatch`.
    """
    if current.node != witnessed.node:
        raise WitnessMismatch("the peer answered with another node's checkpoint")
    if current.size < witnessed.size:
        raise WitnessMismatch(
            f"peer ledger shrank from {witnessed.size} to {current.size} entries since we "
            "witnessed it"
        )
    if witnessed.size == 0:
        if not hmac.compare_digest(witnessed.root, merkle.EMPTY_ROOT):
            raise WitnessMismatch("the witnessed empty checkpoint has a non-empty root")
        return
    try:
        merkle.verify_consistency(witnessed.size, current.size, witnessed.root, current.root, proof)
    except merkle.MerkleProofInvalid as exc:
        raise WitnessMismatch(
            f"peer ledger of {current.size} entries does not extend the {witnessed.size} we "
            f"witnessed: {exc.message}; its history was rewritten"
        ) from None
