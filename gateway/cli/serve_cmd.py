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

SIGTERM or SIGINT stops it: no new connections are accepted, requests in
flight finish (up to the drain timeout), the sender worker finishes its
current pass, and the process exits 0.

Beside them run the retention pass (the purge of ``gateway purge``, at start
and every ``retention_interval_seconds``), the checkpoint publisher (signs a ledger checkpoint every
``checkpoint_interval_seconds`` when the ledger grew and gives it to the peer
as a witness) and a watch on this node's own key manifest: when an
administrator rotates or revokes keys from another process, the server drains
as on SIGTERM, unlocks the keys again and serves anew in the same process, so
it never keeps signing with superseded or revoked keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import click
from aiohttp import web

from gateway import log
from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.client.paths import api_socket_path
from gateway.core.keys import NodeKeyring
from gateway.errors import ConfigError
from gateway.node.runtime import Node
from gateway.peer.client import PeerClient
from gateway.peer.server import (
    PeerServer,
    TransportLimits,
    create_node_peer_app,
    limits_from_policy,
)
from gateway.peer.tls import (
    api_ssl_context,
    client_ssl_context,
    listener_url,
    require_peer_tls,
    server_ssl_context,
)
from gateway.peer.tls_listener import HandshakeLog, LoggedTlsSite
from gateway.settings import Settings, is_loopback

__all__ = ["serve"]

DRAIN_SECONDS = 30.0
_signals_between_runs: list[str] = []


def _remember_signal(signum: int, _frame: object) -> None:
    _signals_between_runs.append(signal.Signals(signum).name)


_log = log.get_logger("serve")


def _ledger_routes(node: Node) -> Callable[[web.Application], None]:
    """The ledger's peer routes (checkpoint witnessing, consistency proofs)."""
    from gateway.peer.ledger_routes import ledger_routes  # noqa: PLC0415

    return ledger_routes(node.db)


def _api_app(node: Node, keyring: NodeKeyring) -> web.Application:
    from gateway.api.app import create_api_app  # noqa: PLC0415

    return create_api_app(node, lambda: keyring)


