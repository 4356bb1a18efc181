"""Written consent and the disclosure rule (MOC item 3, SPEC §7).

Pure: no I/O, no clock, no randomness. Times come in as ``now=``; identifiers
(consent ids, request ids) are chosen by the caller; signing is a callable the
caller passes (the node's operational key), verification takes the public key
of the pinned peer manifest.

**The grant.** The originator's written consent is a canonical JSON document
(RFC 8785) of type ``consent-grant``: consent id, request id, items (bundle
ids), third party, purpose, valid from, valid until, maximum uses (or null),
conditions, granting officer, granting node, key id. The originator's
operational Ed25519 key signs ``tagged(Purpose.CONSENT, document_bytes)``. The
document bytes and the signature are kept exactly as received and verified as
they are; nothing is re-serialised to verify. Anyone holding the originator's
key manifest can check a grant on its own.

**The rule.** :func:`decide_disclosure` releases items to a named recipient
only when, for every item, one of these holds:

1. the item is the node's own (it originated here);
2. the item is not confidential (its marking is ``public``; any other or
   missing marking counts as confidential);
3. the recipient is one of this side's internal recipients (policy);
4. a valid consent covers it.

All the items that need consent (the peer's confidential items going to a
third party) must be covered by **one** consent: the originator consented to
that set, that recipient and that purpose, so one written consent has to name
them all. A consent is valid when it was granted by the item's originating
node, names that recipient and that purpose, ``valid_from <= now <
valid_until``, no revocation of it is on record (whatever time the revocation
carries: a recorded revocation always counts), and, when it has a maximum
number of uses, fewer uses than that were spent. One allowed disclosure that
relies on a consent spends exactly one use of it, however many items it
releases. When several consents would do, the one that ends first is used
(then the smallest consent id), so longer-lived consents are kept.

**Matching.** Recipients and purposes compare after normalisation: Unicode
NFKC, case folded, surrounding white space removed and inner runs of white
space made one space. ``"  Embassy of  X "`` matches ``"embassy of x"``;
anything else (a different word, punctuation) does not match.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple

import nacl.exceptions
import nacl.signing

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.domain import Purpose, tagged
from gateway.core.times import (
    DateMeans,
    Precision,
    format_utc,
    parse_record_utc,
    parse_user_time,
    parse_utc,
    record_utc_text,
)
from gateway.errors import InvalidInput, VerificationError

__all__ = [
    "GRANT_TYPE",
    "MAX_CONDITIONS_CHARS",
    "MAX_GRANT_BYTES",
    "MAX_ITEMS",
    "MAX_TEXT_CHARS",
    "PUBLIC_MARKING",
    "Basis",
    "ConsentGrant",
    "ConsentSignatureInvalid",
    "ConsentState",
    "Decision",
    "DisclosureItem",
    "EntryKind",
    "GrantTerms",
    "ItemDecision",
    "Missing",
    "SignedGrant",
    "consent_problem",
    "decide_disclosure",
    "format_time",
    "normalise_name",
    "parse_time",
    "parse_valid_until",
    "sign_grant",
    "terms_from_record",
    "terms_record",
    "validate_items",
    "validate_text",
    "verify_grant",
]

GRANT_TYPE: Final = "consent-grant"
GRANT_VERSION: Final = 1
PUBLIC_MARKING: Final = "public"
MAX_GRANT_BYTES: Final = 64 * 1024
MAX_ITEMS: Final = 256
MAX_TEXT_CHARS: Final = 500
MAX_CONDITIONS_CHARS: Final = 4000
MAX_APPROVERS: Final = 16
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Unicode category Cc (U+0000..U+001F, U+007F..U+009F) except tab and newline."""
_NODES = ("jp", "pk")
_SIGNATURE_BYTES = 64
_PUBLIC_KEY_BYTES = 32


class ConsentSignatureInvalid(VerificationError):
    """A consent grant's signature, signer or content does not verify."""

    reason = "consent.signature"
    check = "consent-signature"


# -- small values ------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def normalise_name(text: str) -> str:
    """The form in which recipients and purposes are compared (see module doc).

    A pure function of its text, so results are kept (a consent check compares
    the same few names again and again).
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split())


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, six fractional digits only when not zero."""
    return format_utc(value, Precision.OPTIONAL_MICROSECONDS)


