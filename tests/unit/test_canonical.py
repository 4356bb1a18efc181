"""Canonical JSON: the ``orjson`` fast path against the RFC 8785 reference.

``canonical_bytes`` writes most documents with ``orjson`` and the rest with
the ``rfc8785`` package; ``parse_canonical`` checks
canonical form the same way. These tests generate documents across the whole
of Unicode (astral characters, U+E000..U+FFFF, controls), integers around
2**53, floats, nesting and empty containers, and require the same bytes, or
the same refusal, as the reference. The depth check is compared with the
byte-by-byte scanner it replaced.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import rfc8785
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core import canonical
from gateway.core.canonical import MAX_SAFE_INTEGER, canonical_bytes, parse_canonical
from gateway.errors import InvalidInput

DIFFERENTIAL = settings(
    max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Characters whose handling differs between encoders if anything does: controls,
# the escapes, DEL, line separators, the top of the BMP (sorts differently from
# astral characters in UTF-16), and astral characters themselves.
_CONTROLS = [chr(code) for code in range(0x20)]
_OTHERS = ['"', "\\", "/", "\x7f", "\u2028", "\u2029", "\ue000", "\uffef", "\uffff", "\ud7ff"]
_ASTRAL = ["\U00010000", "\U0001f600", "\U0010ffff", "é", "a", "Z", "0"]
_TRICKY = st.sampled_from(_CONTROLS + _OTHERS + _ASTRAL)
characters = st.one_of(_TRICKY, st.characters(exclude_categories=("Cs",)))
texts = st.text(characters, max_size=12)
near_limit = st.sampled_from(
    [MAX_SAFE_INTEGER, MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER - 1, 0, -1]
)
integers = st.one_of(
    near_limit,
    st.integers(min_value=-MAX_SAFE_INTEGER - 3, max_value=MAX_SAFE_INTEGER + 3),
    st.integers(min_value=MAX_SAFE_INTEGER - 3, max_value=MAX_SAFE_INTEGER + 3),
    st.integers(),
)
floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, 1e21, 1e-7, 5e-324, 1.7976931348623157e308, 123.456]),
)
scalars = st.one_of(st.none(), st.booleans(), integers, floats, texts)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(texts, inner, max_size=5),
    ),
    max_leaves=30,
)
plain_documents = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER),
        texts,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(texts, inner, max_size=5)),
    max_leaves=30,
)


def reference(value: Any) -> bytes | None:
    """The reference canonical form, or None when the reference refuses the value."""
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        return None


def ours(value: Any) -> bytes | None:
    try:
        return canonical_bytes(value)
    except InvalidInput:
        return None


@DIFFERENTIAL
@given(value=documents)
@example(value={"\ue000": 1, "\U0001f600": 2})
@example(value={"a\U00010000": 0, "a\uffff": 0, "a": 0, "b": [{}, [], ""]})
@example(value={"n": MAX_SAFE_INTEGER + 1})
@example(value={"f": 1.0, "g": 1e21, "h": -0.0})
@example(value=[{"\x00\x1f\x7f": '\b\t\n\f\r"\\/'}])
def test_canonical_bytes_equals_the_reference(value: Any) -> None:
    assert ours(value) == reference(value)


@DIFFERENTIAL
@given(value=documents)
def test_canonical_text_is_accepted_and_parses_back(value: Any) -> None:
    expected = reference(value)
    if expected is None:
        return
    refusal = ""
    try:
        parsed = parse_canonical(expected, max_bytes=1 << 20, max_depth=64)
    except InvalidInput as exc:
        refusal = exc.message
    if refusal:
        # A float of 2**53 or more is written as an integer literal, which the
        # parser refuses beyond I-JSON's range (RFC 7493 §2.2); nothing else is.
        assert refusal == "not valid JSON: number too large"
    else:
        assert parsed == json.loads(expected)


@DIFFERENTIAL
@given(value=documents, indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_parse_canonical_agrees_with_the_reference_on_other_spellings(
    value: Any, indent: int | None, ascii_only: bool
) -> None:
    """Any other spelling of the same value (escapes, spacing, key order, float
    notation) is refused exactly when it differs from the reference's bytes."""
    try:
        text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
        data = text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return
    expected = reference(value)
    try:
        parse_canonical(data, max_bytes=1 << 20, max_depth=64)
        accepted = True
    except InvalidInput:
        accepted = False
    assert accepted == (expected is not None and data == expected)