async def _start_api(
    app: web.Application, host: str, port: int, ssl_context: Any, node: Node
) -> web.AppRunner:
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_SECONDS
    )
    await runner.setup()
    site = (
        LoggedTlsSite(
            runner,
            host,
            port,
            ssl_context=ssl_context,
            handshakes=HandshakeLog("api", on_refused=node.metrics.tls_handshake_failed),
        )
        if ssl_context is not None
        else web.TCPSite(runner, host, port)
    )
    await site.start()
    from gateway.api.unix_socket import start_unix_api  # noqa: PLC0415

    try:
        await start_unix_api(runner, node.settings.home)
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _run(
    settings: Settings,
    node: Node,
    keyring: NodeKeyring,
    limits: TransportLimits,
    announce: Callable[..., None],
) -> bool:
    """Serve until stopped; True when the stop was to restart with new keys."""
    from gateway.node.housekeeping import (  # noqa: PLC0415
        enforce_retention,
        publish_checkpoints,
        watch_own_keys,
    )
    from gateway.node.outbox import run_sender  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []
    restart: list[bool] = []

    def on_keys_changed() -> None:
        restart.append(True)
        stop.set()

    def on_signal(name: str) -> None:
        received.append(name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    if _signals_between_runs:
        # A stop asked for while the previous run was winding down still counts.
        on_signal(_signals_between_runs.pop())

    host, port = settings.server.listen_address
    peer_ssl = server_ssl_context(settings.server, host=host)
    api_host, api_port = settings.server.api_listen_address
    api_ssl = api_ssl_context(settings.server, host=api_host)
    if settings.server.peer_url is not None:
        client_ssl_context(settings.server, peer_url=settings.server.peer_url)
    for what, where, context in (("peer", host, peer_ssl), ("api", api_host, api_ssl)):
        if context is None and not is_loopback(where):
            _log.warning("insecure_plain_http", listener=what, host=where)

    peer_server = PeerServer(
        create_node_peer_app(node, keyring, limits, extra_routes=_ledger_routes(node)),
        limits,
        drain_timeout=DRAIN_SECONDS,
    )
    api_runner: web.AppRunner | None = None
    sender: asyncio.Task[None] | None = None
    client: PeerClient | None = None
    background: list[asyncio.Task[None]] = []
    try:
        try:
            bound = await peer_server.start(host, port, ssl_context=peer_ssl)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for the peer: {exc.strerror}",
                reason="config.listen",
            ) from None
        try:
            api_runner = await _start_api(
                _api_app(node, keyring), api_host, api_port, api_ssl, node
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {api_host}:{api_port} for the local API: {exc.strerror}",
                reason="config.listen",
            ) from None
        if settings.server.peer_url is not None:
            client = PeerClient(settings, keyring)
            await client.__aenter__()
            shared = client

            @asynccontextmanager
            async def shared_client() -> AsyncIterator[PeerClient]:
                # One session for the whole process: each delivery pass borrows it.
                yield shared

            factory: Callable[[], AbstractAsyncContextManager[Any]] = shared_client
            sender = asyncio.create_task(run_sender(node, keyring, factory, stop))
        background.append(
            asyncio.create_task(
                publish_checkpoints(
                    node,
                    keyring,
                    client,
                    stop,
                    interval=settings.server.checkpoint_interval_seconds,
                )
            )
        )
        background.append(asyncio.create_task(watch_own_keys(node, keyring, stop, on_keys_changed)))
        background.append(
            asyncio.create_task(
                enforce_retention(node, stop, interval=settings.server.retention_interval_seconds)
            )
        )
        peer_listen = listener_url(host, bound, tls=peer_ssl is not None)
        api_listen = listener_url(api_host, api_port, tls=api_ssl is not None)
        delivering = settings.server.peer_url if sender is not None else None
        announce(
            "serving",
            f"serving {node.node_id} on {peer_listen} (local API on {api_listen}"
            + (f", delivering to {delivering})" if delivering else ", not delivering)"),
            peer_listen=peer_listen,
            api_listen=api_listen,
            api_socket=str(api_socket_path(settings.home)),
            peer_url=delivering,
            tls=peer_ssl is not None,
            mutual_tls=settings.server.tls_ca is not None,
            sender=sender is not None,
        )
        if sender is not None:
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({stopper, sender}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if sender.done() and not stop.is_set():
                sender.result()
        else:
            await stop.wait()
        _log.info(
            "stopping", signal=received[0] if received else None, restart_for_new_keys=bool(restart)
        )
    finally:
        await peer_server.stop()
        if api_runner is not None:
            await api_runner.cleanup()
        stop.set()
        if sender is not None:
            try:
                await asyncio.wait_for(sender, timeout=DRAIN_SECONDS)
            except TimeoutError:
                _log.warning("sender_drain_timeout")
        for task in background:
            try:
                await asyncio.wait_for(task, timeout=DRAIN_SECONDS)
            except TimeoutError:
                task.cancel()
        if client is not None:
            await client.__aexit__(None, None, None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
            # Winding down already: a signal now must neither kill the last steps
            # nor be lost if the node serves again with new keys.
            signal.signal(sig, _remember_signal)
    return bool(restart) and not received


@click.command(cls=GatewayCommand)
@pass_app
def serve(app: AppContext) -> None:
    """Serve the peer protocol and the local API, and deliver the outbox, until stopped.

    Stops cleanly on SIGTERM or SIGINT (Ctrl-C): finishes the requests in
    flight and the current delivery pass, then exits 0.

    Host operation: needs the keystore passphrase.
    """
    from gateway.node.policy import load_policy  # noqa: PLC0415

    settings = app.settings()
    require_peer_tls(settings.server)
    log.configure(
        node=settings.node_id,
        level="debug" if app.verbose else settings.log.level,
        fmt=settings.log.format,
        service=True,
    )
    node = app.node(upgrade=True)
    keyring = app.keyring()
    limits = limits_from_policy(load_policy(settings).limits)

    def announce(event: str, message: str, **fields: Any) -> None:
        log.announce(_log, event, message, **fields)

    while asyncio.run(_run(settings, node, keyring, limits, announce)):
        if _signals_between_runs:
            break
        announce("restarting", f"restarting {node.node_id} with its new keys")
        keyring = app.keyring(reload=True)
    announce("stopped", f"stopped {node.node_id}")
