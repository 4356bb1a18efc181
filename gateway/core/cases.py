"""Case schemas: what an officer writes and the envelope carries, one per MOC item.

Every case type is a strict pydantic model (``extra="forbid"``, no coercion of
types) with a schema version. The registry :data:`CASE_TYPES` maps a type name
to its current :class:`CaseType` (version and model); the version travels in
every envelope header, so a peer running an older or newer schema refuses the
case instead of misreading it (MOC item 7: amendments by mutual consent).

:func:`validate_case` is the one way in: it takes JSON-shaped data (as parsed
from a file or decrypted from an envelope) and returns the model, or raises
:class:`InvalidCase` whose message names the field path and the reason, e.g.
``broker.licence_number: field required``.

Case types (SPEC §7a):

* ``broker-misconduct`` (MOC 4(1)): acts exactly (a)-(e).
* ``exam-fraud`` (MOC 5): impersonation, forged or altered pass certificate, other.
* ``consultation`` (MOC 4(2)): agenda items tagged (a)-(f), minutes.
* ``acceptance-suspension`` (MOC 6): sector, from date, reason.
* ``return-assistance`` (MOC 6): persons incl. dependants, temporary passports.
* ``information-request`` / ``information-reply`` (MOC 4(1)).
* ``consent-request`` / ``consent-grant`` / ``consent-denial`` /
  ``consent-revocation`` / ``consent-use`` (MOC 3): the written-consent protocol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from gateway.core.canonical import canonical_bytes
from gateway.core.domain import SHA256_HEX
from gateway.errors import InvalidInput

__all__ = [
    "BROKER_ACTS",
    "CASE_TYPES",
    "CONSULTATION_TOPICS",
    "DEFAULT_MAX_CASE_BYTES",
    "PROTOCOL_COMMANDS",
    "PROTOCOL_TYPES",
    "REPLY_TARGETS",
    "SSW_SECTORS",
    "AcceptanceSuspension",
    "AffectedPerson",
    "AgendaItem",
    "Answer",
    "BrokerCorporation",
    "BrokerIndividual",
    "BrokerMisconduct",
    "BundleRefusal",
    "Case",
    "CaseType",
    "ConsentDenial",
    "ConsentGrant",
    "ConsentRequest",
    "ConsentRevocation",
    "ConsentUseNotice",
    "Consultation",
    "ExamFraud",
    "InformationReply",
    "InformationRequest",
    "InvalidCase",
    "Person",
    "ReturnAssistance",
    "ReturnPerson",
    "case_type_for",
    "resolve_reply_to",
    "validate_case",
]

DEFAULT_MAX_CASE_BYTES = 1024 * 1024

BROKER_ACTS: Mapping[str, str] = {
    "a": "manages workers' or candidates' money or property, e.g. by collecting deposits",
    "b": "makes contracts imposing illegal penalties or otherwise transferring money unfairly",
    "c": "violence, threats, restriction of liberty or other human-rights violations",
    "d": "uses or supplies forged, altered or false documents to obtain permits or visas",
    "e": "collects fees without showing the basis of calculation, amount and breakdown",
}

CONSULTATION_TOPICS: Mapping[str, str] = {
    "a": "policy implementation and changes",
    "b": "propriety of brokers, including corrective measures",
    "c": "screenings; improper receiving organisations or support bodies in Japan "
    "and improper sending agencies in Pakistan",
    "d": "proper conduct of skills and Japanese-language tests",
    "e": "residence management in Japan",
    "f": "other operation of the system",
}

SSW_SECTORS = (
    "nursing-care",
    "building-cleaning",
    "industrial-products-manufacturing",
    "construction",
    "shipbuilding",
    "automobile-repair",
    "aviation",
    "accommodation",
    "automobile-transportation",
    "railway",
    "agriculture",
    "fishery",
    "food-manufacturing",
    "food-service",
    "forestry",
    "wood-industry",
)


class InvalidCase(InvalidInput):
    """Case data does not match its schema; the message names the field path."""

    reason = "invalid-case"

    def __init__(
        self, message: str, *, field: str = "", errors: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.errors: list[tuple[str, str]] = errors if errors is not None else [(field, message)]


# --- building blocks -------------------------------------------------------------

ShortText = Annotated[str, StringConstraints(min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(min_length=1, max_length=20_000)]
Sha256Hex = Annotated[str, StringConstraints(pattern=rf"^{SHA256_HEX.pattern}$")]
"""A SHA-256 in hex: 64 lower-case hex digits (:data:`gateway.core.domain.SHA256_HEX`)."""
CountryCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
"""ISO 3166-1 alpha-3 country code (``JPN``, ``PAK``), as in passports."""
PassportNumber = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{5,20}$")]
LicenceNumber = Annotated[str, StringConstraints(min_length=1, max_length=64)]
BundleId = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
]
"""A bundle id as it appears in envelope headers: a lowercase UUID."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Person(_Strict):
    """A natural person, identified as in their passport."""

    family_name: ShortText
    given_names: ShortText
    passport_number: PassportNumber
    nationality: CountryCode
    date_of_birth: date


