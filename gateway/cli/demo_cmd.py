"""``gateway demo``: two nodes on loopback, the whole story."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.node.runtime import utc_now
from gateway.node.setup import init_node

__all__ = ["demo"]


@click.command(cls=GatewayCommand)
@click.option(
    "--dir",
    "base",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to create the two node homes (default: a new temporary folder).",
)
@pass_app
def demo(app: AppContext, base: Path | None) -> None:
    """Create a Tokyo (jp) and an Islamabad (pk) node side by side on loopback."""
    root = base if base is not None else Path(tempfile.mkdtemp(prefix="ssw-gateway-demo-"))
    made = {}
    for node_id, port in (("jp", 18701), ("pk", 18711)):
        peer_port = 18711 if node_id == "jp" else 18701
        app.progress(f"[demo] initialising node {node_id} ...")
        result = init_node(
            root / node_id,
            node_id,
            now=utc_now(),
            listen=f"127.0.0.1:{port}",
            api_listen=f"127.0.0.1:{port + 1}",
            peer_url=f"http://127.0.0.1:{peer_port}",
            environ=dict(app.environ),
        )
        made[node_id] = str(result.home)
    app.emit(
        {"homes": made},
        "\n".join(
            ["Two node homes are ready:"]
            + [f"  {k}: {v}" for k, v in made.items()]
            + ["(the exchange story runs here once keys, envelopes and sync are in place)"]
        ),
    )
