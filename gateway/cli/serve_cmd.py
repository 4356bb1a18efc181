"""``gateway serve``: the peer server, the sender worker and the local API, until stopped.

Starts in this order, refusing to start at all on a configuration error (plain
HTTP off loopback, half-configured TLS, no policy, locked keys, a live node on
the same home): open the node with migrations applied, unlock the keyring,
load the policy, bind the peer port, bind the local API port and the local
API's Unix socket ``<home>/run/api.sock`` (see :mod:`gateway.api.unix_socket`),
start the sender worker. Says
``serving <node> on SCHEME://HOST:PORT (local API on SCHEME://HOST:PORT, delivering to URL)``
once everything listens, and ``restarting ...`` / ``stopped <node>`` later:
as JSON log lines (``event`` ``serving``, ``restarting``, ``stopped``, the
sentence in ``message``) whenever the log format is JSON, so that every line
of stderr is JSON; as the bare sentence on a terminal.

In pull mode (``[server] peer_mode = "pull"``) no peer port is bound: the
puller worker (:func:`gateway.peer.puller.run_puller`, started by the service root)
fetches what the host holds, beside the sender, and the sentence reads
``serving pk with no peer listener, pulling from URL (...)``. A host whose
peer pulls (``peer_delivery = "hold"``) starts no sender and never calls the
peer (docs/protocol.md, "Pull mode").

SIGTERM or SIGINT stops it: no new connections are accepted, requests in
flight finish (up to the drain timeout), the sender worker finishes its
current pass, and the process exits 0.

What runs while serving (retention, checkpoints, the watch on this node's own
keys) and how it is stopped is :mod:`gateway.service`, the composition root;
this command parses, calls it, and prints.
"""

from __future__ import annotations

from typing import Any

import click

from gateway import log
from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.service import serve as run_service
from gateway.tls import require_peer_tls

__all__ = ["serve"]

_log = log.get_logger("serve")


@click.command(cls=GatewayCommand)
@pass_app
def serve(app: AppContext) -> None:
    """Serve the peer protocol and the local API, and deliver the outbox, until stopped.

    Stops cleanly on SIGTERM or SIGINT (Ctrl-C): finishes the requests in
    flight and the current delivery pass, then exits 0.

    Host operation: needs the keystore passphrase.
    """
    settings = app.settings()
    require_peer_tls(settings.server)
    log.configure(
        node=settings.node_id,
        level="debug" if app.verbose else settings.log.level,
        fmt=settings.log.format,
        service=True,
    )

    def announce(event: str, message: str, /, **fields: Any) -> None:
        log.announce(_log, event, message, **fields)

    app.node(upgrade=True)
    run_service(
        settings,
        app.node_context(),
        reload_keyring=lambda: app.keyring(reload=True),
        announce=announce,
    )