class AffectedPerson(Person):
    """An SSW worker or a candidate affected by a broker's acts."""

    status: Literal["worker", "candidate"]


class BrokerIndividual(_Strict):
    """A broker who is a natural person. ``licence_number`` is required; null
    states that the broker holds no licence."""

    kind: Literal["individual"]
    name: ShortText
    country: CountryCode
    licence_number: LicenceNumber | None
    passport_number: PassportNumber | None = None
    nationality: CountryCode | None = None
    date_of_birth: date | None = None
    address: ShortText | None = None


class BrokerCorporation(_Strict):
    """A broker that is a company or other legal person."""

    kind: Literal["corporation"]
    name: ShortText
    country: CountryCode
    licence_number: LicenceNumber | None
    registration_number: ShortText | None = None
    address: ShortText | None = None
    representative: ShortText | None = None


Broker = Annotated[BrokerIndividual | BrokerCorporation, Field(discriminator="kind")]
_UNION_TAGS = frozenset({"individual", "corporation"})


class _Case(_Strict):
    case_type: ClassVar[str]
    schema_version: ClassVar[str]


# --- MOC 4(1) ---------------------------------------------------------------------


class Period(_Strict):
    start: date
    end: date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if self.end is not None and self.end < self.start:
            raise ValueError("end is before start")
        return self


class BrokerMisconduct(_Case):
    """MOC 4(1): a broker's misconduct, acts exactly (a)-(e)."""

    case_type: ClassVar[str] = "broker-misconduct"
    schema_version: ClassVar[str] = "1"

    broker: Broker
    acts: Annotated[list[Literal["a", "b", "c", "d", "e"]], Field(min_length=1, max_length=5)]
    summary: LongText
    period: Period | None = None
    affected: Annotated[list[AffectedPerson], Field(max_length=1000)] = []
    measures_taken: LongText | None = None

    @model_validator(mode="after")
    def _distinct_acts(self) -> BrokerMisconduct:
        if len(set(self.acts)) != len(self.acts):
            raise ValueError("acts are listed more than once")
        return self


class InformationRequest(_Case):
    """MOC 4(1): ask the peer for necessary or useful information."""

    case_type: ClassVar[str] = "information-request"
    schema_version: ClassVar[str] = "1"

    subject: ShortText
    questions: Annotated[list[LongText], Field(min_length=1, max_length=100)]
    broker_acts: Annotated[list[Literal["a", "b", "c", "d", "e"]], Field(max_length=5)] = []
    broker: Broker | None = None
    persons: Annotated[list[Person], Field(max_length=1000)] = []
    related_bundles: Annotated[list[BundleId], Field(max_length=100)] = []
    respond_by: date | None = None


class Answer(_Strict):
    question: Annotated[int, Field(ge=0, lt=100)]
    answer: LongText


class InformationReply(_Case):
    """MOC 4(1): the answer to an ``information-request``."""

    case_type: ClassVar[str] = "information-reply"
    schema_version: ClassVar[str] = "1"

    request_bundle_id: BundleId
    answers: Annotated[list[Answer], Field(min_length=1, max_length=100)]
    persons: Annotated[list[Person], Field(max_length=1000)] = []
    related_bundles: Annotated[list[BundleId], Field(max_length=100)] = []


# --- MOC 4(2) ---------------------------------------------------------------------


class AgendaItem(_Strict):
    topic: Literal["a", "b", "c", "d", "e", "f"]
    title: ShortText
    notes: LongText | None = None


