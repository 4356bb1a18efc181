"""``gateway serve`` as one call: serve, restart with new keys, stop.

The CLI opens the node and unlocks the keyring (it owns the passphrase
prompt) and builds the one :class:`~gateway.node.context.NodeContext`;
:func:`serve` runs :class:`~gateway.service.root.Service` on it until it
stops, and serves again in the same process after a key rotation or
revocation made by another process, with the keyring unlocked anew and
swapped into the same context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.core.keys import NodeKeyring
from gateway.node.context import NodeContext
from gateway.peer.server import limits_from_policy
from gateway.service.root import Announce, Service, stop_asked_between_runs
from gateway.settings import Settings

__all__ = ["serve"]


def serve(
    settings: Settings,
    ctx: NodeContext,
    *,
    reload_keyring: Callable[[], NodeKeyring],
    announce: Announce,
) -> None:
    """Serve ``ctx.node`` until SIGTERM/SIGINT; returns after ``stopped`` is announced.

    Raises what a failing component raised (a :class:`~gateway.errors.GatewayError`
    family) after everything started is closed again; ``stopped`` is not
    announced then.
    """
    node = ctx.node
    limits = limits_from_policy(ctx.policy.limits)
    while asyncio.run(Service(settings, ctx, limits, announce=announce).run()):
        if stop_asked_between_runs():
            break
        announce("restarting", f"restarting {node.node_id} with its new keys")
        ctx.replace_keyring(reload_keyring())
    announce("stopped", f"stopped {node.node_id}")
