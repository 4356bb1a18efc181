"""Hostile input, class 1: numbers the JSON parser cannot hold.

Every untrusted JSON document goes through ``gateway.core.canonical``'s bounded
parser. CPython refuses integer strings over 4,300 digits with a ``ValueError``
and turns ``1e400`` into infinity; the parser must answer both, and every other
member of the family, with "not valid JSON", whatever the door: the core
parsers, ``gateway send``, the local API, the peer API, the peer's answers.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.core import canonical, envelope, keys, ledger, receipt
from gateway.core.policy import Limits
from gateway.errors import GatewayError, InvalidInput, TransportError
from gateway.peer.client import PeerClient
from gateway.peer.ledger_client import CHECKPOINT_CONTENT_TYPE, CHECKPOINTS_PATH
from gateway.peer.server import ENVELOPE_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, MANIFESTS_PATH
from gateway.settings import Settings
from gateway.store.models_exchange import InboxEntry, OutboxEntry
from gateway.store.models_keys import PeerManifestRecord
from gateway.store.models_ledger import WitnessedCheckpointRow
from tests.hostile import (
    Side,
    api_call,
    bare_host,
    pair,  # noqa: F401 - the shared fixture
    peer_server,
    post_signed,
)
from tests.nodes import RawSigner

# The class: every number literal a JSON text may hold that no value of ours can.
NUMBERS = {
    "integer of 5,000 digits": "9" * 5000,
    "negative integer of 5,000 digits": "-" + "9" * 5000,
    "integer of 4,301 digits (just past CPython's limit)": "1" + "0" * 4300,
    "integer 2**53 (past I-JSON's exact range)": str(2**53),
    "integer -(2**64)": str(-(2**64)),
    "float overflowing to infinity": "1e400",
    "negative float overflowing": "-1e400",
    "exponent of nine digits": "1e999999999",
    "mantissa of 5,000 digits": "1" * 5000 + ".5",
    "NaN literal": "NaN",
    "Infinity literal": "Infinity",
    "-Infinity literal": "-Infinity",
}
IDS = list(NUMBERS)
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def with_number(literal: str) -> bytes:
    return b'{"n":' + literal.encode() + b"}"


def envelope_with_header(header: bytes) -> bytes:
    return envelope.MAGIC + struct.pack(">HI", 1, len(header)) + header


# --- the core: the shared parser and every document parser built on it -------------------

CORE: dict[str, Callable[[bytes], Any]] = {
    "parse_bounded_json": lambda raw: canonical.parse_bounded_json(raw, max_bytes=1 << 20),
    "parse_canonical": lambda raw: canonical.parse_canonical(raw, max_bytes=1 << 20),
    "key manifest": keys.parse_manifest,
    "receipt": receipt.parse_receipt,
    "ledger checkpoint": ledger.parse_signed_checkpoint,
    "envelope header": lambda raw: envelope.read_header(
        io.BytesIO(envelope_with_header(raw)), Limits()
    ),
}


@pytest.mark.parametrize("literal", NUMBERS.values(), ids=IDS)
@pytest.mark.parametrize("parser", CORE.values(), ids=list(CORE))
def test_numbers_the_json_parser_cannot_hold_are_refused_by_the_core(
    parser: Callable[[bytes], Any], literal: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        parser(with_number(literal))
    # The cause, or the document's own size limit when the literal alone exceeds it.
    assert "not valid JSON" in str(caught.value) or "exceeds" in str(caught.value)


@pytest.mark.parametrize("literal", NUMBERS.values(), ids=IDS)
def test_the_shared_parser_names_the_cause(literal: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        canonical.parse_bounded_json(with_number(literal), max_bytes=1 << 20)
    message = str(caught.value)
    assert message.startswith("not valid JSON: "), message
    assert any(word in message for word in ("number too large", "number too long", "constant"))


def test_numbers_the_gateway_holds_still_parse() -> None:
    edge = canonical.MAX_SAFE_INTEGER
    for text, value in ((str(edge), edge), (str(-edge), -edge), ("1e308", 1e308), ("0.5", 0.5)):
        assert canonical.parse_bounded_json(with_number(text), max_bytes=1 << 20) == {"n": value}


# --- the doors: CLI, local API, peer API, peer answers -----------------------------------


def hostile_case(literal: str) -> bytes:
    """The example broker case with one number literal planted in it."""
    text = (EXAMPLES / "broker-misconduct.json").read_text()
    return text.replace("{", '{"planted": ' + literal + ", ", 1).encode()


def test_numbers_the_json_parser_cannot_hold_are_refused_at_every_entry_point(
    pair: dict[str, Side], tmp_path: Path
) -> None:
    jp, pk = pair["jp"], pair["pk"]
    inbox = pk.count(InboxEntry)
    outbox, witnessed, manifests = (
        jp.count(OutboxEntry),
        pk.count(WitnessedCheckpointRow),
        pk.count(PeerManifestRecord),
    )
    # The CLI (a real process): the file and standard input.
    for name in ("integer of 5,000 digits", "float overflowing to infinity", "NaN literal"):
        case_file = tmp_path / "case.json"
        case_file.write_bytes(hostile_case(NUMBERS[name]))
        for source, stdin in ((str(case_file), None), ("-", case_file.read_text())):
            done = jp.cli("send", "broker-misconduct", source, stdin=stdin)
            assert done.returncode == 1, (name, done.stderr)
            assert "not valid JSON" in done.stderr, (name, done.stderr)
            assert "internal error" not in done.stderr
    for name, literal in NUMBERS.items():
        # The local API: a body that is JSON on its face.
        body = b'{"type": "broker-misconduct", "case": ' + hostile_case(literal) + b"}"
        answer = api_call(jp, "POST", "/api/v1/bundles", data=body)
        assert answer.status == 400, (name, answer.body)
        assert answer.body["error"]["reason"] == "request.json", name
        assert "not valid JSON" in answer.body["error"]["message"], name
        # The peer API: signed bodies parsed as JSON, one route each.
    with peer_server(pk) as server:
        for name, literal in NUMBERS.items():
            for path, content_type, body in (
                (CHECKPOINTS_PATH, CHECKPOINT_CONTENT_TYPE, with_number(literal)),
                (
                    CHECKPOINTS_PATH,
                    CHECKPOINT_CONTENT_TYPE,
                    b'{"checkpoint":{},"from":' + literal.encode() + b',"proof":[]}',
                ),
                (MANIFESTS_PATH, MANIFEST_CONTENT_TYPE, with_number(literal)),
            ):
                status, answer = post_signed(server, jp, "pk", path, body, content_type)
                assert status == 422, (name, path, status, answer)
            # An envelope whose header holds the number: refused as an envelope, not a crash.
            envelope_body = envelope_with_header(with_number(literal)) + bytes(64)
            status, answer = post_signed(
                server, jp, "pk", "/v1/envelopes", envelope_body, ENVELOPE_CONTENT_TYPE
            )
            assert status == 200, (name, status, answer)
            assert answer["results"][0]["status"] == "refused", (name, answer)
            assert answer["results"][0]["reason"] != "internal", (name, answer)
    assert jp.count(OutboxEntry) == outbox
    assert pk.count(WitnessedCheckpointRow) == witnessed
    assert pk.count(PeerManifestRecord) == manifests
    assert pk.count(InboxEntry) == inbox


@pytest.mark.parametrize("literal", NUMBERS.values(), ids=IDS)
def test_a_peer_answering_numbers_we_cannot_hold_is_a_transport_error(
    tmp_path: Path, literal: str
) -> None:
    """The client side of the peer API: answers are parsed by the same bounded parser."""
    body = b'{"status": ' + literal.encode() + b', "results": [' + literal.encode() + b"]}"
    deep = b"[" * 100_000 + b"]" * 100_000

    async def main() -> list[BaseException]:
        async def answer(request: web.Request) -> web.Response:
            payload = deep if request.path == "/deep" else body
            return web.Response(body=payload, content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        errors: list[BaseException] = []
        envelope_file = tmp_path / "one.env"
        envelope_file.write_bytes(b"envelope")
        async with bare_host(app) as url:
            settings = Settings.model_validate(
                {"home": tmp_path / "jp", "node": {"id": "jp"}, "server": {"peer_url": url}}
            )
            async with PeerClient(settings, RawSigner.make("jp", "jp-op-1")) as client:
                for call in (
                    client.health(),
                    client.request_json("POST", "/v1/anything", {}),
                    client.request_json("POST", "/deep", {}),
                    client.post_envelopes([envelope_file]),
                ):
                    try:
                        await call
                    except BaseException as exc:
                        errors.append(exc)
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 4
    for error in errors:
        assert isinstance(error, TransportError), repr(error)
        assert error.reason == "transport.answer"
