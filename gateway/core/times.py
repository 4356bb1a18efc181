"""The one RFC 3339 time parser and formatter of the gateway.

Pure: text in, timezone-aware UTC ``datetime`` out, or an error of the
project's tree. Two kinds of input, one grammar (RFC 3339 §5.6):

* **Wire times** (:func:`parse_utc`) are the fixed forms that signed
  documents and headers carry: always UTC with ``Z``, and one text per
  instant, so the precision is part of each format (:class:`Precision`).
  Each document names its own error family (``error=``), so a bad time in a
  manifest is a ``ManifestRejected`` and in a peer header a ``PeerAuthFailed``.
* **User times** (:func:`parse_user_time`) are what a person types on the
  command line or sends to the local API: a date (``2026-12-31``) or a time
  with a zone (``2026-12-31T09:00:00+09:00``). The value is shifted to UTC
  (and, for an end-of-day bound, moved to the next midnight); an instant that
  would fall outside what the gateway can hold is refused with the accepted
  range, never left to raise ``OverflowError``.

The accepted range is :data:`EARLIEST` to :data:`LATEST`: the whole of the
proleptic Gregorian calendar that Python and both databases represent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from enum import StrEnum
from typing import Final

from gateway.errors import GatewayError, InvalidInput

__all__ = [
    "EARLIEST",
    "LATEST",
    "RANGE_TEXT",
    "DateMeans",
    "Precision",
    "format_utc",
    "is_calendar_day",
    "parse_record_utc",
    "parse_stored_utc",
    "parse_user_time",
    "parse_utc",
    "record_utc_text",
    "stored_micro_text",
]

EARLIEST: Final = datetime(1, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
RANGE_TEXT: Final = "0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


class Precision(StrEnum):
    """How a wire format writes the fraction of a second."""

    SECONDS = "seconds"
    """``2026-01-31T12:00:00Z``: whole seconds, no fraction."""
    MICROSECONDS = "microseconds"
    """``2026-01-31T12:00:00.000000Z``: always six fractional digits."""
    OPTIONAL_MICROSECONDS = "optional-microseconds"
    """No fraction when the microseconds are zero, else exactly six digits."""


class DateMeans(StrEnum):
    """Which instant a bare date given by a user stands for."""

    START = "start"
    """Midnight UTC at the start of the day (a lower bound: ``--since``)."""
    END = "end"
    """Midnight UTC at the end of the day (a bound valid through that day)."""


_DATE = r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
_CLOCK = r"(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})"
_WIRE: Final = {
    Precision.SECONDS: re.compile(_DATE + "T" + _CLOCK + "Z", re.ASCII),
    Precision.MICROSECONDS: re.compile(_DATE + "T" + _CLOCK + r"\.(?P<f>\d{6})Z", re.ASCII),
    Precision.OPTIONAL_MICROSECONDS: re.compile(
        _DATE + "T" + _CLOCK + r"(?:\.(?P<f>\d{6}))?Z", re.ASCII
    ),
}
_WIRE_EXAMPLE: Final = {
    Precision.SECONDS: "2026-01-31T12:00:00Z",
    Precision.MICROSECONDS: "2026-01-31T12:00:00.000000Z",
    Precision.OPTIONAL_MICROSECONDS: "2026-01-31T12:00:00Z",
}
_USER: Final = re.compile(
    _DATE
    + r"(?:[Tt ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,6}))?)?"
    + r"(?:(?P<z>[Zz])|(?P<sign>[+-])(?P<oh>\d{2}):(?P<om>\d{2}))?)?",
    re.ASCII,  # \d would match any script's digits: one spelling per instant
)
_MAX_USER_CHARS: Final = 64


def format_utc(moment: datetime, precision: Precision) -> str:
    """The wire text of ``moment`` (timezone-aware) in UTC at ``precision``.

    Raises :class:`InvalidInput` for a naive ``datetime`` (a programming error:
    every time in the gateway carries its zone).
    """
    if moment.tzinfo is None:
        raise InvalidInput("times must be timezone-aware to be written: pass an aware UTC time")
    utc = moment.astimezone(UTC)
    # Not strftime: its %Y drops the leading zeros of years before 1000 on glibc.
    text = (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
    )
    if precision is Precision.MICROSECONDS or (
        precision is Precision.OPTIONAL_MICROSECONDS and utc.microsecond
    ):
        text += f".{utc.microsecond:06d}"
    return text + "Z"


def _fields(match: re.Match[str], zone: tzinfo) -> datetime:
    """The date and time of a matched text in ``zone``; ``ValueError`` if not a real one."""
    group = match.groupdict()
    fraction = group.get("f") or ""
    return datetime(
        int(group["y"]),
        int(group["mo"]),
        int(group["d"]),
        int(group.get("h") or 0),
        int(group.get("mi") or 0),
        int(group.get("s") or 0),
        int(fraction.ljust(6, "0")) if fraction else 0,
        tzinfo=zone,
    )


def parse_utc(
    text: object,
    *,
    field: str,
    precision: Precision,
    error: Callable[[str], GatewayError] = InvalidInput,
) -> datetime:
    """Parse a wire time written by :func:`format_utc` at ``precision``.

    ``field`` names the value in the message; ``error`` builds the exception
    (default :class:`InvalidInput`) so each document keeps its own family.
    Anything but the exact form (another zone, another precision, a leap
    second, a day that does not exist) is refused.
    """
    if not isinstance(text, str) or len(text) > 40:
        raise error(f"{field} must be a time like {_WIRE_EXAMPLE[precision]}")
    match = _WIRE[precision].fullmatch(text)
    if match is None:
        raise error(f"{field} must be a time like {_WIRE_EXAMPLE[precision]}")
    try:
        return _fields(match, UTC)
    except ValueError:
        raise error(f"{field} is not a real date and time") from None


def parse_user_time(
    text: str,
    *,
    option: str,
    dates: DateMeans,
    zone_required: bool = True,
) -> datetime:
    """Parse a time typed by a user; the UTC instant it stands for.

    Accepts a date ``YYYY-MM-DD`` (the instant ``dates`` says) or an RFC 3339
    time ``YYYY-MM-DDTHH:MM[:SS[.ffffff]]`` with ``Z`` or ``±HH:MM`` (``T`` may
    be a space). Without a zone the time is refused, or read as UTC when
    ``zone_required`` is false. ``option`` names the value as the user gave it
    (``--valid-until``, ``since``) and starts every message.

    Raises :class:`InvalidInput` when the text has another form, names a day
    or time that does not exist, or when the instant (after the zone shift and
    the end-of-day step) falls outside :data:`RANGE_TEXT`.
    """
    shown = text if len(text) <= _MAX_USER_CHARS else text[:_MAX_USER_CHARS] + "..."
    match = _USER.fullmatch(text) if len(text) <= _MAX_USER_CHARS else None
    if match is None:
        with_zone = "with a zone " if zone_required else ""
        raise InvalidInput(
            f"{option} {shown!r} is neither a date (2026-12-31) nor a time {with_zone}"
            "(2026-12-31T09:00:00Z, 2026-12-31T18:00:00+09:00)"
        )
    zone: tzinfo = UTC
    try:
        if match.group("sign"):
            hours, minutes = int(match.group("oh")), int(match.group("om"))
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            sign = -1 if match.group("sign") == "-" else 1
            zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
        moment = _fields(match, zone)
    except ValueError:
        raise InvalidInput(f"{option} {shown!r} is not a real date and time") from None
    bare_end_date = dates is DateMeans.END and match.group("h") is None
    out_of_range = InvalidInput(
        f"{option} {shown!r} lies outside the accepted range of times, {RANGE_TEXT}"
        + (" (the last whole day is 9999-12-30)" if bare_end_date else "")
    )
    if match.group("h") is None:  # a bare date: midnight UTC
        try:
            return moment + timedelta(days=1) if dates is DateMeans.END else moment
        except OverflowError:
            raise out_of_range from None
    if zone_required and match.group("sign") is None and match.group("z") is None:
        raise InvalidInput(
            f"{option} {shown!r} has no zone: add Z for UTC or an offset like +09:00"
        )
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise out_of_range from None


_CALENDAR_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def is_calendar_day(text: str) -> bool:
    """Whether ``text`` is ``YYYY-MM-DD`` (ASCII digits) naming a real calendar day.

    The date half of what :func:`stored_micro_text` accepts, for callers that
    check many stored times of the same few days and keep the answer per day.
    """
    if not _CALENDAR_DAY.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def stored_micro_text(text: str) -> str | None:
    """The wire text (microseconds, ``Z``) of a stored UTC time, or ``None``.

    ``text`` is a time as a database keeps it without a zone (SQLite's form,
    ``YYYY-MM-DD HH:MM:SS.ffffff``, UTC). The answer is the text
    :func:`format_utc` writes at :attr:`Precision.MICROSECONDS` for the same
    instant; ``None`` when ``text`` is not exactly that form or not a real
    instant. Cheap: ledger verification calls it once per entry.
    """
    if (
        len(text) == 26
        and text.isascii()
        and text[4] == text[7] == "-"
        and text[10] == " "
        and text[13] == text[16] == ":"
        and text[19] == "."
    ):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
        if moment.tzinfo is None:
            return f"{text[:10]}T{text[11:]}Z"
    return None


def parse_stored_utc(text: str) -> datetime | None:
    """A time as a database driver gave it in text (ISO 8601, UTC without a zone), or ``None``.

    Lenient on purpose: it reads what a row holds so that verification can
    compare it with the hashed entry and name the column that differs.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


_RECORD_SUFFIX: Final = "+00:00"
_RECORD_CHARS: Final = len("2026-11-25T00:00:00.000000+00:00")


def record_utc_text(moment: datetime) -> str:
    """``moment`` (timezone-aware) as a compact record of this node keeps it.

    ISO 8601 in UTC, always with microseconds and ``+00:00``: one fixed
    length, read back by :func:`parse_record_utc` with the C parser of
    :meth:`datetime.fromisoformat` (a hot read path, not a wire format).
    """
    if moment.tzinfo is None:
        raise InvalidInput("times must be timezone-aware to be written: pass an aware UTC time")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_record_utc(value: object) -> datetime | None:
    """A time written by :func:`record_utc_text`, or ``None`` for anything else."""
    if (
        type(value) is not str
        or len(value) != _RECORD_CHARS
        or not value.endswith(_RECORD_SUFFIX)
        or not value.isascii()
    ):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