class Consultation(_Case):
    """MOC 4(2): a regular or ad hoc consultation; agenda items tagged (a)-(f)."""

    case_type: ClassVar[str] = "consultation"
    schema_version: ClassVar[str] = "1"

    kind: Literal["regular", "ad-hoc"]
    title: ShortText
    meeting_date: date | None = None
    agenda: Annotated[list[AgendaItem], Field(min_length=1, max_length=100)]
    minutes: LongText | None = None
    participants: Annotated[list[ShortText], Field(max_length=200)] = []


# --- MOC 5 ------------------------------------------------------------------------


class Exam(_Strict):
    kind: Literal["skills", "japanese-language"]
    name: ShortText
    held_on: date
    location: ShortText


class ExamFraud(_Case):
    """MOC 5: impersonation, forged or altered pass certificate, other test fraud."""

    case_type: ClassVar[str] = "exam-fraud"
    schema_version: ClassVar[str] = "1"

    fraud: Literal["impersonation", "forged-certificate", "altered-certificate", "other"]
    exam: Exam
    description: LongText
    persons: Annotated[list[Person], Field(min_length=1, max_length=1000)]
    certificate_number: ShortText | None = None
    broker: Broker | None = None


# --- MOC 6 ------------------------------------------------------------------------


class AcceptanceSuspension(_Case):
    """MOC 6: Japan suspends acceptance in a sector."""

    case_type: ClassVar[str] = "acceptance-suspension"
    schema_version: ClassVar[str] = "1"

    sector: Literal[
        "nursing-care",
        "building-cleaning",
        "industrial-products-manufacturing",
        "construction",
        "shipbuilding",
        "automobile-repair",
        "aviation",
        "accommodation",
        "automobile-transportation",
        "railway",
        "agriculture",
        "fishery",
        "food-manufacturing",
        "food-service",
        "forestry",
        "wood-industry",
    ]
    from_date: date
    until: date | None = None
    reason: LongText

    @model_validator(mode="after")
    def _ordered(self) -> AcceptanceSuspension:
        if self.until is not None and self.until < self.from_date:
            raise ValueError("until is before from_date")
        return self


class ReturnPerson(Person):
    """A person to return: an SSW worker, or a dependant of an SSW (ii) holder."""

    relation: Literal["worker", "spouse", "child"]
    ssw_category: Literal["i", "ii"] | None = None
    principal_passport_number: PassportNumber | None = None
    temporary_passport_requested: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ReturnPerson:
        if self.relation == "worker":
            if self.ssw_category is None:
                raise ValueError("a worker needs ssw_category 'i' or 'ii'")
            if self.principal_passport_number is not None:
                raise ValueError("a worker has no principal_passport_number")
        else:
            if self.ssw_category is not None:
                raise ValueError("a dependant has no ssw_category of their own")
            if self.principal_passport_number is None:
                raise ValueError("a dependant needs principal_passport_number")
        return self


class ReturnAssistance(_Case):
    """MOC 6: help the smooth return of workers and their dependants."""

    case_type: ClassVar[str] = "return-assistance"
    schema_version: ClassVar[str] = "1"

    persons: Annotated[list[ReturnPerson], Field(min_length=1, max_length=1000)]
    reason: LongText
    expected_departure: date | None = None

    @model_validator(mode="after")
    def _dependants_of_ssw_ii(self) -> ReturnAssistance:
        principals = {p.passport_number: p for p in self.persons if p.relation == "worker"}
        for index, person in enumerate(self.persons):
            if person.relation == "worker":
                continue
            principal = principals.get(person.principal_passport_number or "")
            if principal is None:
                raise ValueError(
                    f"persons[{index}]: principal_passport_number names no worker in persons"
                )
            if principal.ssw_category != "ii":
                raise ValueError(
                    f"persons[{index}]: dependants accompany SSW (ii) holders only, "
                    "and the principal holds SSW (i)"
                )
        return self


# --- MOC 3: the written-consent protocol -----------------------------------------


Items = Annotated[list[BundleId], Field(min_length=1, max_length=1000)]


class ConsentRequest(_Case):
    """Receiver to originator: may these items go to this third party for this purpose?"""

    case_type: ClassVar[str] = "consent-request"
    schema_version: ClassVar[str] = "1"

    items: Items
    third_party: ShortText
    purpose: LongText
    requesting_officer: ShortText


