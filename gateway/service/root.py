"""The composition root of ``gateway serve``: one service built from its components.

A :class:`Service` wires one :class:`~gateway.node.context.NodeContext` (the
opened node, its unlocked keyring, policy and clock) into the parts that run
while a node serves, each of them handed that same context, in this order, refusing to start at all
on a configuration error (plain HTTP off loopback is only warned about; a
port that cannot be bound is a :class:`~gateway.errors.ConfigError`):

1. the **peer client** (one session for the process, when ``peer_url`` is set);
2. the **peer listener** (:class:`gateway.peer.server.PeerServer`);
3. the **local API listeners**, one per site of :meth:`Service.api_sites`:
   the TCP address of ``[server] api_listen`` and the Unix socket
   ``<home>/run/api.sock`` that user commands reach by default;
4. the **workers**, each a task of one :class:`asyncio.TaskGroup`: the sender
   (:func:`gateway.node.outbox.run_sender`, when delivering), the checkpoint
   publisher (:func:`gateway.service.workers.publish_checkpoints`), the
   retention pass (:func:`gateway.node.housekeeping.enforce_retention`) and the
   watch on this node's own keys (:func:`gateway.node.housekeeping.watch_own_keys`).

Listeners and the client are async context managers on one
:class:`contextlib.AsyncExitStack`, so whatever started is closed again on
every way out. Stopping: SIGTERM or SIGINT (or a newer own key manifest, or a
failing component) sets one stop event; the listeners stop accepting and
drain the requests in flight while the workers finish their current pass,
each within :data:`DRAIN_SECONDS` (a worker still busy then is cancelled). A
component that fails is logged once (``component_failed`` with its name and
reason code, never a secret) and stops the whole service the same way; its
error is raised from :meth:`Service.run` once everything is closed.

In pull mode (``[server] peer_mode = "pull"``) no peer listener opens: the
puller (:func:`gateway.peer.puller.run_puller`) fetches what the host holds,
beside the sender. A host whose peer pulls (``peer_delivery = "hold"``) opens
no peer client, so it starts no sender and never calls the peer
(docs/protocol.md, "Pull mode").
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from gateway import log
from gateway.api.app import create_api_app
from gateway.api.unix_socket import UnixApiSite
from gateway.client.paths import api_socket_path
from gateway.core.keys import NodeKeyring
from gateway.errors import ConfigError, GatewayError
from gateway.node.context import NodeContext
from gateway.node.housekeeping import enforce_retention, watch_own_keys
from gateway.node.outbox import run_sender
from gateway.node.runtime import Node
from gateway.node.verify_pool import VerifyPool, default_workers
from gateway.peer.client import PeerClient, peer_of
from gateway.peer.ledger_routes import ledger_routes
from gateway.peer.pull_routes import add_pull_routes
from gateway.peer.puller import run_puller
from gateway.peer.server import PeerServer, TransportLimits, create_node_peer_app
from gateway.peer.tls_listener import HandshakeLog, LoggedTlsSite
from gateway.service.workers import publish_checkpoints
from gateway.settings import Settings, is_loopback
from gateway.tls import api_ssl_context, client_ssl_context, listener_url, server_ssl_context

__all__ = ["DRAIN_SECONDS", "Announce", "ApiSite", "Service", "peer_routes"]

DRAIN_SECONDS = 30.0
"""How long requests in flight and workers' current passes may take to finish (seconds)."""

_log = log.get_logger("serve")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_signals_between_runs: list[str] = []


def _remember_signal(signum: int, _frame: object) -> None:
    _signals_between_runs.append(signal.Signals(signum).name)


def stop_asked_between_runs() -> bool:
    """True when SIGTERM/SIGINT arrived while a run was winding down (serve no more)."""
    return bool(_signals_between_runs)


def peer_routes(node: Node) -> Callable[[web.Application], None]:
    """The routes a serving node adds to its peer application (``extra_routes`` of
    :func:`~gateway.peer.server.create_node_peer_app`): the pull routes of
    :mod:`gateway.peer.pull_routes` and the ledger witnessing routes."""
    witnessing = ledger_routes(node.db)

    def add(app: web.Application) -> None:
        add_pull_routes(app)
        witnessing(app)

    return add


class Announce(Protocol):
    """Writes a milestone line (``serving``, ``restarting``, ``stopped``): see :func:`gateway.log.announce`."""

    def __call__(self, event: str, message: str, /, **fields: Any) -> None: ...


@dataclass(frozen=True)
class ApiSite:
    """One place the local API listens on.

    ``make`` builds the aiohttp site on the API's runner; ``url`` is what the
    ``serving`` line shows; ``what`` names it in a bind error.
    """

    what: str
    url: str
    make: Callable[[web.AppRunner], web.BaseSite]


