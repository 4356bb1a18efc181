"""The framing of decrypted files streamed from the node to a user command.

``GET /api/v1/bundles/{id}/content`` and ``POST /api/v1/disclosures/stream``
answer ``application/x-tar``: a POSIX tar stream of regular files only, whose
names are the safe relative names the node writes today (``<bundle id>.json``
and sanitised attachment names for ``show``; ``<bundle id>/case.json``,
``<bundle id>/attachments/<name>`` and ``disclosure.json`` for ``disclose``), then
one last member :data:`END_MEMBER` holding JSON ``{"files": {name:
{"sha256": hex, "size": bytes}}}`` for every file before it. The answer is
complete only when that member arrived, every file matched it, and the HTTP
body ended properly; otherwise the client keeps nothing.

Standard library only: both the node and the client import it.
"""

from __future__ import annotations

__all__ = [
    "CONTENT_TYPE",
    "END_MEMBER",
    "MAX_END_MEMBER_BYTES",
    "MAX_MEMBERS",
    "TOTAL_BYTES_HEADER",
    "check_member_name",
]

CONTENT_TYPE = "application/x-tar"
END_MEMBER = ".ssw-stream-end.json"
"""Name of the closing member that lists every file's SHA-256 and size."""
TOTAL_BYTES_HEADER = "X-Content-Bytes"
"""Header announcing the total size of the files (for a progress bar only)."""
MAX_MEMBERS = 20_000
"""Most files one stream may carry."""
MAX_END_MEMBER_BYTES = 8 * 1024 * 1024
_MAX_COMPONENT_BYTES = 255
_MAX_DEPTH = 3


def check_member_name(name: str) -> tuple[str, ...]:
    """The path components of a member name, or :class:`ValueError` naming the fault.

    A name is one to three plain components (no ``.``, ``..``, empty part,
    backslash, NUL, control character, leading dot), relative, each at most
    255 bytes.
    """
    parts = tuple(name.split("/"))
    if not 0 < len(parts) <= _MAX_DEPTH:
        raise ValueError(f"member name {name!r} has more than {_MAX_DEPTH} components")
    for part in parts:
        if (
            not part
            or part in (".", "..")
            or part.startswith(".")
            or "\\" in part
            or any(ord(c) < 0x20 or c == "\x7f" for c in part)
            or len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES
        ):
            raise ValueError(f"member name {name!r} is not a plain relative file name")
    return parts