@DIFFERENTIAL
@given(value=plain_documents)
def test_plain_documents_take_the_fast_path(value: Any) -> None:
    """Without floats or both kinds of order-sensitive character, ``orjson``
    writes the document (the fast path is really used, and is right)."""
    fast = canonical._fast_canonical(value)
    written = json.dumps(value, ensure_ascii=False).encode("utf-8")
    if canonical._order_safe(written):
        assert fast is not None
    if fast is not None:
        assert fast == reference(value)


def test_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+E000 sorts after U+1F600 by UTF-16 (0xE000 > 0xD83D), before it by code point.
    value = {"\ue000": 1, "\U0001f600": 2}
    assert canonical._fast_canonical(value) is None
    assert canonical_bytes(value) == '{"\U0001f600":2,"\ue000":1}'.encode()
    assert parse_canonical(canonical_bytes(value), max_bytes=100) == value
    with pytest.raises(InvalidInput, match="canonical"):
        parse_canonical('{"\ue000":1,"\U0001f600":2}'.encode(), max_bytes=100)


@pytest.mark.parametrize(
    "value",
    [
        {"s": "\ud800"},
        {"\udfff": 1},
        {1: "integer key"},
        {"n": MAX_SAFE_INTEGER + 1},
        {"n": float("nan")},
        {"n": float("inf")},
        {"x": {1, 2}},
        {"b": b"bytes"},
    ],
)
def test_values_without_a_canonical_form_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput, match="cannot be canonicalised"):
        canonical_bytes(value)


def test_a_cyclic_value_leaves_the_fast_path() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert canonical._fast_safe(loop) is False


@pytest.mark.parametrize(
    "data",
    [b'"\\ud800"', b'{"a":"\\u00e9"}', b'{"b":1,"a":2}', b"[1.0]", b"[-0]", b'{"a": 1}', b"1e2"],
)
def test_non_canonical_spellings_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="canonical"):
        parse_canonical(data, max_bytes=100)


def scan_depth(data: bytes, max_depth: int) -> bool:
    """The byte-by-byte depth scanner the regex and translate version replaced."""
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
            continue
        if byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


@DIFFERENTIAL
@given(
    data=st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b'\\"']))
    .map(b"".join)
    .filter(lambda data: len(data) < 400),
    max_depth=st.integers(0, 8),
)
@example(data=b'"[[[[' + b"[" * 9, max_depth=3)
@example(data=b'"\\"[[[[[" [[[', max_depth=3)
@example(data=b"]]]][[[[[[", max_depth=3)
@example(data=b"[[[\\", max_depth=3)
def test_depth_check_equals_the_byte_scanner(data: bytes, max_depth: int) -> None:
    assert canonical._depth_within(data, max_depth) == scan_depth(data, max_depth)


def test_deep_input_is_refused_before_the_parser_recurses() -> None:
    data = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(InvalidInput, match="nesting deeper than 32"):
        parse_canonical(data, max_bytes=1 << 20)
    text_of_brackets = b'["' + b"[" * 100_000 + b'"]'
    assert parse_canonical(text_of_brackets, max_bytes=1 << 20) == ["[" * 100_000]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"[9007199254740992]", "number too large"),
        (b"[123456789012345678901234]", "number too large"),
        (b'{"a":1,"a":1}', "duplicate JSON key"),
        (b"[NaN]", "constant NaN"),
        (b'["\xed\xa0\x80"]', "not valid UTF-8"),
    ],
)
def test_refusals_keep_their_reason_past_the_fast_parse(data: bytes, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        parse_canonical(data, max_bytes=100)


def test_plain_canonical_text_is_parsed_by_the_fast_path() -> None:
    data = canonical_bytes({"case": {"name": "Ayesha", "n": MAX_SAFE_INTEGER, "l": [True, None]}})
    assert canonical._parse_canonical_fast(data, 1000, 8) == json.loads(data)


def test_sorted_keys_option_is_orjsons() -> None:
    """The option number written out to keep ``orjson`` unimported until first use."""
    import orjson  # noqa: PLC0415

    from gateway.core import canonical  # noqa: PLC0415

    assert canonical._SORTED == orjson.OPT_SORT_KEYS
