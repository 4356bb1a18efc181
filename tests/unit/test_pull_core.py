"""Pull mode's pure part: the answer framing and the pairing rule of the two settings."""

from __future__ import annotations

import pytest

from gateway.core.pull import (
    ItemKind,
    Modes,
    item_preface,
    mode_mismatch,
    parse_item_preface,
    parse_preface,
    preface,
)
from gateway.errors import InvalidInput

PUSH = Modes("push", "push")
PULL = Modes("pull", "push")
HOLD = Modes("push", "hold")


@pytest.mark.parametrize(
    ("ours", "theirs", "works"),
    [
        (PUSH, PUSH, True),
        (PULL, HOLD, True),
        (HOLD, PULL, True),
        (PULL, PULL, False),
        (PULL, PUSH, False),
        (PUSH, PULL, False),
        (HOLD, PUSH, False),
        (PUSH, HOLD, False),
        (HOLD, HOLD, False),
    ],
)
def test_the_pairing_rule_holds_on_both_sides(ours: Modes, theirs: Modes, works: bool) -> None:
    mine = mode_mismatch(ours, theirs, us="pk", peer="jp")
    other = mode_mismatch(theirs, ours, us="jp", peer="pk")
    assert (mine is None) is works
    assert (other is None) is works  # both sides reach the same verdict


@pytest.mark.parametrize(
    ("ours", "theirs", "named"),
    [
        (PULL, PULL, 'peer_mode = "push" and peer_delivery = "hold"'),
        (PULL, PUSH, 'set peer_delivery = "hold" on jp'),
        (PUSH, HOLD, 'set peer_mode = "pull" on pk'),
        (HOLD, PUSH, 'set peer_mode = "pull" on jp'),
        (PUSH, PULL, 'set peer_delivery = "hold" on pk'),
    ],
)
def test_a_mismatch_names_the_setting_to_change(ours: Modes, theirs: Modes, named: str) -> None:
    problem = mode_mismatch(ours, theirs, us="pk", peer="jp")
    assert problem is not None
    assert named in problem


def test_modes_from_an_answer_default_to_push_and_refuse_junk() -> None:
    assert Modes.from_answer({}) == PUSH
    assert Modes.from_answer({"peer_mode": "pull"}) == PULL
    assert Modes.from_answer({"peer_mode": "sideways"}) is None
    assert Modes.from_answer("pull") is None


def test_framing_round_trips_and_bounds_come_before_reading() -> None:
    assert parse_preface(preface(3), max_items=3) == 3
    with pytest.raises(InvalidInput, match="exceeds the 2 asked for"):
        parse_preface(preface(3), max_items=2)
    with pytest.raises(InvalidInput, match="SGP1"):
        parse_preface(b"SGB1\x00\x00\x00\x01", max_items=9)
    assert parse_item_preface(item_preface(ItemKind.ENVELOPE, 10), max_length=10) == (
        ItemKind.ENVELOPE,
        10,
    )
    with pytest.raises(InvalidInput, match="exceeds 9"):
        parse_item_preface(item_preface(ItemKind.ENVELOPE, 10), max_length=9)
    with pytest.raises(InvalidInput, match="unknown kind"):
        parse_item_preface(b"\x07" + b"\x00" * 7 + b"\x01", max_length=9)
    with pytest.raises(InvalidInput, match="empty"):
        parse_item_preface(item_preface(ItemKind.MANIFEST, 0), max_length=9)
    with pytest.raises(InvalidInput, match="inside an item preface"):
        parse_item_preface(b"\x01\x00", max_length=9)


def test_settings_refuse_a_puller_that_holds_or_has_no_host() -> None:
    from pydantic import ValidationError  # noqa: PLC0415

    from gateway.settings import ServerSettings  # noqa: PLC0415

    with pytest.raises(ValidationError, match='peer_delivery = "push"'):
        ServerSettings(peer_mode="pull", peer_delivery="hold", peer_url="http://127.0.0.1:1")
    with pytest.raises(ValidationError, match="needs peer_url"):
        ServerSettings(peer_mode="pull")
    assert ServerSettings(peer_mode="pull", peer_url="http://127.0.0.1:1").peer_delivery == "push"
    assert ServerSettings(peer_delivery="hold").peer_mode == "push"
