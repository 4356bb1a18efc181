"""User names that read alike are caught by their skeleton (gateway.core.usernames)."""

from __future__ import annotations

import pytest

from gateway.core.usernames import confusable_with, name_skeleton

ALIKE = [
    ("bilal", "bi1al"),
    ("bilal", "biial"),
    ("asma", "a.sma"),
    ("asma", "as-ma"),
    ("moin", "rnoin"),
    ("waqar", "vvaqar"),
    ("david", "davicl"),
    ("sato", "sat0"),
    ("ss", "55"),
    ("root-admin", "rootadmin"),
    ("zara", "2ara"),
]
APART = [
    ("asma", "asmaa"),
    ("bilal", "bilel"),
    ("tanaka", "tanaki"),
    ("admin", "admin2"),
    ("jp-officer", "pk-officer"),
]


@pytest.mark.parametrize(("one", "other"), ALIKE)
def test_names_a_reader_can_confuse_share_a_skeleton(one: str, other: str) -> None:
    assert name_skeleton(one) == name_skeleton(other)
    assert confusable_with(other, ["tanaka", one]) == one


@pytest.mark.parametrize(("one", "other"), APART)
def test_names_that_differ_to_the_eye_do_not(one: str, other: str) -> None:
    assert name_skeleton(one) != name_skeleton(other)
    assert confusable_with(other, [one]) is None


def test_a_name_is_not_confusable_with_itself() -> None:
    assert confusable_with("asma", ["asma"]) is None
