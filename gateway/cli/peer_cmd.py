"""``gateway peer``: pin the peer node's key manifest and show it (admin role); test
the link (``ping``, a host operation: the node's keys sign, no user token)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import manifest_text
from gateway.errors import InvalidInput

if TYPE_CHECKING:
    from gateway.peer.ping import PingReport

__all__ = ["peer"]


def _read_manifest_file(path: Path) -> bytes:
    from gateway.core.keys import MAX_MANIFEST_BYTES  # noqa: PLC0415 - host commands only

    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise InvalidInput(f"manifest file {path} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"manifest file {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"manifest file {path} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


@click.group(cls=GatewayGroup)
def peer() -> None:
    """The peer node: pin its key manifest, show what is pinned, test the link."""


@peer.command("add")
@click.argument("manifest_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--fingerprint",
    "expected",
    required=True,
    help="The peer's root fingerprint, read to you out of band by its administrator.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace a pinned peer whose root changed without a signed hand-over "
    "(the peer lost its root key and was set up anew).",
)
@pass_app
def add(app: AppContext, manifest_file: Path, expected: str, replace: bool) -> None:
    """Pin the peer's key manifest after checking its root fingerprint.

    A fingerprint that does not match refuses the import (exit 4) and pins
    nothing. Host operation: run it on the node host with its home and an
    administrator's token; it does not read the keystore passphrase.

    \b
    Example:
      gateway peer add pk-manifest.json --fingerprint ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ23-4567
    """
    from gateway.node import peer_trust  # noqa: PLC0415 - host commands only
    from gateway.node.runtime import utc_now  # noqa: PLC0415 - host commands only

    actor = app.actor("peer.add")
    node = app.node()
    raw = _read_manifest_file(manifest_file)
    peer_node = peer_trust.peer_node_of(node.settings.node_id)
    now = utc_now()
    with node.db.transaction() as session:
        manifest = peer_trust.pin_peer(
            session,
            raw,
            node=peer_node,
            expected_fingerprint=expected,
            now=now,
            actor=actor,
            replace=replace,
        )
    data = peer_trust.describe_manifest(manifest, now=now)
    app.emit(data, lambda: manifest_text(data, "Pinned the key manifest"))


@peer.command("show")
@pass_app
def show(app: AppContext) -> None:
    """Show the peer's pinned key manifest.

    Runs through the node's local API; needs your token.
    """
    answer = app.client("peer.show").call("GET", "/api/v1/peer")
    data = answer.get("pinned")
    if data is None:
        app.emit(
            {"pinned": None},
            "No peer is pinned yet: run 'gateway peer add MANIFEST_FILE --fingerprint FP'.",
        )
        return
    app.emit({"pinned": data}, lambda: manifest_text(data, "Pinned key manifest"))


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def ping_text(report: PingReport) -> str:
    """The human form of a ping report: one line per step, then the verdict."""
    lines = [f"ping {report.peer_url}"]
    lines += [f"  {_MARK[step.status]} {step.name:<15} {step.detail}" for step in report.steps]
    failure = report.failure
    if failure is None:
        warned = sum(1 for step in report.steps if step.status == "warn")
        lines.append("link ok" + (f" ({warned} warning(s))" if warned else ""))
    else:
        lines.append(f"link FAILED at {failure.name}: {failure.reason}")
    return "\n".join(lines)


@peer.command("ping")
@pass_app
def ping(app: AppContext) -> None:
    """Test the link to the peer end to end: TLS, a signed request, clocks, manifests.

    A host operation (the node's keys sign the request; no user token). Exit 0
    when the link works (warnings included), 1 with the failing step's reason.

    \b
    Steps: pinned (a peer manifest is pinned here), connect (TCP, TLS handshake,
    HTTP), signed-request (the peer verifies our signature; round-trip time),
    clock (skew; warning beyond a quarter of the policy's window), manifest (the
    version of our manifest the peer has pinned, against ours).
    """
    from gateway.node.runtime import utc_now  # noqa: PLC0415 - host commands only
    from gateway.peer.ping import ping_peer  # noqa: PLC0415 - host commands only

    report = asyncio.run(ping_peer(app.node_context(), clock=utc_now))
    app.emit(report.to_dict(), lambda: ping_text(report))
    failure = report.failure
    if failure is not None:
        click.echo(f"error: peer ping failed at {failure.name}: {failure.detail}", err=True)
        raise click.exceptions.Exit(1)
