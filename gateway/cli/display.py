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
    "proposer_note",
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


def proposer_note(answer: dict[str, Any]) -> str:
    """The line a proposal's answer adds when the proposer's own approval was not
    counted (``proposer_approval``: a token an administrator issued); else ``""``."""
    note = answer.get("proposer_approval")
    return f"\nyour own approval was {note}" if isinstance(note, str) else ""
