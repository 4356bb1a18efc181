"""Attachment names from a peer are data: hostile ones never leave the output folder."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.filenames import MAX_NAME_BYTES, sanitise_attachment_name
from gateway.errors import InvalidInput
from gateway.node.bundles import safe_output_path

HOSTILE_NAMES = [
    ("../../etc/passwd", "_.._etc_passwd"),
    ("..", "attachment"),
    (".", "attachment"),
    ("", "attachment"),
    ("/etc/shadow", "_etc_shadow"),
    ("C:\\Windows\\system32\\cmd.exe", "C__Windows_system32_cmd.exe"),
    ("\\\\server\\share\\x", "__server_share_x"),
    ("report\x00.pdf.exe", "report.pdf.exe"),
    ("line\nbreak.txt", "linebreak.txt"),
    ("evil\u202etxt.exe", "eviltxt.exe"),
    ("zero\u200bwidth.pdf", "zerowidth.pdf"),
    ("CON", "_CON"),
    ("con.txt", "_con.txt"),
    ("LPT1.log", "_LPT1.log"),
    ("COM\u00b9.txt", "_COM1.txt"),
    ("nul . txt", "_nul . txt"),
    ("trailing dot.", "trailing dot"),
    ("   spaced   out   .pdf  ", "spaced out .pdf"),
    (".hidden", "hidden"),
    ("..\u2215..\u2215x", "_.._x"),
    ("\uff0e\uff0e\uff0fetc", "_etc"),
    ('a<b>c:d"e|f?g*h', "a_b_c_d_e_f_g_h"),
    ("passport scan.pdf", "passport scan.pdf"),
    ("パスポート.pdf", "パスポート.pdf"),
]


@pytest.mark.parametrize(("hostile", "expected"), HOSTILE_NAMES)
def test_hostile_name_becomes_one_harmless_component(hostile: str, expected: str) -> None:
    assert sanitise_attachment_name(hostile) == expected


def test_overlong_name_is_cut_keeping_its_extension() -> None:
    name = "a" * 1000 + ".pdf"
    clean = sanitise_attachment_name(name)
    assert clean.endswith(".pdf")
    assert len(clean.encode("utf-8")) == MAX_NAME_BYTES


def test_overlong_multibyte_name_is_cut_on_a_character_boundary() -> None:
    clean = sanitise_attachment_name("文" * 500)
    assert len(clean.encode("utf-8")) <= MAX_NAME_BYTES
    assert set(clean) == {"文"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_name_gives_a_single_safe_component(name: str) -> None:
    clean = sanitise_attachment_name(name)
    assert clean
    assert clean not in (".", "..")
    assert not clean.startswith((".", " "))
    assert "/" not in clean
    assert "\\" not in clean
    assert "\x00" not in clean
    assert len(clean.encode("utf-8")) <= MAX_NAME_BYTES
    assert all(unicodedata.category(c) not in ("Cc", "Cf") for c in clean)
    assert unicodedata.normalize("NFKC", clean) == clean or clean != name


@pytest.mark.parametrize(("hostile", "_expected"), HOSTILE_NAMES)
def test_output_path_stays_in_the_output_folder(
    tmp_path: Path, hostile: str, _expected: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = safe_output_path(out, hostile)
    assert path.parent == out.resolve()
    assert not path.exists()


def test_output_path_never_overwrites_or_follows_a_link(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan.pdf").write_bytes(b"kept")
    os.symlink(tmp_path / "elsewhere", out / "scan-1.pdf")
    path = safe_output_path(out, "scan.pdf")
    assert path == out.resolve() / "scan-2.pdf"


def test_output_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        safe_output_path(tmp_path / "missing", "x")
