"""Human text of answers shared by the user commands (standard library only).

The node answers JSON (times as RFC 3339 text); these helpers print them the
way the commands always have.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = [
    "HOST_OPERATION",
    "USER_COMMAND",
    "day",
    "manifest_text",
    "proposal_text",
    "when",
]

USER_COMMAND = "Runs through the node's local API; needs your token."
"""The line every user command's help carries (SPEC §8, who runs what)."""
HOST_OPERATION = "Host operation: needs the keystore passphrase."
"""The line every host operation's help carries."""


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        from gateway.core.times import Precision, parse_utc  # noqa: PLC0415
        from gateway.errors import InvalidInput  # noqa: PLC0415

        try:
            return parse_utc(value, field="time", precision=Precision.OPTIONAL_MICROSECONDS)
        except InvalidInput:
            return None
    return None


def when(value: Any) -> str:
    """A time as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds); ``-`` for none."""
    moment = _moment(value)
    if moment is None:
        return "-" if value is None else str(value)
    utc = moment.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}Z"
    )


def day(value: Any) -> str:
    """A time's UTC date as ``YYYY-MM-DD``."""
    moment = _moment(value)
    if moment is None:
        return str(value)
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"


def manifest_text(data: dict[str, Any], title: str) -> str:
    """The human form of a described manifest (see ``describe_manifest``)."""
    lines = [
        f"{title} of node {data['node']!r}, version {data['version']}",
        f"  root key:         {data['root_key_id']}",
        f"  root fingerprint: {data['root_fingerprint']}",
        f"  issued:           {when(data['issued_at'])}",
        f"  expires:          {when(data['expires_at'])}"
        + ("  (EXPIRED)" if data["expired"] else ""),
    ]
    if "keys_limit" in data:
        # Signing keys stay listed for good: each rotation uses one place (docs/keys.md).
        lines.append(f"  keys listed:      {len(data['keys'])} of at most {data['keys_limit']}")
    lines += [
        "",
        f"  {'KEY ID':<17} {'USE':<8} {'STATE':<14} {'VALID FROM':<21} VALID UNTIL",
    ]
    for key in data["keys"]:
        lines.append(
            f"  {key['key_id']:<17} {key['use']:<8} {key['state']:<14} "
            f"{when(key['not_before']):<21} {when(key['not_after'])}"
        )
        if key["revoked_at"] is not None:
            lines.append(
                f"  {'':<17} revoked {when(key['revoked_at'])}: {key['revocation_reason']}"
            )
    return "\n".join(lines)


_TERM_LABELS = (
    # (key, label) in the order an approver reads them; other keys follow by name
    ("request_id", "request"),
    ("consent_id", "consent"),
    ("items", "items"),
    ("third_party", "recipient"),
    ("purpose", "purpose"),
    ("valid_until", "valid until"),
    ("max_uses", "uses"),
    ("conditions", "conditions"),
    ("name", "new admin"),
    ("role", "role"),
    ("key_id", "key"),
    ("reason", "reason"),
    ("compromised_since", "compromised since"),
)


def _term(key: str, value: Any) -> str:
    if key == "max_uses":
        return "unlimited" if value is None else f"at most {value}"
    if key == "compromised_since":
        return "the revocation time" if value is None else when(value)
    if key == "valid_until":
        return when(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, str) and key in ("purpose", "conditions", "reason", "third_party"):
        return repr(value)
    return "-" if value is None else str(value)


def proposal_text(proposal: dict[str, Any], *, full: bool = False) -> str:
    """A proposal (``gateway approvals list|show``) as an approver reads it: action,
    state, proposer, every term by name, approvals so far (names) of k, expiry and
    the terms hash; ``full`` adds the creation time, the terms' nonce and who counts."""
    terms: dict[str, Any] = dict(proposal["terms"])
    nonce = terms.pop("nonce", None)
    keys = [key for key, _label in _TERM_LABELS if key in terms]
    keys += sorted(k for k in terms if k not in keys)
    labels = dict(_TERM_LABELS)
    width = max([len(labels.get(k, k)) for k in keys] + [len("terms sha256")])
    approvers = ", ".join(proposal["approvers"]) or "nobody"
    lines = [
        f"{proposal['proposal_id']}  {proposal['action']}  {proposal['state']}",
        f"  {'proposed by':<{width}}  {proposal['proposer']}"
        + (f" at {when(proposal['created_at'])}" if full else ""),
        f"  {'approvals':<{width}}  {proposal['approvals']} of {proposal['needed']} ({approvers})",
        f"  {'expires':<{width}}  {when(proposal['expires_at'])}",
    ]
    if full and list(proposal["counted"]) != list(proposal["approvers"]):
        counted = ", ".join(proposal["counted"]) or "nobody"
        lines.append(f"  {'counting now':<{width}}  {counted}")
    lines.append("  terms:")
    lines += [f"    {labels.get(k, k):<{width - 2}}  {_term(k, terms[k])}" for k in keys]
    if full and nonce is not None:
        lines.append(f"    {'nonce':<{width - 2}}  {nonce}")
    lines.append(f"  {'terms sha256':<{width}}  {proposal['terms_sha256']}")
    if proposal.get("reason") and proposal["state"] != "pending":
        lines.append(f"  {proposal['state']}: {proposal['reason']}")
    if proposal.get("warning"):
        lines.append(f"  warning: {proposal['warning']}")
    return "\n".join(lines)