class ConsentGrant(_Case):
    """The originator's written consent (MOC item 3)."""

    case_type: ClassVar[str] = "consent-grant"
    schema_version: ClassVar[str] = "1"

    consent_id: BundleId
    request_id: BundleId
    items: Items
    third_party: ShortText
    purpose: LongText
    valid_until: AwareDatetime
    max_uses: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    conditions: Annotated[list[LongText], Field(max_length=100)] = []
    granting_officer: ShortText


class ConsentDenial(_Case):
    """The originator refuses a consent request."""

    case_type: ClassVar[str] = "consent-denial"
    schema_version: ClassVar[str] = "1"

    request_id: BundleId
    items: Items
    third_party: ShortText
    reason: LongText
    denying_officer: ShortText


class ConsentRevocation(_Case):
    """The originator withdraws a consent it granted."""

    case_type: ClassVar[str] = "consent-revocation"
    schema_version: ClassVar[str] = "1"

    consent_id: BundleId
    reason: LongText
    revoking_officer: ShortText


class ConsentUseNotice(_Case):
    """The discloser's signed notice that it used a consent (SPEC §8a, docs/consent.md).

    Sent by the node itself after each disclosure made under a consent the
    originator granted: metadata only (ids, recipient, purpose, time, which
    use it was, and the disclosure's position in the discloser's ledger),
    never case content.
    """

    case_type: ClassVar[str] = "consent-use"
    schema_version: ClassVar[str] = "1"

    consent_id: BundleId
    disclosure_id: BundleId
    items: Items
    recipient: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    purpose: LongText
    used_at: AwareDatetime
    use_number: Annotated[int, Field(ge=1, le=1_000_000_000)]
    ledger_seq: Annotated[int, Field(ge=0, le=2**62)]
    ledger_entry_hash: Sha256Hex


class BundleRefusal(_Case):
    """A node's signed notice that it refused a bundle it had receipted (docs/protocol.md).

    Sent by the node itself, never by ``send``; the envelope's ``reply_to``
    names the refused bundle, as ``refused_bundle_id`` does. ``reason`` is a
    reason code; ``detail`` names the check in words (ids, never content).
    """

    case_type: ClassVar[str] = "bundle-refusal"
    schema_version: ClassVar[str] = "1"

    refused_bundle_id: BundleId
    envelope_sha256: Sha256Hex
    reason: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")]
    detail: Annotated[str, StringConstraints(min_length=1, max_length=500)]


Case = (
    BrokerMisconduct
    | ExamFraud
    | Consultation
    | AcceptanceSuspension
    | ReturnAssistance
    | InformationRequest
    | InformationReply
    | ConsentRequest
    | ConsentGrant
    | ConsentDenial
    | ConsentRevocation
    | ConsentUseNotice
    | BundleRefusal
)


@dataclass(frozen=True)
class CaseType:
    """One registered case type: its name, schema version, model and MOC item."""

    name: str
    version: str
    model: type[_Case]
    moc_item: str


CASE_TYPES: Mapping[str, CaseType] = {
    model.case_type: CaseType(model.case_type, model.schema_version, model, item)
    for model, item in (
        (BrokerMisconduct, "4(1)"),
        (ExamFraud, "5"),
        (Consultation, "4(2)"),
        (AcceptanceSuspension, "6"),
        (ReturnAssistance, "6"),
        (InformationRequest, "4(1)"),
        (InformationReply, "4(1)"),
        (ConsentRequest, "3"),
        (ConsentGrant, "3"),
        (ConsentDenial, "3"),
        (ConsentRevocation, "3"),
        (ConsentUseNotice, "3"),
        (BundleRefusal, "8"),
    )
}

PROTOCOL_TYPES: frozenset[str] = frozenset(
    {
        "consent-request",
        "consent-grant",
        "consent-denial",
        "consent-revocation",
        "consent-use",
        "bundle-refusal",
    }
)
"""Bundles with a protocol of their own: made by their own commands (which stamp the
acting officer and check the items) or by the node itself, never sent as cases."""

