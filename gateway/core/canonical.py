"""Canonical JSON (RFC 8785, JCS) and bounded JSON parsing.

What is signed is always the canonical bytes; those bytes are kept and
verified as they are, never re-serialised. Every parse of untrusted JSON is
bounded in size and nesting depth before ``json`` sees it, and every value it
returns is one the gateway can hold and canonicalise: numbers stay within
I-JSON's range (RFC 7493 §2.2, the range RFC 8785 signs), so a hostile
document is refused as "not valid JSON" instead of raising deep inside the
standard library (CPython's limit on integer digits, floats that overflow to
infinity).
"""

from __future__ import annotations

import json
import math
from typing import Any

import rfc8785

from gateway.errors import InvalidInput

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "canonical_bytes",
    "parse_bounded_json",
    "parse_canonical",
]

DEFAULT_MAX_DEPTH = 32
MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer magnitude I-JSON (RFC 7493 §2.2) and RFC 8785 carry exactly."""
_MAX_NUMBER_CHARS = 400
"""Longer number literals are refused before conversion (no float needs more)."""


def canonical_bytes(value: Any) -> bytes:
    """The RFC 8785 canonical form of a JSON value (no floats with ambiguity, sorted keys)."""
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidInput(f"value cannot be canonicalised as JSON: {exc}") from None


def _depth_within(data: bytes, max_depth: int) -> bool:
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
            continue
        if byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidInput(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise InvalidInput(f"not valid JSON: constant {name} is not allowed")


def _integer(text: str) -> int:
    # Checked on the text first: int() of a long literal is slow, and CPython
    # refuses more than 4,300 digits with a ValueError of its own.
    if len(text.lstrip("-")) > len(str(MAX_SAFE_INTEGER)):
        raise InvalidInput("not valid JSON: number too large")
    value = int(text)
    if abs(value) > MAX_SAFE_INTEGER:
        raise InvalidInput("not valid JSON: number too large")
    return value


def _float(text: str) -> float:
    if len(text) > _MAX_NUMBER_CHARS:
        raise InvalidInput("not valid JSON: number too long")
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput("not valid JSON: number too large")
    return value


def parse_bounded_json(data: bytes, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse untrusted JSON bytes into plain Python values.

    Size (``max_bytes``) and nesting depth (``max_depth``) are checked before
    parsing. Refused, each with :class:`InvalidInput` and a one-line reason:
    invalid UTF-8 or JSON, duplicate object keys, the constants ``NaN`` and
    ``Infinity``, integers beyond ±(2**53 - 1) and floats that overflow
    (RFC 7493 §2.2: "number too large").
    """
    if len(data) > max_bytes:
        raise InvalidInput(f"JSON document of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not _depth_within(data, max_depth):
        raise InvalidInput(f"JSON nesting deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("JSON document is not valid UTF-8") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_int=_integer,
            parse_float=_float,
        )
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def parse_canonical(data: bytes, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse JSON that must already be in canonical form; anything else is refused."""
    value = parse_bounded_json(data, max_bytes=max_bytes, max_depth=max_depth)
    if canonical_bytes(value) != data:
        raise InvalidInput("JSON is not in canonical (RFC 8785) form")
    return value
