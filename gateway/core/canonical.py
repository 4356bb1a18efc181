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

import itertools
import json
import math
import operator
import re
from typing import Any

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
    """The RFC 8785 canonical form of a JSON value, as UTF-8 bytes.

    ``value`` is built of ``dict`` (string keys), ``list``/``tuple``, ``str``,
    ``int`` within ±(2**53 - 1), finite ``float``, ``bool`` and ``None``.
    Raises :class:`InvalidInput` for anything else (other key types, integers
    beyond I-JSON's range, NaN and infinities, strings holding lone surrogates).

    Documents whose canonical form provably equals ``orjson``'s output (see
    :func:`_fast_canonical`) are written by it; all others go
    through the ``rfc8785`` reference implementation. Both give the same bytes;
    ``tests/unit/test_canonical.py`` checks it over generated documents.
    """
    fast = _fast_canonical(value)
    if fast is not None:
        return fast
    import rfc8785  # noqa: PLC0415 - the reference path is rare; a reader of JSON never needs it

    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidInput(f"value cannot be canonicalised as JSON: {exc}") from None


_FAST_MAX_DEPTH = 200
"""Deeper (or cyclic) values leave the fast path; the reference path decides."""
_SORTED = 1 << 5
"""``orjson.OPT_SORT_KEYS``, written out: ``orjson`` (which loads ``uuid``,
``dataclasses`` and more) is imported by the first canonical write or parse,
not by a client command that only reads a case file (docs/performance.md)."""
_ASTRAL_LEADS = (b"\xf0", b"\xf1", b"\xf2", b"\xf3", b"\xf4")
"""UTF-8 lead bytes of the characters beyond the BMP (U+10000..U+10FFFF)."""
_HIGH_BMP_LEADS = (b"\xee", b"\xef")
"""UTF-8 lead bytes of U+E000..U+FFFF (continuation bytes are 0x80..0xBF)."""


def _fast_safe(value: Any) -> bool:
    """True when ``value`` holds only exact ``dict`` (``str`` keys), ``list``,
    ``tuple``, ``str``, ``bool``, ``None`` and ``int`` within ±(2**53 - 1).

    No floats: RFC 8785 writes numbers as ECMAScript does, which ``repr`` does
    not (``1e+21`` against ``1e21``, ``1.0`` against ``1``). Walks level by
    level, so a cyclic or very deep value is handed to the reference path.
    """
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > _FAST_MAX_DEPTH:
            return False
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int:
                if -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    continue
                return False
            if kind is dict:
                for key in item:
                    if type(key) is not str:
                        return False
                below.extend(item.values())
            elif kind is list or kind is tuple:
                below.extend(item)
            else:
                return False
        level = below
    return True


def _order_safe(data: bytes) -> bool:
    """Whether sorting keys by code point equals RFC 8785's order, for UTF-8 ``data``.

    RFC 8785 §3.2.3 sorts by UTF-16 code units. The two orders differ only
    where one key has a character beyond the BMP (a surrogate pair, 0xD800..
    0xDBFF first) and another a character in U+E000..U+FFFF at the same place;
    a text holding no character of one of the two kinds cannot reorder.
    """
    if data.isascii():
        return True
    astral = any(lead in data for lead in _ASTRAL_LEADS)
    return not astral or not any(lead in data for lead in _HIGH_BMP_LEADS)


def _fast_canonical(value: Any) -> bytes | None:
    r"""The canonical bytes written by ``orjson``, or None where they may differ.

    ``orjson`` writes compact JSON, keys sorted by code point, strings as
    UTF-8 escaping ``"``, ``\``, ``\b \t \n \f \r`` by name and other controls
    below U+0020 as ``\u00xx`` in lower-case hex, as RFC 8785 §3.2.2.2 does.
    Numbers and key order are made safe by :func:`_fast_safe` and
    :func:`_order_safe`. Lone surrogates cannot be encoded; the reference path
    refuses them with its own message.
    """
    if not _fast_safe(value):
        return None
    import orjson  # noqa: PLC0415 - see _SORTED

    try:
        data = orjson.dumps(value, option=_SORTED)
    except (TypeError, orjson.JSONEncodeError):
        return None
    return data if _order_safe(data) else None


_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
"""A JSON string, or an unterminated one up to the end (its brackets are text)."""
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _depth_within(data: bytes, max_depth: int) -> bool:
    """Whether no prefix of ``data`` opens more than ``max_depth`` arrays and objects.

    Strings are cut out by one regular expression and every other byte but the
    four brackets dropped by ``bytes.translate``; the running depth of what
    remains is summed by ``itertools.accumulate`` (opening adds 2, closing 0,
    and the position is subtracted). No Python loop runs per byte.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return True
    brackets = _STRING_RE.sub(b"", data).translate(_DEPTH_STEP, _NOT_BRACKETS)
    if len(brackets) <= max_depth:
        return True
    deepest: int = max(map(operator.sub, itertools.accumulate(brackets), itertools.count(1)))
    return deepest <= max_depth


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


_NOT_SHOWN: Any = object()


def _parse_canonical_fast(data: bytes, max_bytes: int, max_depth: int) -> Any:
    """The value of canonical ``data`` parsed by ``orjson`` alone, or ``_NOT_SHOWN``.

    ``_NOT_SHOWN`` sends the caller to the full parse, which gives every
    refusal its own reason. Here nothing is refused but sizes and depth: the
    value must be plain (:func:`_fast_safe`: no floats, integers within
    I-JSON's range) and ``data`` byte for byte what ``orjson`` writes for it,
    which also rules out duplicate keys (each key is written once), escapes
    RFC 8785 does not use, and every other spelling.
    """
    if len(data) > max_bytes:
        raise InvalidInput(f"JSON document of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not _depth_within(data, max_depth):
        raise InvalidInput(f"JSON nesting deeper than {max_depth} levels")
    import orjson  # noqa: PLC0415 - see _SORTED

    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _NOT_SHOWN
    if not _fast_safe(value) or not _order_safe(data):
        return _NOT_SHOWN
    if orjson.dumps(value, option=_SORTED) != data:
        return _NOT_SHOWN
    return value


def parse_canonical(data: bytes, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse JSON that must already be in canonical (RFC 8785) form.

    Refused with :class:`InvalidInput`: all that :func:`parse_bounded_json`
    refuses, and any text that is not byte for byte the canonical form of what
    it parses to. Plain documents are parsed and re-written by ``orjson`` (see
    :func:`_parse_canonical_fast`); the others, and every refusal, go through
    the bounded parser and :func:`canonical_bytes`.
    """
    fast = _parse_canonical_fast(data, max_bytes, max_depth)
    if fast is not _NOT_SHOWN:
        return fast
    value = parse_bounded_json(data, max_bytes=max_bytes, max_depth=max_depth)
    if canonical_bytes(value) != data:
        raise InvalidInput("JSON is not in canonical (RFC 8785) form")
    return value