PROTOCOL_COMMANDS: Mapping[str, str] = {
    "consent-request": "gateway consent request BUNDLE_ID... --recipient NAME --purpose TEXT",
    "consent-grant": "gateway consent grant REQUEST_ID",
    "consent-denial": "gateway consent deny REQUEST_ID --reason TEXT",
    "consent-revocation": "gateway consent revoke CONSENT_ID --reason TEXT",
    "consent-use": "none: the node sends it itself after a disclosure under a consent",
    "bundle-refusal": "none: the node sends it itself when it refuses a bundle",
}
"""For each protocol type, the command that makes it (named in refusals of ``send``)."""


def case_type_for(name: str, version: str | None = None) -> CaseType:
    """The registered type ``name``; with ``version``, refuse any other version."""
    entry = CASE_TYPES.get(name)
    if entry is None:
        raise InvalidCase(
            f"unknown case type {name!r} (known: {', '.join(sorted(CASE_TYPES))})", field="type"
        )
    if version is not None and version != entry.version:
        raise InvalidCase(
            f"{name}: schema version {version!r} is not supported (this node has {entry.version!r})",
            field="schema_version",
        )
    return entry


_SAFE_MESSAGE = re.compile(r"[^\x20-\x7e]")


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS:
            continue  # pydantic adds the discriminator's value; it is not a field
        else:
            path += f".{part}" if path else part
    return path


def _reason(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def validate_case(
    case_type: str,
    data: Any,
    *,
    version: str | None = None,
    max_bytes: int = DEFAULT_MAX_CASE_BYTES,
    encoded: bytes | None = None,
) -> Case:
    """Validate JSON-shaped ``data`` as a case of ``case_type``.

    ``max_bytes`` bounds the canonical (RFC 8785) encoding of ``data``.
    ``encoded`` is that encoding when the caller already holds it (a slice of
    text :func:`~gateway.core.canonical.parse_canonical` accepted); it is then
    not written a second time, and must be exactly ``canonical_bytes(data)``.

    Raises :class:`InvalidCase` naming the first bad field (``a.b[0].c: reason``)
    and, in ``errors``, every problem found. Values echoed back are never put into
    the message (case data is confidential); only paths and reasons are.
    """
    entry = case_type_for(case_type, version)
    if not isinstance(data, dict):
        raise InvalidCase(f"{case_type}: case data must be a JSON object", field="")
    if encoded is None:
        encoded = canonical_bytes(data)
    if len(encoded) > max_bytes:
        raise InvalidCase(
            f"{case_type}: case data of {len(encoded)} bytes exceeds the limit of {max_bytes}",
            field="",
        )
    try:
        model = entry.model.model_validate_json(encoded)
    except ValidationError as exc:
        problems = [
            (_field_path(tuple(err["loc"])), _SAFE_MESSAGE.sub("?", _reason(err)))
            for err in exc.errors(include_input=False, include_url=False)
        ]
        first_path, first_reason = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        where = first_path or "(case)"
        raise InvalidCase(
            f"{case_type}: {where}: {first_reason}{more}", field=first_path, errors=problems
        ) from None
    return model  # type: ignore[return-value]


REPLY_TARGETS: Mapping[str, str] = {"information-reply": "information-request"}
"""Case types that answer another bundle -> the type of the bundle they answer."""


def resolve_reply_to(case_type: str, case: Case, reply_to: str | None) -> str | None:
    """The one ``reply_to`` an envelope of this case carries, or :class:`InvalidCase`.

    A type in :data:`REPLY_TARGETS` names what it answers inside the case
    (``request_bundle_id``); that is the source of truth. ``reply_to`` may
    be left out (it is then taken from the case) or repeat it; a different
    value is refused, never silently preferred. Other types carry
    ``reply_to`` as given. Whether the bundle answered exists is for the
    caller to check against what it received.
    """
    if case_type not in REPLY_TARGETS:
        return reply_to
    named = str(getattr(case, "request_bundle_id", "") or "")
    if not named:
        raise InvalidCase(
            f"{case_type}: request_bundle_id: field required", field="request_bundle_id"
        )
    if reply_to is not None and reply_to != named:
        raise InvalidCase(
            f"{case_type}: --reply-to {reply_to} contradicts request_bundle_id {named} in the "
            "case; leave --reply-to out (the case's id is used) or give the same id",
            field="request_bundle_id",
        )
    return named
