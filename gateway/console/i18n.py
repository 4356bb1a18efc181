"""The console's languages: gettext catalogues (Babel), compiled in process.

English is the source language (the message ids). Each other language is a
``locale/<code>/LC_MESSAGES/console.po`` file shipped as package data and
compiled to a catalogue when the console starts: adding a language (Urdu,
``ur``) is adding its ``.po`` file, no code. A ``.po`` that does not parse
fails the start, naming the file.

Times are shown in UTC and in the viewer's chosen zone (:data:`ZONES`).
"""

from __future__ import annotations

import gettext
import io
from datetime import datetime
from functools import lru_cache
from importlib import resources
from zoneinfo import ZoneInfo

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from gateway.errors import ConfigError

__all__ = [
    "DOMAIN",
    "ZONES",
    "catalogues",
    "format_when",
    "languages",
    "pick_language",
    "translations",
]

DOMAIN = "console"
ZONES = ("UTC", "Asia/Tokyo", "Asia/Karachi")
"""Zones a viewer may choose; times are always also shown in UTC."""

_NAMES = {"en": "English", "ja": "日本語", "ur": "اردو"}


@lru_cache(maxsize=1)
def catalogues() -> dict[str, gettext.NullTranslations]:
    """Language code -> translations, English first."""
    found: dict[str, gettext.NullTranslations] = {"en": gettext.NullTranslations()}
    root = resources.files("gateway.console") / "locale"
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        po = folder / "LC_MESSAGES" / f"{DOMAIN}.po"
        if not po.is_file():
            continue
        try:
            with po.open("rb") as stream:
                catalog = read_po(stream, locale=folder.name)
            compiled = io.BytesIO()
            write_mo(compiled, catalog)
            compiled.seek(0)
            found[folder.name] = gettext.GNUTranslations(compiled)
        except Exception as exc:
            raise ConfigError(f"console catalogue {folder.name}/{DOMAIN}.po: {exc}") from exc
    return found


def languages() -> list[tuple[str, str]]:
    """(code, name in that language) of every language the console speaks."""
    return [(code, _NAMES.get(code, code)) for code in catalogues()]


def translations(lang: str) -> gettext.NullTranslations:
    """The catalogue of ``lang``; English for an unknown code."""
    return catalogues().get(lang) or catalogues()["en"]


def pick_language(header: str | None) -> str:
    """The first language of an ``Accept-Language`` header the console speaks."""
    known = catalogues()
    for part in (header or "").split(",")[:20]:
        code = part.split(";")[0].strip().lower()[:2]
        if code in known:
            return code
    return "en"


def format_when(value: datetime | None, zone: str) -> str:
    """``2026-11-25 21:20:09 UTC`` and, for another zone, `` / 2026-11-26 06:20:09 JST``."""
    if value is None:
        return "-"
    utc = value.astimezone(ZoneInfo("UTC"))
    text = utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    if zone != "UTC" and zone in ZONES:
        local = value.astimezone(ZoneInfo(zone))
        text += f" / {local.strftime('%Y-%m-%d %H:%M:%S')} {local.tzname()}"
    return text
