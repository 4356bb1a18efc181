"""The client side of ledger witnessing: send our checkpoints, ask for consistency proofs.

The peer's answer is parsed with bounds (size, depth, proof length) and the
signed checkpoint is kept as the peer signed it; checking signatures and
proofs is the caller's (``gateway.node.ledger``), against the pinned manifest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, Final

from gateway.core import merkle
from gateway.core.canonical import canonical_bytes, parse_bounded_json
from gateway.core.ledger import MAX_CHECKPOINT_BYTES, SignedCheckpoint
from gateway.errors import InvalidInput, TransportError
from gateway.node.ledger.witness import PeerAnswer
from gateway.peer.client import PeerClient, PeerRefused

__all__ = [
    "CHECKPOINTS_PATH",
    "CHECKPOINT_CONTENT_TYPE",
    "CONSISTENCY_PATH",
    "fetch_consistency",
    "parse_consistency_answer",
    "send_checkpoint",
]

CHECKPOINTS_PATH: Final = "/v1/checkpoints"
CONSISTENCY_PATH: Final = "/v1/ledger/consistency"
CHECKPOINT_CONTENT_TYPE: Final = "application/vnd.ssw-gateway.checkpoint+json"
MAX_ANSWER_BYTES: Final = 64 * 1024


def _bad(why: str) -> TransportError:
    return TransportError(
        f"peer's consistency answer is unusable: {why}", reason="transport.answer"
    )


def parse_consistency_answer(raw: bytes) -> PeerAnswer:
    """``{"checkpoint": {"body", "signature"}, "proof": [base64, ...]}``, bounded."""
    try:
        value: Any = parse_bounded_json(raw, max_bytes=MAX_ANSWER_BYTES, max_depth=4)
    except InvalidInput as exc:
        raise _bad(exc.message) from None
    if not isinstance(value, dict) or not {"checkpoint", "proof"} <= set(value):
        raise _bad("it is not {checkpoint, proof}")
    proof_items = value["proof"]
    if not isinstance(proof_items, list) or len(proof_items) > merkle.MAX_PROOF_LENGTH:
        raise _bad("the proof is not a list of at most 128 hashes")
    proof: list[bytes] = []
    for item in proof_items:
        if not isinstance(item, str):
            raise _bad("a proof hash is not text")
        try:
            proof.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise _bad("a proof hash is not base64") from None
    checkpoint = value["checkpoint"]
    if not isinstance(checkpoint, dict):
        raise _bad("the checkpoint is not an object")
    try:
        wire = canonical_bytes(checkpoint)
    except InvalidInput as exc:
        raise _bad(exc.message) from None
    if len(wire) > MAX_CHECKPOINT_BYTES * 2:
        raise _bad("the checkpoint is too large")
    return PeerAnswer(checkpoint=wire, proof=proof)


async def fetch_consistency(client: PeerClient, first: int) -> PeerAnswer:
    """Ask the peer for its newest signed checkpoint and the proof from size ``first``."""
    answer = await client.request("GET", f"{CONSISTENCY_PATH}?first={int(first)}")
    return parse_consistency_answer(answer)


async def send_checkpoint(
    client: PeerClient,
    signed: SignedCheckpoint,
    *,
    prove: Callable[[int, int], list[bytes]],
) -> None:
    """Give the peer our signed checkpoint to keep as its witness.

    A peer that witnessed an earlier checkpoint answers 409
    ``ledger.proof-required`` naming its size; the checkpoint is then sent again
    with ``prove(witnessed_size, size)``, the consistency proof between them.
    """
    try:
        await client.request(
            "POST", CHECKPOINTS_PATH, signed.to_wire(), content_type=CHECKPOINT_CONTENT_TYPE
        )
    except PeerRefused as refusal:
        witnessed = refusal.detail.get("witnessed_size")
        if refusal.reason != "ledger.proof-required" or not isinstance(witnessed, int):
            raise
    else:
        return
    size = signed.checkpoint.size
    proof = await asyncio.to_thread(prove, witnessed, size)
    body = canonical_bytes(
        {
            "checkpoint": json.loads(signed.to_wire()),
            "from": witnessed,
            "proof": [base64.b64encode(item).decode("ascii") for item in proof],
        }
    )
    await client.request("POST", CHECKPOINTS_PATH, body, content_type=CHECKPOINT_CONTENT_TYPE)
