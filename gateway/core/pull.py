"""Pull mode, the pure part: the framing of a pull answer and the pairing rule of modes.

A node in pull mode opens no peer listener; it fetches what its peer (the
host) holds for it with signed ``POST /v1/pull`` requests and answers with the
signed receipts in ``POST /v1/pull/receipts`` (docs/protocol.md, "Pull
mode"). The host's answer to a pull is a frame of items in the order the
puller must apply them::

    "SGP1" (4 bytes) || count (uint32, big-endian)
    then count times: kind (uint8) || length (uint64, big-endian) || bytes (length bytes)

``kind`` is :class:`ItemKind`: a key manifest of the host (always first, at
most :data:`MAX_ANSWER_MANIFESTS` of them), an envelope (in the host's
per-channel order), or the host's newest signed checkpoint (last), in the body
form of ``POST /v1/checkpoints``.

The pairing rule (:func:`mode_mismatch`) is the one ``gateway peer ping``
checks on both sides: a node that pulls needs a peer that holds
(``[server] peer_delivery = "hold"``), and a node that holds needs a peer that
pulls (``[server] peer_mode = "pull"``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal

from gateway.errors import InvalidInput

__all__ = [
    "ITEM_PREFACE",
    "MAX_ANSWER_MANIFESTS",
    "PULL_CONTENT_TYPE",
    "PULL_MAGIC",
    "PULL_PREFACE",
    "ItemKind",
    "Modes",
    "item_preface",
    "mode_mismatch",
    "parse_item_preface",
    "parse_preface",
    "preface",
]

PULL_MAGIC: Final = b"SGP1"
PULL_CONTENT_TYPE: Final = "application/vnd.ssw-gateway.pull"
PULL_PREFACE: Final = 8
"""Bytes of the answer's preface: magic and count."""
ITEM_PREFACE: Final = 9
"""Bytes before each item: kind and length."""
MAX_ANSWER_MANIFESTS: Final = 64
"""The most key manifests one pull answer carries, and one receipts post acknowledges.

The puller bounds an answer's items before it reads one (the envelopes it asked
for, this many manifests and a checkpoint) and the host bounds the manifest
hashes of a receipts post, so both sides keep to this one number. A host with
more manifests its peer has not acknowledged (many key changes while the peer
was away) hands out the oldest this many, lowest version first, and nothing
else: the envelopes and checkpoint behind them may be signed by keys only a
later manifest lists. The next pull gets the next ones. 64 manifests of at most
64 KiB each (``gateway.core.keys.MAX_MANIFEST_BYTES``) stay within what a
puller holds of an answer in memory.
"""

PeerMode = Literal["push", "pull"]
PeerDelivery = Literal["push", "hold"]


class ItemKind(IntEnum):
    """What one item of a pull answer is."""

    MANIFEST = 1
    ENVELOPE = 2
    CHECKPOINT = 3


def preface(count: int) -> bytes:
    """The answer's first 8 bytes for ``count`` items."""
    return PULL_MAGIC + struct.pack(">I", count)


def parse_preface(raw: bytes, *, max_items: int) -> int:
    """The item count of an answer's preface; :class:`InvalidInput` naming the fault.

    ``max_items`` bounds the count before anything else is read.
    """
    if len(raw) != PULL_PREFACE or raw[:4] != PULL_MAGIC:
        raise InvalidInput("pull answer does not start with SGP1", reason="pull.framing")
    (count,) = struct.unpack(">I", raw[4:])
    if count > max_items:
        raise InvalidInput(
            f"pull answer of {count} items exceeds the {max_items} asked for", reason="pull.limit"
        )
    return int(count)


def item_preface(kind: ItemKind, length: int) -> bytes:
    """The 9 bytes before an item of ``length`` bytes."""
    return struct.pack(">BQ", int(kind), length)


def parse_item_preface(raw: bytes, *, max_length: int) -> tuple[ItemKind, int]:
    """Kind and length of the next item; :class:`InvalidInput` for an unknown kind,
    an empty item or one longer than ``max_length`` (checked before reading it)."""
    if len(raw) != ITEM_PREFACE:
        raise InvalidInput("pull answer ended inside an item preface", reason="pull.framing")
    kind_code, length = struct.unpack(">BQ", raw)
    try:
        kind = ItemKind(kind_code)
    except ValueError:
        raise InvalidInput(
            f"pull item of unknown kind {kind_code}", reason="pull.framing"
        ) from None
    if length == 0:
        raise InvalidInput("empty pull item", reason="pull.framing")
    if length > max_length:
        raise InvalidInput(f"pull item of {length} bytes exceeds {max_length}", reason="pull.limit")
    return kind, int(length)


@dataclass(frozen=True, slots=True)
class Modes:
    """How one node reaches its peer (``[server] peer_mode``) and delivers to it
    (``[server] peer_delivery``)."""

    peer_mode: PeerMode = "push"
    peer_delivery: PeerDelivery = "push"

    def to_dict(self) -> dict[str, str]:
        return {"peer_mode": self.peer_mode, "peer_delivery": self.peer_delivery}

    @classmethod
    def from_answer(cls, value: object) -> Modes | None:
        """The modes a peer reported (``POST /v1/ping``), or None when it reported none
        (software older than pull mode: it pushes and is pushed to)."""
        if not isinstance(value, dict):
            return None
        mode = value.get("peer_mode", "push")
        delivery = value.get("peer_delivery", "push")
        if mode not in ("push", "pull") or delivery not in ("push", "hold"):
            return None
        return cls(mode, delivery)


def mode_mismatch(ours: Modes, theirs: Modes, *, us: str, peer: str) -> str | None:
    """Why the two nodes' settings cannot work together, or None when they can.

    The message names the setting to change and where. ``us`` and ``peer``
    are the node ids (``jp``, ``pk``).
    """
    if ours.peer_mode == "pull" and theirs.peer_mode == "pull":
        return (
            f'both {us} and {peer} pull ([server] peer_mode = "pull"), so neither listens: '
            f'one side must host: set peer_mode = "push" and peer_delivery = "hold" on it'
        )
    if ours.peer_mode == "pull" and theirs.peer_delivery != "hold":
        return (
            f'{us} pulls ([server] peer_mode = "pull") but {peer} pushes to it '
            f'([server] peer_delivery = "push" on {peer}), and {us} has no peer listener: '
            f'set peer_delivery = "hold" on {peer}, or peer_mode = "push" on {us}'
        )
    if ours.peer_delivery == "hold" and theirs.peer_mode != "pull":
        return (
            f'{us} holds its traffic for {peer} to pull ([server] peer_delivery = "hold") '
            f'but {peer} does not pull ([server] peer_mode = "push" on {peer}): '
            f'set peer_mode = "pull" on {peer}, or peer_delivery = "push" on {us}'
        )
    if theirs.peer_delivery == "hold" and ours.peer_mode != "pull":
        return (
            f'{peer} holds its traffic for {us} to pull ([server] peer_delivery = "hold" on '
            f'{peer}) but {us} does not pull: set peer_mode = "pull" on {us}, or '
            f'peer_delivery = "push" on {peer}'
        )
    if theirs.peer_mode == "pull" and ours.peer_delivery != "hold":
        return (
            f'{peer} pulls ([server] peer_mode = "pull" on {peer}) but {us} pushes to it '
            f'([server] peer_delivery = "push"): set peer_delivery = "hold" on {us}, '
            f'or peer_mode = "push" on {peer}'
        )
    return None
