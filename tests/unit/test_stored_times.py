"""The checks ledger verification applies to stored time text agree with each other."""

from __future__ import annotations

import pytest

from gateway.core.times import is_calendar_day, stored_micro_text

DAYS = [
    "2026-11-30",
    "2024-02-29",
    "2026-02-29",  # not a leap year
    "2026-02-30",
    "2026-13-01",
    "2026-00-10",
    "2026-04-31",
    "0001-01-01",
    "9999-12-31",
    "0000-01-01",
    "2026-1-01",
    "2026/11/30",
    "2026-11-3x",
    "\uff12\uff10\uff12\uff16-11-30",  # full-width digits
    "2026-11-\u0663\u0660",  # Arabic-Indic digits
    "",
]


@pytest.mark.parametrize("day", DAYS)
def test_a_day_is_real_exactly_when_a_stored_time_on_it_is_accepted(day: str) -> None:
    assert is_calendar_day(day) == (stored_micro_text(f"{day} 12:34:56.000001") is not None)


def test_real_days_are_named_as_such() -> None:
    assert is_calendar_day("2024-02-29")
    assert not is_calendar_day("2026-02-29")
