"""Class: decrypted files readable by everyone.

Every way the gateway writes decrypted case data to disk (``show --out``,
``disclose --out``, the services under them, and the local API routes that
decrypt into a private scratch folder before answering) leaves files of mode
0600 in folders of mode 0700, whatever the process umask is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway.api.routes_exchange
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.context import NodeContext
from gateway.node.inbox import read_bundle
from gateway.node.outbox import send_case
from gateway.node.runtime import utc_now
from tests.exchange_pair import (
    Pair,
    example,
    pair,  # noqa: F401 - the shared fixture
)

INTERNAL = "beoe"  # an internal recipient of pk: an internal share needs no consent
PURPOSE = "case review"


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    chosen = int(request.param)
    before = os.umask(chosen)
    try:
        yield chosen
    finally:
        os.umask(before)


def _sent_with_attachment(pair: Pair, tmp_path: Path) -> str:
    evidence = tmp_path / "evidence.pdf"
    evidence.write_bytes(b"%PDF-1.7 scanned passport page\n" * 50)
    sent = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring),
        pair.jp.officer,
        "exam-fraud",
        example("exam-fraud"),
        [evidence],
        public=False,
        reply_to=None,
        now=utc_now(),
    )
    pair.pk.receive_from(pair.jp, sent.bundle_id)
    return sent.bundle_id


def _modes(root: Path) -> dict[str, int]:
    """``st_mode`` of ``root`` and of everything below it, by relative path."""
    found = {".": root.lstat().st_mode}
    for path in root.rglob("*"):
        found[path.relative_to(root).as_posix()] = path.lstat().st_mode
    return found


def _not_private(root: Path, modes: dict[str, int]) -> dict[str, str]:
    """Everything that is not a 0600 file or a 0700 folder, with its mode."""
    assert any(stat.S_ISREG(mode) for mode in modes.values()), f"{root}: nothing was written"
    return {
        name: oct(stat.S_IMODE(mode))
        for name, mode in modes.items()
        if stat.S_IMODE(mode) != (0o600 if stat.S_ISREG(mode) else 0o700)
        or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
    }


def _spy(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, folder_of: Callable[[Any], Path]
) -> list[tuple[Path, dict[str, int]]]:
    """Record the modes of what a service wrote, before the API route removes it."""
    seen: list[tuple[Path, dict[str, int]]] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        folder = folder_of(result)
        seen.append((folder, _modes(folder)))
        return result

    monkeypatch.setattr(module, name, spy)
    return seen


def _core_show(pair: Pair, bundle_id: str, tmp_path: Path, _mp: Any) -> tuple[Path, dict[str, int]]:
    out = tmp_path / "core-show"
    out.mkdir(mode=0o700)
    out.chmod(0o700)
    read_bundle(
        NodeContext(pair.pk.node, pair.pk.keyring),
        pair.pk.officer,
        bundle_id,
        out_dir=out,
        now=utc_now(),
    )
    return out, _modes(out)


def _cli_show(pair: Pair, bundle_id: str, tmp_path: Path, _mp: Any) -> tuple[Path, dict[str, int]]:
    top = tmp_path / "cli-show"  # made by the command, with a folder inside it
    done = pair.pk.cli("show", bundle_id, "--out", str(top / "cases"))
    assert done.exit_code == 0, done.output
    return top, _modes(top)


def _core_disclose(
    pair: Pair, bundle_id: str, tmp_path: Path, _mp: Any
) -> tuple[Path, dict[str, int]]:
    out = tmp_path / "core-disclose"
    consent_disclosure.disclose(
        NodeContext(pair.pk.node, pair.pk.keyring),
        pair.pk.officer,
        [bundle_id],
        INTERNAL,
        PURPOSE,
        out,
        now=utc_now(),
    )
    return out, _modes(out)


def _cli_disclose(
    pair: Pair, bundle_id: str, tmp_path: Path, _mp: Any
) -> tuple[Path, dict[str, int]]:
    out = tmp_path / "cli-disclose"
    done = pair.pk.cli(
        "disclose", bundle_id, "--recipient", INTERNAL, "--purpose", PURPOSE, "--out", str(out)
    )
    assert done.exit_code == 0, done.output
    return out, _modes(out)


def _api_show(
    pair: Pair, bundle_id: str, _tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[Path, dict[str, int]]:
    seen = _spy(mp, gateway.api.routes_exchange, "read_bundle", lambda r: r.written[0].parent)
    (answer,) = pair.pk.api([("GET", f"/api/v1/bundles/{bundle_id}?attachments=true", None)])
    assert answer.status == 200, answer.text
    ((folder, modes),) = seen
    return folder, modes


def _api_disclose(
    pair: Pair, bundle_id: str, _tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[Path, dict[str, int]]:
    seen = _spy(mp, consent_disclosure, "disclose", lambda r: r.out_dir)
    body = {"bundle_ids": [bundle_id], "recipient": INTERNAL, "purpose": PURPOSE}
    (answer,) = pair.pk.api([("POST", "/api/v1/disclosures", body)])
    assert answer.status == 201, answer.text
    ((folder, modes),) = seen
    return folder, modes


ENTRY_POINTS = [
    ("core read_bundle(out_dir=)", _core_show),
    ("CLI show --out", _cli_show),
    ("core disclose", _core_disclose),
    ("CLI disclose --out", _cli_disclose),
    ("API GET /api/v1/bundles/{id}?attachments=true", _api_show),
    ("API POST /api/v1/disclosures", _api_disclose),
]


@pytest.mark.parametrize("umask", [0, 0o022], indirect=True, ids=["umask-0", "umask-022"])
def test_decrypted_files_readable_by_everyone(
    pair: Pair, tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No decrypted byte lands in a file or folder that anyone but the owner can open."""
    bundle_id = _sent_with_attachment(pair, tmp_path)
    exposed = {}
    for where, write in ENTRY_POINTS:
        root, modes = write(pair, bundle_id, tmp_path, monkeypatch)
        wrong = _not_private(root, modes)
        if wrong:
            exposed[where] = wrong
    assert exposed == {}, f"umask {oct(umask)}: not 0600 files in 0700 folders"
