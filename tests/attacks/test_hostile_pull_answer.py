"""A hostile host's pull answer: every bound the puller asked for is kept, or nothing
of the answer is taken.

A bare aiohttp server plays the host and answers ``POST /v1/pull`` with a
crafted frame (``application/vnd.ssw-gateway.pull``); the real client reads
it. The count of envelopes and their bytes may not exceed what the ask named,
the count of manifests what one answer carries, and the manifests and
checkpoint together are bounded, each checked from the item prefaces before
the bytes they announce are read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiohttp import web

from gateway.core.pull import (
    MAX_ANSWER_MANIFESTS,
    PULL_CONTENT_TYPE,
    ItemKind,
    item_preface,
    preface,
)
from gateway.errors import TransportError
from gateway.peer import client as peer_client
from gateway.peer.client import PeerClient, PulledItem
from gateway.peer.pull_routes import PULL_PATH
from gateway.settings import Settings
from tests.hostile import bare_host
from tests.nodes import RawSigner


def _frame(items: Sequence[tuple[ItemKind, bytes]], *, cut: bool = False) -> bytes:
    """The answer of ``items``; with ``cut``, it ends right after the last item's
    preface (a bound checked before reading says so; one checked after reading would
    find the answer ended early)."""
    frame = preface(len(items)) + b"".join(
        item_preface(kind, len(data)) + data for kind, data in items
    )
    return frame[: -len(items[-1][1])] if cut else frame


def _pull(
    tmp_path: Path,
    items: Sequence[tuple[ItemKind, bytes]],
    *,
    max_envelopes: int,
    max_bytes: int,
    cut: bool = False,
) -> list[PulledItem]:
    """What the client makes of ``items`` answered to an ask of ``max_envelopes`` and
    ``max_bytes``; raises as the client does."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)

    async def main() -> list[PulledItem]:
        async def answer(_request: web.Request) -> web.Response:
            return web.Response(body=_frame(items, cut=cut), content_type=PULL_CONTENT_TYPE)

        app = web.Application()
        app.router.add_post(PULL_PATH, answer)
        ask = {"wait_seconds": 0, "max_envelopes": max_envelopes, "max_bytes": max_bytes}
        async with bare_host(app) as url:
            settings = Settings.model_validate(
                {"home": tmp_path / "pk", "node": {"id": "pk"}, "server": {"peer_url": url}}
            )
            async with PeerClient(settings, RawSigner.make("pk", "pk-op-1")) as client:
                return await client.pull(
                    PULL_PATH, ask, spool, max_items=max_envelopes + MAX_ANSWER_MANIFESTS + 1,
                    max_envelope_bytes=1 << 20, max_small_bytes=1 << 20,
                )  # fmt: skip

    return asyncio.run(main())


def test_an_answer_within_the_ask_is_read_whole(tmp_path: Path) -> None:
    items = [(ItemKind.MANIFEST, b"m" * 100)] + [(ItemKind.ENVELOPE, b"e" * 60)] * 3
    pulled = _pull(tmp_path, items, max_envelopes=3, max_bytes=180)
    assert [item.kind for item in pulled] == [kind for kind, _data in items]
    assert [item.size for item in pulled[1:]] == [60, 60, 60]


@pytest.mark.parametrize(
    ("max_envelopes", "max_bytes"),
    [(2, 1 << 20), (3, 179)],
    ids=["one envelope more than asked", "one byte more than asked"],
)
@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut after the preface"])
def test_an_answer_beyond_the_ask_is_refused_whole(
    tmp_path: Path, max_envelopes: int, max_bytes: int, cut: bool
) -> None:
    items = [(ItemKind.ENVELOPE, b"e" * 60)] * 3
    with pytest.raises(TransportError, match="asked for") as refused:
        _pull(tmp_path, items, max_envelopes=max_envelopes, max_bytes=max_bytes, cut=cut)
    assert refused.value.reason == "transport.answer"


def test_manifests_and_checkpoint_are_bounded_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_client, "PULL_MAX_SMALL_TOTAL", 1000)
    within = [(ItemKind.MANIFEST, b"m" * 400)] * 2 + [(ItemKind.CHECKPOINT, b"c" * 200)]
    assert len(_pull(tmp_path, within, max_envelopes=1, max_bytes=1)) == 3
    beyond = [(ItemKind.MANIFEST, b"m" * 400)] * 2 + [(ItemKind.CHECKPOINT, b"c" * 201)]
    for cut in (False, True):
        with pytest.raises(TransportError, match="too large") as refused:
            _pull(tmp_path, beyond, max_envelopes=1, max_bytes=1, cut=cut)
        assert refused.value.reason == "transport.answer"


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut after the preface"])
def test_more_manifests_than_one_answer_carries_are_refused_whole(
    tmp_path: Path, cut: bool
) -> None:
    # Within the item count asked for, but more than one receipts post could acknowledge.
    within = [(ItemKind.MANIFEST, b"m" * 100)] * MAX_ANSWER_MANIFESTS
    assert len(_pull(tmp_path, within, max_envelopes=2, max_bytes=1)) == MAX_ANSWER_MANIFESTS
    beyond = [*within, (ItemKind.MANIFEST, b"m" * 100)]
    with pytest.raises(TransportError, match="manifests") as refused:
        _pull(tmp_path, beyond, max_envelopes=2, max_bytes=1, cut=cut)
    assert refused.value.reason == "transport.answer"
