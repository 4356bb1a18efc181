"""Attachment names are data, never paths.

An attachment's name comes from the sender (and, through it, from whoever made
the file): it may hold ``..``, separators, NUL, control or bidirectional
characters, a Windows device name or thousands of characters. Inside the
gateway an attachment is stored by content hash; its name is only used when
an officer writes it out (``show --out``, ``disclose --out``), and then only
after :func:`sanitise_attachment_name` made it a single, harmless path
component. The shell (:func:`gateway.node.bundles.safe_output_path`) joins it
to the output folder and checks once more that it stays inside.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_NAME_BYTES", "sanitise_attachment_name"]

MAX_NAME_BYTES = 200
"""Below every common file system's limit of 255 bytes, leaving room for a
``-1``-style suffix when names collide."""

_FALLBACK = "attachment"
# Separators, characters Windows forbids, and slashes that only look like one.
_REPLACED = re.compile(r'[/\\:<>"|?*\u2044\u2215\u29f8\u29f9]')
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{n}" for n in "123456789¹²³"}
    | {f"LPT{n}" for n in "123456789¹²³"}
)


def _visible(char: str) -> bool:
    # Cc: controls (NUL, newline, escape); Cf: format (bidi overrides, zero
    # width); Cs: lone surrogates; Co/Cn: private or unassigned; Zl/Zp: line breaks.
    return unicodedata.category(char) not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _truncate(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or len(suffix.encode("utf-8")) > 16:
        stem, suffix = name, ""
    keep = MAX_NAME_BYTES - (len(suffix.encode("utf-8")) + 1 if suffix else 0)
    cut = stem.encode("utf-8")[:keep].decode("utf-8", errors="ignore")
    return f"{cut}.{suffix}" if suffix else cut


def sanitise_attachment_name(name: str) -> str:
    """A single safe file name component for ``name``; never empty, never a path.

    Steps: Unicode NFKC (so the fullwidth solidus U+FF0F and full stop U+FF0E become the characters they
    look like, and are then caught); invisible and control characters removed;
    separators and characters Windows forbids replaced by ``_``; whitespace
    runs made one space; leading and trailing dots and spaces removed (no
    ``.``, ``..``, hidden files or Windows trailing-dot tricks); Windows device
    names (``CON``, ``com1.txt``) prefixed with ``_``; length bounded to
    :data:`MAX_NAME_BYTES` UTF-8 bytes keeping a short extension.
    """
    text = unicodedata.normalize("NFKC", name)
    text = "".join(char for char in text if _visible(char))
    text = _REPLACED.sub("_", text)
    text = re.sub(r"\s+", " ", text)
    text = text.strip(" .")
    if not text:
        text = _FALLBACK
    base = text.split(".", 1)[0].rstrip(" ").upper()
    if base in _WINDOWS_DEVICES:
        text = "_" + text
    return _truncate(text).strip(" .") or _FALLBACK