class Service:
    """``gateway serve`` for one node context (opened node, unlocked keyring, policy, clock).

    ``run()`` serves until stopped and returns True when it stopped to be
    started again with newer keys of this node (the caller unlocks the
    keyring again); it raises the error of a component that failed
    (:class:`~gateway.errors.GatewayError` families, e.g. ``ConfigError``
    ``config.listen`` for a port already taken). ``handle_signals=False``
    leaves the process's signal handlers alone (a service embedded in a
    larger program, which stops it with :meth:`stop`).
    """

    def __init__(
        self,
        settings: Settings,
        ctx: NodeContext,
        limits: TransportLimits,
        *,
        announce: Announce,
        drain_seconds: float = DRAIN_SECONDS,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.node = ctx.node
        self.limits = limits
        self._announce = announce
        self._drain_seconds = drain_seconds
        self._handle_signals = handle_signals
        self._stop = asyncio.Event()
        self._signals: list[str] = []
        self._restart = False
        self._failure: BaseException | None = None
        workers = settings.server.verify_pool_workers
        self.verify_pool = VerifyPool(
            workers=default_workers() if workers is None else workers,
            min_envelopes=settings.server.verify_pool_min_envelopes,
        )
        """Checks the signatures of large received batches; its processes start at
        the first such batch and stop when :meth:`run` returns."""

    @property
    def keyring(self) -> NodeKeyring:
        """The node's current keyring (read from the context on every use)."""
        return self.ctx.keyring

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop as SIGTERM does (call from the service's event loop): drain, then return."""
        self._stop.set()

    def _on_signal(self, name: str) -> None:
        self._signals.append(name)
        self._stop.set()

    def _on_keys_changed(self) -> None:
        self._restart = True
        self._stop.set()

    @asynccontextmanager
    async def _signal_handlers(self) -> AsyncIterator[None]:
        if not self._handle_signals:
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        if _signals_between_runs:
            # A stop asked for while the previous run was winding down still counts.
            self._on_signal(_signals_between_runs.pop())
        try:
            yield
        finally:
            for sig in _STOP_SIGNALS:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(sig)
                # Winding down already: a signal now must neither kill the last steps
                # nor be lost if the node serves again with new keys.
                signal.signal(sig, _remember_signal)

    # -- components ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _peer_client(self) -> AsyncIterator[PeerClient | None]:
        server = self.settings.server
        if server.peer_url is None or server.peer_delivery == "hold":
            # A node whose peer pulls never posts to it.
            yield None
            return
        async with PeerClient(self.settings, self.ctx.keyring) as client:
            yield client

    @asynccontextmanager
    async def _peer_listener(self, ssl_context: Any) -> AsyncIterator[int]:
        host, port = self.settings.server.listen_address
        if self.settings.server.peer_mode == "pull":
            # A pulling node calls out only: no peer port is bound.
            yield port
            return
        server = PeerServer(
            create_node_peer_app(
                self.ctx,
                self.limits,
                extra_routes=peer_routes(self.node),
                verify_pool=self.verify_pool,
            ),
            self.limits,
            drain_timeout=self._drain_seconds,
        )
        try:
            try:
                bound = await server.start(host, port, ssl_context=ssl_context)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{port} for the peer: {exc.strerror}",
                    reason="config.listen",
                ) from None
            yield bound
        finally:
            await server.stop()

    def api_sites(self, ssl_context: Any) -> list[ApiSite]:
        """Every place the local API listens on (the TCP address of ``[server]``).

        A further listener (a Unix socket, say) is one more :class:`ApiSite`
        in this list; the API application and its drain are shared.
        """
        host, port = self.settings.server.api_listen_address
        metrics = self.node.metrics

        def tcp(runner: web.AppRunner) -> web.BaseSite:
            if ssl_context is None:
                return web.TCPSite(runner, host, port)
            return LoggedTlsSite(
                runner,
                host,
                port,
                ssl_context=ssl_context,
                handshakes=HandshakeLog("api", on_refused=metrics.tls_handshake_failed),
            )

        socket_path = api_socket_path(self.settings.home)
        return [
            ApiSite(
                what=f"{host}:{port}",
                url=listener_url(host, port, tls=ssl_context is not None),
                make=tcp,
            ),
            # The CLI's default way in: user commands with a token, no passphrase.
            ApiSite(
                what=str(socket_path),
                url=f"unix:{socket_path}",
                make=lambda runner: UnixApiSite(runner, self.settings.home),
            ),
        ]

    @asynccontextmanager
    async def _api_listener(self, sites: list[ApiSite]) -> AsyncIterator[None]:
        runner = web.AppRunner(
            create_api_app(self.ctx),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._drain_seconds,
        )
        await runner.setup()
        try:
            for site in sites:
                try:
                    await site.make(runner).start()
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on {site.what} for the local API: {exc.strerror}",
                        reason="config.listen",
                    ) from None
            yield
        finally:
            await runner.cleanup()

    def _workers(
        self, client: PeerClient | None
    ) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        ctx, stop, server = self.ctx, self._stop, self.settings.server
        workers: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        if client is not None:
            shared = client

            @asynccontextmanager
            async def shared_client() -> AsyncIterator[PeerClient]:
                # One session for the whole process: each delivery pass borrows it.
                yield shared

            factory: Callable[[], AbstractAsyncContextManager[Any]] = shared_client
            workers["sender"] = lambda: run_sender(ctx, factory, stop)
            if server.peer_mode == "pull":
                workers["puller"] = lambda: run_puller(
                    ctx, factory, stop, verify_pool=self.verify_pool
                )
        workers["checkpoints"] = lambda: publish_checkpoints(
            ctx, client, stop, interval=server.checkpoint_interval_seconds
        )
        workers["key-watch"] = lambda: watch_own_keys(ctx, stop, self._on_keys_changed)
        workers["retention"] = lambda: enforce_retention(
            ctx.node, stop, interval=server.retention_interval_seconds
        )
        return workers

    async def _supervise(self, name: str, work: Awaitable[None]) -> None:
        """Run one component; its failure is logged and stops the service."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=self._drain_seconds)
                except TimeoutError:
                    _log.warning("drain_timeout", component=name)
                    return
            task.result()
        except Exception as exc:  # noqa: BLE001 - any failure of a component stops the service
            self._fail(name, exc)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()

    async def _close_on_stop(self, name: str, stack: AsyncExitStack) -> None:
        """Hold ``stack`` open until the stop event, then close it (drains listeners)."""
        try:
            await self._stop.wait()
            await stack.aclose()
        except Exception as exc:  # noqa: BLE001 - a failing close is logged like a failing run
            self._fail(name, exc)

    def _fail(self, name: str, exc: BaseException) -> None:
        if isinstance(exc, GatewayError):
            _log.error("component_failed", component=name, reason=exc.reason, error=exc.message)
        else:
            _log.error("component_failed", component=name, error=type(exc).__name__)
        if self._failure is None:
            self._failure = exc
        self._stop.set()

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> bool:
        """Serve until stopped; True when the stop was to restart with new keys."""
        server = self.settings.server
        pulling = server.peer_mode == "pull"
        host, _port = server.listen_address
        peer_ssl = None if pulling else server_ssl_context(server, host=host)
        api_host, _api_port = server.api_listen_address
        api_ssl = api_ssl_context(server, host=api_host)
        if server.peer_url is not None:
            client_ssl_context(server, peer_url=server.peer_url)
        listeners_of = [("api", api_host, api_ssl)]
        if not pulling:
            listeners_of.insert(0, ("peer", host, peer_ssl))
        for what, where, context in listeners_of:
            if context is None and not is_loopback(where):
                _log.warning("insecure_plain_http", listener=what, host=where)
        sites = self.api_sites(api_ssl)

        async with AsyncExitStack() as stack:
            # Last out: the pool's workers stop once nothing can post a batch.
            stack.push_async_callback(asyncio.to_thread, self.verify_pool.close)
            await stack.enter_async_context(self._signal_handlers())
            client = await stack.enter_async_context(self._peer_client())
            # The listeners close when the stop event is set, concurrently with
            # the workers finishing their pass; the outer stack closes them too
            # when starting fails half-way.
            listeners = AsyncExitStack()
            stack.push_async_callback(listeners.aclose)
            bound = await listeners.enter_async_context(self._peer_listener(peer_ssl))
            await listeners.enter_async_context(self._api_listener(sites))
            workers = self._workers(client)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._close_on_stop("listeners", listeners))
                for name, make in workers.items():
                    group.create_task(self._supervise(name, make()))
                self._announce_serving(bound, peer_ssl, sites, delivering="sender" in workers)
                await self._stop.wait()
                _log.info(
                    "stopping",
                    signal=self._signals[0] if self._signals else None,
                    restart_for_new_keys=self._restart,
                    failed=self._failure is not None,
                )
        if self._failure is not None:
            raise self._failure
        return self._restart and not self._signals

    def _announce_serving(
        self, bound: int, peer_ssl: Any, sites: list[ApiSite], *, delivering: bool
    ) -> None:
        server = self.settings.server
        host, _port = server.listen_address
        pulling = server.peer_mode == "pull"
        peer_listen = None if pulling else listener_url(host, bound, tls=peer_ssl is not None)
        api_listen = ", ".join(site.url for site in sites)
        peer_url = server.peer_url if delivering else None
        where = (
            f"with no peer listener, pulling from {peer_url}" if pulling else f"on {peer_listen}"
        )
        if server.peer_delivery == "hold":
            how = f", holding deliveries for {peer_of(self.node.node_id)} to pull)"
        elif pulling:
            how = ")"
        else:
            how = f", delivering to {peer_url})" if peer_url else ", not delivering)"
        self._announce(
            "serving",
            f"serving {self.node.node_id} {where} (local API on {api_listen}" + how,
            peer_mode=server.peer_mode,
            peer_delivery=server.peer_delivery,
            peer_listen=peer_listen,
            api_listen=api_listen,
            peer_url=peer_url,
            tls=peer_ssl is not None,
            mutual_tls=server.tls_ca is not None,
            sender=delivering,
        )