def parse_time(text: object, *, field: str) -> datetime:
    """Parse a time written by :func:`format_time`; anything else: InvalidInput."""
    return parse_utc(text, field=field, precision=Precision.OPTIONAL_MICROSECONDS)


def validate_text(value: object, *, field: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A non-empty, bounded, printable text (names, purposes)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: expected text")
    if not value.strip():
        raise InvalidInput(f"{field}: must not be empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{field}: longer than {max_chars} characters")
    if _CONTROL.search(value):
        raise InvalidInput(f"{field}: contains control characters")
    return value


def _validate_id(value: object, *, field: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInput(
            f"{field}: expected an identifier of 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return value


def validate_items(items: Iterable[object], *, field: str = "items") -> tuple[str, ...]:
    """Bundle ids: at least one, at most :data:`MAX_ITEMS`, no repeats; sorted."""
    values = list(items)
    if not values:
        raise InvalidInput(f"{field}: name at least one bundle")
    if len(values) > MAX_ITEMS:
        raise InvalidInput(f"{field}: more than {MAX_ITEMS} bundles")
    checked = [_validate_id(v, field=field) for v in values]
    if len(set(checked)) != len(checked):
        raise InvalidInput(f"{field}: a bundle is named twice")
    return tuple(sorted(checked))


# -- the grant ---------------------------------------------------------------


class _NamedParties:
    """The rule's keys of a grant's recipient and purpose (:func:`normalise_name`)."""

    __slots__ = ()
    third_party: str
    purpose: str

    @property
    def third_party_key(self) -> str:
        return normalise_name(self.third_party)

    @property
    def purpose_key(self) -> str:
        return normalise_name(self.purpose)


@dataclass(frozen=True, slots=True)
class ConsentGrant(_NamedParties):
    """The content of a written consent, as both sides read it."""

    consent_id: str
    request_id: str
    items: tuple[str, ...]
    third_party: str
    purpose: str
    valid_from: datetime
    valid_until: datetime
    max_uses: int | None
    conditions: str
    granting_officer: str
    granting_node: str
    key_id: str
    approvers: tuple[str, ...] = ()
    """Who approved the grant under the two-person rule (docs/consent.md, "Approvals"), sorted; empty when
    one officer granted alone. Signed as ``approvers`` only when not empty, so a
    document made before the rule existed reads and verifies as it always did."""

    def __post_init__(self) -> None:
        _validate_id(self.consent_id, field="consent_id")
        _validate_id(self.request_id, field="request_id")
        if validate_items(self.items) != self.items:
            raise InvalidInput("items: must be sorted bundle ids")
        validate_text(self.third_party, field="third_party")
        validate_text(self.purpose, field="purpose")
        validate_text(self.granting_officer, field="granting_officer")
        if not isinstance(self.conditions, str) or len(self.conditions) > MAX_CONDITIONS_CHARS:
            raise InvalidInput(f"conditions: text of at most {MAX_CONDITIONS_CHARS} characters")
        if self.granting_node not in _NODES:
            raise InvalidInput(f"granting_node: must be one of {', '.join(_NODES)}")
        _validate_id(self.key_id, field="key_id")
        if not isinstance(self.approvers, tuple) or len(self.approvers) > MAX_APPROVERS:
            raise InvalidInput(f"approvers: at most {MAX_APPROVERS} names")
        for approver in self.approvers:
            validate_text(approver, field="approvers", max_chars=64)
        if list(self.approvers) != sorted(set(self.approvers)):
            raise InvalidInput("approvers: names must be distinct and sorted")
        for name in ("valid_from", "valid_until"):
            value = getattr(self, name)
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise InvalidInput(f"{name}: must be a time with a zone")
        if self.valid_until <= self.valid_from:
            raise InvalidInput("valid_until: must be later than valid_from")
        if self.max_uses is not None and (
            isinstance(self.max_uses, bool)
            or not isinstance(self.max_uses, int)
            or not 1 <= self.max_uses <= 1_000_000
        ):
            raise InvalidInput("max_uses: must be a whole number from 1 to 1000000, or absent")

    def document(self) -> dict[str, Any]:
        """The JSON object that is signed."""
        return {
            "type": GRANT_TYPE,
            "version": GRANT_VERSION,
            "consent_id": self.consent_id,
            "request_id": self.request_id,
            "items": list(self.items),
            "third_party": self.third_party,
            "purpose": self.purpose,
            "valid_from": format_time(self.valid_from),
            "valid_until": format_time(self.valid_until),
            "max_uses": self.max_uses,
            "conditions": self.conditions,
            "granting_officer": self.granting_officer,
            "granting_node": self.granting_node,
            "key_id": self.key_id,
            **({"approvers": list(self.approvers)} if self.approvers else {}),
        }

    def document_bytes(self) -> bytes:
        return canonical_bytes(self.document())

    def terms(self) -> GrantTerms:
        """What :func:`decide_disclosure` reads of this grant."""
        return GrantTerms(
            consent_id=self.consent_id,
            granting_node=self.granting_node,
            items=self.items,
            third_party=self.third_party,
            purpose=self.purpose,
            valid_from=self.valid_from,
            valid_until=self.valid_until,
            max_uses=self.max_uses,
        )

    @classmethod
    def from_document(cls, value: object) -> ConsentGrant:
        """Read a grant document; every field is checked and named on failure."""
        if not isinstance(value, dict):
            raise InvalidInput("consent grant: expected a JSON object")
        expected = set(cls(*_EXAMPLE).document())
        missing = sorted(expected - set(value))
        if missing:
            raise InvalidInput(f"consent grant: missing field {missing[0]}")
        extra = sorted(set(value) - expected - {"approvers"})
        if extra:
            raise InvalidInput(f"consent grant: unknown field {extra[0]}")
        if value["type"] != GRANT_TYPE:
            raise InvalidInput(f"consent grant: type must be {GRANT_TYPE!r}")
        if value["version"] != GRANT_VERSION or isinstance(value["version"], bool):
            raise InvalidInput(f"consent grant: version {value['version']!r} is not supported")
        items = value["items"]
        if not isinstance(items, list):
            raise InvalidInput("items: expected a list of bundle ids")
        if validate_items(items) != tuple(items):
            raise InvalidInput("items: bundle ids must be listed in sorted order")
        return cls(
            consent_id=value["consent_id"],
            request_id=value["request_id"],
            items=validate_items(items),
            third_party=value["third_party"],
            purpose=value["purpose"],
            valid_from=parse_time(value["valid_from"], field="valid_from"),
            valid_until=parse_time(value["valid_until"], field="valid_until"),
            max_uses=value["max_uses"],
            conditions=value["conditions"],
            granting_officer=value["granting_officer"],
            granting_node=value["granting_node"],
            key_id=value["key_id"],
            approvers=_approvers(value["approvers"]) if "approvers" in value else (),
        )


def _approvers(value: object) -> tuple[str, ...]:
    """The optional ``approvers`` field: when present, a non-empty list of names."""
    if not isinstance(value, list):
        raise InvalidInput("approvers: expected a list of names")
    if not value:
        raise InvalidInput("approvers: when present, name at least one approver")
    return tuple(value)


_EXAMPLE = (
    "c",
    "r",
    ("b",),
    "t",
    "p",
    datetime(2000, 1, 1, tzinfo=UTC),
    datetime(2000, 1, 2, tzinfo=UTC),
    None,
    "",
    "o",
    "jp",
    "k",
)


class _TermsFields(NamedTuple):
    consent_id: str
    granting_node: str
    items: tuple[str, ...]
    third_party: str
    purpose: str
    valid_from: datetime
    valid_until: datetime
    max_uses: int | None


class GrantTerms(_TermsFields, _NamedParties):
    """The terms of a grant that :func:`decide_disclosure` reads, and nothing else.

    Kept beside each stored grant as a compact record (:func:`terms_record`),
    written from the verified grant in the transaction that stores it, so a
    consent check reads them without parsing the signed document again. The
    document stays the source of truth: :func:`terms_from_record` gives
    ``None`` for a record that is not bound to the stored document's exact
    bytes or not well formed, and the caller then parses the document.

    A named tuple (immutable, as :class:`ConsentGrant` is): a first consent
    check builds one per consent it reads, and a tuple is built in under half
    a frozen dataclass's time. Being a tuple, an encoder that takes tuples
    would write it as an array: it is never encoded (only the rule reads it).
    """

    __slots__ = ()


TERMS_VERSION: Final = 1


def terms_record(grant: ConsentGrant, document: bytes) -> bytes | None:
    """The compact record of ``grant``'s terms, bound to the signed ``document`` it was read from.

    Canonical JSON, one array: the record's version, the SHA-256 (hex) of the
    document's exact bytes, then consent id, granting node, items, third
    party, purpose, valid from and valid until (ISO 8601 in UTC with
    microseconds, one fixed length: read back by the C parser of
    :meth:`datetime.fromisoformat`) and maximum uses.
    ``None`` unless ``grant`` writes exactly ``document`` (a grant read from
    a canonical document does): a record is never bound to a document that
    says anything else.
    """
    if not hmac.compare_digest(grant.document_bytes(), document):
        return None
    return canonical_bytes(
        [
            TERMS_VERSION,
            hashlib.sha256(document).hexdigest(),
            grant.consent_id,
            grant.granting_node,
            list(grant.items),
            grant.third_party,
            grant.purpose,
            record_utc_text(grant.valid_from),
            record_utc_text(grant.valid_until),
            grant.max_uses,
        ]
    )


def terms_from_record(record: object, *, consent_id: str, document: bytes) -> GrantTerms | None:
    """The terms a stored record holds, or ``None`` when it may not be used as they are.

    ``None`` (the caller then reads the signed document itself) for a record
    that is missing, not a record of this version, not bound to ``document``
    (its digest differs: the document was replaced after the record was
    written), for another consent than ``consent_id``, or with a value the
    grant itself could not hold. Never raises for a bad record: a record only
    ever spares a parse of the document, it never decides anything itself.
    """
    if isinstance(record, memoryview):
        record = bytes(record)
    if not isinstance(record, (bytes, str)) or len(record) > MAX_GRANT_BYTES:
        return None
    import orjson  # noqa: PLC0415 - loaded by the first check, as canonical parsing does

    try:
        value = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not list or len(value) != 10:
        return None
    version, digest, named, node, items, third_party, purpose, start, end, max_uses = value
    # ``type(x) is int`` rules out ``bool`` too.
    if (
        type(version) is not int
        or version != TERMS_VERSION
        or type(digest) is not str
        or not digest.isascii()
        or not hmac.compare_digest(digest, hashlib.sha256(document).hexdigest())
        or named != consent_id
        or node not in _NODES
        or type(items) is not list
        or not 0 < len(items) <= MAX_ITEMS
        or not all(type(item) is str for item in items)
        or type(third_party) is not str
        or not third_party.strip()
        or type(purpose) is not str
        or not purpose.strip()
        or not (max_uses is None or (type(max_uses) is int and 1 <= max_uses <= 1_000_000))
    ):
        return None
    valid_from, valid_until = parse_record_utc(start), parse_record_utc(end)
    if valid_from is None or valid_until is None or not valid_from < valid_until:
        return None
    return GrantTerms(
        consent_id, node, tuple(items), third_party, purpose, valid_from, valid_until, max_uses
    )


@dataclass(frozen=True, slots=True)
class SignedGrant:
    """A grant as it travels and is stored: the exact signed bytes and the signature."""

    document: bytes
    signature: bytes

    def to_wire(self) -> dict[str, str]:
        """The JSON form carried in a ``consent-grant`` bundle (base64 fields)."""
        return {
            "document": base64.b64encode(self.document).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_wire(cls, value: object) -> SignedGrant:
        if not isinstance(value, dict) or set(value) != {"document", "signature"}:
            raise InvalidInput("signed grant: expected an object with document and signature")
        try:
            document = base64.b64decode(str(value["document"]), validate=True)
            signature = base64.b64decode(str(value["signature"]), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("signed grant: document or signature is not base64") from None
        if len(document) > MAX_GRANT_BYTES:
            raise InvalidInput(f"signed grant: document exceeds {MAX_GRANT_BYTES} bytes")
        if len(signature) != _SIGNATURE_BYTES:
            raise InvalidInput("signed grant: signature must be 64 bytes")
        return cls(document=document, signature=signature)


def sign_grant(grant: ConsentGrant, sign: Callable[[bytes], bytes]) -> SignedGrant:
    """Sign a grant with the originator's operational key.

    ``sign`` receives the exact message (``tagged(Purpose.CONSENT, document)``)
    and returns the 64-byte Ed25519 signature.
    """
    document = grant.document_bytes()
    signature = bytes(sign(tagged(Purpose.CONSENT, document)))
    if len(signature) != _SIGNATURE_BYTES:
        raise InvalidInput("signer returned a signature that is not 64 bytes")
    return SignedGrant(document=document, signature=signature)


def verify_grant(
    signed: SignedGrant,
    *,
    public_key: bytes,
    key_id: str,
    granting_node: str,
) -> ConsentGrant:
    """Verify a signed grant against the originator's signing key; return its content.

    The signature is checked over the bytes as received, before they are
    parsed; the document must then be canonical, name ``granting_node`` and
    ``key_id`` (the key that verified it). Any failure raises
    :class:`ConsentSignatureInvalid` (exit code 4).
    """
    if len(public_key) != _PUBLIC_KEY_BYTES:
        raise ConsentSignatureInvalid("consent grant: verification key must be 32 bytes")
    if len(signed.document) > MAX_GRANT_BYTES or len(signed.signature) != _SIGNATURE_BYTES:
        raise ConsentSignatureInvalid("consent grant: document or signature has a wrong size")
    try:
        nacl.signing.VerifyKey(public_key).verify(
            tagged(Purpose.CONSENT, signed.document), signed.signature
        )
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        raise ConsentSignatureInvalid(
            "consent grant: the signature does not verify with the originator's key"
        ) from None
    try:
        grant = ConsentGrant.from_document(
            parse_canonical(signed.document, max_bytes=MAX_GRANT_BYTES)
        )
    except InvalidInput as exc:
        raise ConsentSignatureInvalid(
            f"consent grant: signed document is malformed: {exc}"
        ) from None
    if grant.granting_node != granting_node:
        raise ConsentSignatureInvalid(
            f"consent grant: names granting node {grant.granting_node!r}, "
            f"but was verified as from {granting_node!r}"
        )
    if grant.key_id != key_id:
        raise ConsentSignatureInvalid(
            f"consent grant: names key {grant.key_id!r}, but key {key_id!r} verified it"
        )
    return grant


# -- the rule ----------------------------------------------------------------


class Basis(StrEnum):
    """Why an item may (or may not) go to the recipient."""

    OWN = "own item"
    PUBLIC = "not confidential"
    INTERNAL = "recipient internal"
    CONSENT = "covered by consent"
    MISSING = "missing"


class Missing(StrEnum):
    """What is missing for a peer's confidential item to go to a third party."""

    NO_CONSENT = "no consent"
    EXPIRED = "consent expired"
    NOT_YET_VALID = "consent not yet valid"
    REVOKED = "consent revoked"
    SUSPECT = "consent suspect: its signing key was distrusted before it arrived"
    USES_SPENT = "uses spent"
    OTHER_RECIPIENT = "consent is for another recipient"
    OTHER_PURPOSE = "consent is for another purpose"
    NOT_COVERED = "consent does not cover this item"


# The order in which a consent's checks run; a later failure means the consent
# came closer to applying, so it is the more useful one to report.
_CHECK_ORDER = (
    Missing.OTHER_RECIPIENT,
    Missing.OTHER_PURPOSE,
    Missing.SUSPECT,
    Missing.REVOKED,
    Missing.NOT_YET_VALID,
    Missing.EXPIRED,
    Missing.USES_SPENT,
)


class EntryKind(StrEnum):
    """The ledger entry one disclosure attempt leaves."""

    MADE = "disclosure-made"
    BLOCKED = "disclosure-blocked"
    INTERNAL = "internal-share"


@dataclass(frozen=True, slots=True)
class DisclosureItem:
    """An item asked to be disclosed: its bundle id, originating node and marking."""

    bundle_id: str
    origin_node: str
    marking: str | None


@dataclass(frozen=True, slots=True)
class ConsentState:
    """A verified grant as this node holds it: revocation and uses spent so far.

    ``grant`` is the grant read from its signed document, or (a consent check
    that records nothing) only the terms the rule reads, from the compact
    record stored beside it (:class:`GrantTerms`).
    """

    grant: ConsentGrant | GrantTerms
    revoked_at: datetime | None = None
    uses_spent: int = 0
    suspect: bool = False
    """The grant arrived in a bundle marked suspect (its signing key was revoked
    and distrusted from before it arrived): it authorises nothing; the
    originator issues the consent again."""

    @property
    def consent_id(self) -> str:
        return self.grant.consent_id


def consent_problem(
    state: ConsentState, *, recipient: str, purpose: str, now: datetime
) -> Missing | None:
    """The first check that ``state`` fails for this recipient and purpose, or None."""
    return _problem(state, normalise_name(recipient), normalise_name(purpose), now)


def _problem(
    state: ConsentState, recipient_key: str, purpose_key: str, now: datetime
) -> Missing | None:
    """:func:`consent_problem` with the recipient and purpose already normalised."""
    grant = state.grant
    if grant.third_party_key != recipient_key:
        return Missing.OTHER_RECIPIENT
    if grant.purpose_key != purpose_key:
        return Missing.OTHER_PURPOSE
    if state.suspect:
        return Missing.SUSPECT
    if state.revoked_at is not None:
        return Missing.REVOKED
    if now < grant.valid_from:
        return Missing.NOT_YET_VALID
    if now >= grant.valid_until:
        return Missing.EXPIRED
    if grant.max_uses is not None and state.uses_spent >= grant.max_uses:
        return Missing.USES_SPENT
    return None


@dataclass(frozen=True, slots=True)
class ItemDecision:
    """The verdict for one item: its basis, the consent involved, what is missing."""

    bundle_id: str
    basis: Basis
    consent_id: str | None = None
    missing: Missing | None = None

    @property
    def allowed(self) -> bool:
        return self.basis is not Basis.MISSING

    def explain(self) -> str:
        if self.basis is Basis.CONSENT:
            return f"{self.bundle_id}: covered by consent {self.consent_id}"
        if self.basis is Basis.MISSING:
            assert self.missing is not None
            where = f" ({self.consent_id})" if self.consent_id else ""
            return f"{self.bundle_id}: {self.missing.value}{where}"
        return f"{self.bundle_id}: {self.basis.value}"

    def to_record(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "basis": self.basis.value,
            "consent_id": self.consent_id,
            "missing": None if self.missing is None else self.missing.value,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one disclosure attempt, item by item."""

    allowed: bool
    recipient: str
    purpose: str
    internal: bool
    items: tuple[ItemDecision, ...]
    consent_id: str | None
    """The consent that this disclosure spends a use of (None when none is needed)."""

    @property
    def entry_kind(self) -> EntryKind:
        if not self.allowed:
            return EntryKind.BLOCKED
        return EntryKind.INTERNAL if self.internal else EntryKind.MADE

    @property
    def missing(self) -> tuple[ItemDecision, ...]:
        return tuple(item for item in self.items if not item.allowed)

    def explain(self) -> str:
        """One line per item, missing ones first; safe to print (ids and reasons only)."""
        ordered = sorted(self.items, key=lambda item: (item.allowed, item.bundle_id))
        return "; ".join(item.explain() for item in ordered)

    def to_record(self) -> dict[str, Any]:
        """The ledger body of this attempt (metadata only, no case content)."""
        return {
            "allowed": self.allowed,
            "recipient": self.recipient,
            "purpose": self.purpose,
            "internal": self.internal,
            "consent_id": self.consent_id,
            "items": [item.to_record() for item in self.items],
        }


@functools.lru_cache(maxsize=64)
def _name_keys(names: tuple[str, ...]) -> frozenset[str]:
    """The :func:`normalise_name` keys of ``names`` (a node's internal recipients, the
    same at every call: normalised once)."""
    return frozenset(normalise_name(name) for name in names)


def _ends_first(state: ConsentState) -> tuple[datetime, str]:
    grant = state.grant
    return (grant.valid_until, grant.consent_id)


def decide_disclosure(
    items: Sequence[DisclosureItem],
    recipient: str,
    purpose: str,
    *,
    own_node: str,
    internal_recipients: Iterable[str],
    consents: Sequence[ConsentState],
    now: datetime,
) -> Decision:
    """Decide whether ``items`` may go to ``recipient`` for ``purpose`` (module doc)."""
    if not items:
        raise InvalidInput("name at least one bundle to disclose")
    if len({item.bundle_id for item in items}) != len(items):
        raise InvalidInput("a bundle is named twice")
    validate_text(recipient, field="recipient")
    validate_text(purpose, field="purpose")
    if now.tzinfo is None:
        raise InvalidInput("now must carry a time zone")
    recipient_key = normalise_name(recipient)
    internal = recipient_key in _name_keys(tuple(internal_recipients))

    verdicts: dict[str, ItemDecision] = {}
    needed: list[DisclosureItem] = []
    for item in items:
        if item.origin_node == own_node:
            verdicts[item.bundle_id] = ItemDecision(item.bundle_id, Basis.OWN)
        elif item.marking == PUBLIC_MARKING:
            verdicts[item.bundle_id] = ItemDecision(item.bundle_id, Basis.PUBLIC)
        elif internal:
            verdicts[item.bundle_id] = ItemDecision(item.bundle_id, Basis.INTERNAL)
        else:
            needed.append(item)

    def covers(state: ConsentState, item: DisclosureItem) -> bool:
        return state.grant.granting_node == item.origin_node and item.bundle_id in state.grant.items

    purpose_key = normalise_name(purpose)
    problems = {
        state.grant.consent_id: _problem(state, recipient_key, purpose_key, now)
        for state in consents
    }
    valid = [s for s in consents if problems[s.grant.consent_id] is None]
    valid.sort(key=_ends_first)
    chosen: ConsentState | None = None
    if needed:
        chosen = next((s for s in valid if all(covers(s, item) for item in needed)), None)
        if chosen is not None:
            for item in needed:
                verdicts[item.bundle_id] = ItemDecision(
                    item.bundle_id, Basis.CONSENT, consent_id=chosen.consent_id
                )
        else:
            _explain_missing(needed, consents, valid, problems, covers, verdicts)

    ordered = tuple(verdicts[item.bundle_id] for item in items)
    allowed = all(verdict.allowed for verdict in ordered)
    return Decision(
        allowed=allowed,
        recipient=recipient,
        purpose=purpose,
        internal=internal,
        items=ordered,
        consent_id=chosen.consent_id if (allowed and chosen is not None) else None,
    )


def _explain_missing(
    needed: Sequence[DisclosureItem],
    consents: Sequence[ConsentState],
    valid: Sequence[ConsentState],
    problems: dict[str, Missing | None],
    covers: Callable[[ConsentState, DisclosureItem], bool],
    verdicts: dict[str, ItemDecision],
) -> None:
    """Fill in, for a refused disclosure, the reason of every item that needs consent."""
    # The valid consent that covers most of the items: items it covers are
    # fine, the others are "not covered" by it (one consent must cover all).
    best: ConsentState | None = None
    best_count = 0
    for state in valid:
        count = sum(1 for item in needed if covers(state, item))
        if count > best_count:
            best, best_count = state, count
    if best is not None:
        for item in needed:
            if covers(best, item):
                verdicts[item.bundle_id] = ItemDecision(
                    item.bundle_id, Basis.CONSENT, consent_id=best.consent_id
                )
            else:
                verdicts[item.bundle_id] = ItemDecision(
                    item.bundle_id,
                    Basis.MISSING,
                    consent_id=best.consent_id,
                    missing=Missing.NOT_COVERED,
                )
        return
    for item in needed:
        naming = [s for s in consents if covers(s, item)]
        if not naming:
            if valid:
                verdicts[item.bundle_id] = ItemDecision(
                    item.bundle_id,
                    Basis.MISSING,
                    consent_id=valid[0].consent_id,
                    missing=Missing.NOT_COVERED,
                )
            else:
                verdicts[item.bundle_id] = ItemDecision(
                    item.bundle_id, Basis.MISSING, missing=Missing.NO_CONSENT
                )
            continue

        def closeness(state: ConsentState) -> tuple[int, str]:
            problem = problems[state.consent_id]
            assert problem is not None
            return (_CHECK_ORDER.index(problem), state.consent_id)

        closest = max(naming, key=closeness)
        reason = problems[closest.consent_id]
        verdicts[item.bundle_id] = ItemDecision(
            item.bundle_id, Basis.MISSING, consent_id=closest.consent_id, missing=reason
        )


def parse_valid_until(text: str | None, *, option: str = "--valid-until") -> datetime | None:
    """The end of a consent's validity as typed by an officer, in UTC; ``None`` for none.

    ``YYYY-MM-DD`` is valid through that whole day (UTC), so it ends at the next
    midnight; a time must carry its zone. ``option`` names the value in errors
    (``--valid-until`` on the command line, ``valid_until`` in the API).
    Raises :class:`InvalidInput` for another form or an instant outside
    :data:`gateway.core.times.RANGE_TEXT` (see :func:`parse_user_time`).
    """
    if text is None:
        return None
    return parse_user_time(text, option=option, dates=DateMeans.END)
