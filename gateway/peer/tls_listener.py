"""A TLS listener that logs every refused handshake: one warning line, rate-limited.

asyncio does the TLS handshake of ``create_server(ssl=...)`` out of sight: a
client with no certificate, a certificate from another CA or plain HTTP on the
TLS port is dropped without a word to the application. :class:`LoggedTlsSite`
accepts plain TCP and runs the handshake itself (``loop.start_tls``), so a
failure is seen with the remote address and named by
:func:`gateway.peer.failures.classify_handshake_error`; a handshake that
succeeds hands the TLS transport to aiohttp as usual.

The log line (``tls_handshake_failed``, level warning) carries ``listener``,
``remote`` (address only), ``reason`` (a code such as
``tls.client-certificate-unknown-issuer``) and ``cause`` (one clause). A
remote address gets at most one line per :data:`LOG_WINDOW_SECONDS`; the next
line it gets counts the failures left out (``suppressed``), so a scanner cannot
fill the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web

from gateway import log
from gateway.peer.failures import classify_handshake_error

__all__ = ["HANDSHAKE_TIMEOUT", "LOG_WINDOW_SECONDS", "HandshakeLog", "LoggedTlsSite"]

HANDSHAKE_TIMEOUT: Final = 30.0
"""Seconds a client has to finish the TLS handshake."""
LOG_WINDOW_SECONDS: Final = 60.0
"""At most one handshake failure line per remote address in this many seconds."""
_MAX_TRACKED = 4096

_log = log.get_logger("tls")


class HandshakeLog:
    """Rate-limited logging of refused handshakes, per remote address.

    ``clock`` is a monotonic clock in seconds (a parameter, for tests);
    ``failures`` counts every refused handshake, logged or not, and
    ``on_refused(listener, reason)`` is called for each (the node's
    ``ssw_gateway_tls_handshake_failures_total`` counter).
    """

    def __init__(
        self,
        listener: str,
        *,
        window: float = LOG_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.listener = listener
        self.window = window
        self._clock = clock
        self._on_refused = on_refused
        self._last: dict[str, tuple[float, int]] = {}
        self.failures = 0

    def refused(self, remote: str, exc: BaseException) -> bool:
        """Record one refused handshake from ``remote``; True when a line was written."""
        self.failures += 1
        failure = classify_handshake_error(exc)
        if self._on_refused is not None:
            self._on_refused(self.listener, failure.reason)
        now = self._clock()
        last = self._last.get(remote)
        if last is not None and now - last[0] < self.window:
            self._last[remote] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._last[remote] = (now, 0)
        if len(self._last) > _MAX_TRACKED:
            self._forget(now)
        _log.warning(
            "tls_handshake_failed",
            listener=self.listener,
            remote=remote,
            reason=failure.reason,
            cause=failure.cause,
            suppressed=suppressed,
        )
        return True

    def _forget(self, now: float) -> None:
        for remote, (since, _count) in list(self._last.items()):
            if now - since >= self.window:
                del self._last[remote]
        while len(self._last) > _MAX_TRACKED:
            self._last.pop(next(iter(self._last)))


class _Gate(asyncio.Protocol):
    """The protocol of one accepted connection until its TLS handshake is done."""

    def __init__(
        self,
        inner: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        handshakes: HandshakeLog,
        pending: set[_Gate],
    ) -> None:
        self._inner = inner
        self._context = context
        self._handshakes = handshakes
        self._pending = pending
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("a TLS listener needs a stream transport")
        self._transport = transport
        # Nothing is read until start_tls takes the transport over.
        transport.pause_reading()
        self._pending.add(self)
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        protocol = self._inner()
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                protocol,
                self._context,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except RuntimeError:  # closed before the handshake began: nothing to name
            transport.abort()
            return
        except (OSError, TimeoutError, EOFError) as exc:
            self._handshakes.refused(remote, exc)
            transport.abort()
            return
        finally:
            self._pending.discard(self)
        if tls is None:  # the connection closed under the handshake
            return
        protocol.connection_made(tls)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only reached while the handshake has not taken the transport over.
        self._pending.discard(self)

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()


class LoggedTlsSite(web.TCPSite):
    """A :class:`aiohttp.web.TCPSite` whose TLS handshakes are logged when refused."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        handshakes: HandshakeLog,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog)
        self.handshakes = handshakes
        self._gates: set[_Gate] = set()

    async def start(self) -> None:
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        context = self._ssl_context
        if server is None or context is None:
            raise RuntimeError("LoggedTlsSite needs a set-up runner and a TLS context")
        handshakes, gates = self.handshakes, self._gates
        self._server = await loop.create_server(
            lambda: _Gate(server, context, handshakes, gates),
            self._host,
            self._port,
            backlog=self._backlog,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        for gate in list(self._gates):
            with contextlib.suppress(RuntimeError):
                gate.close()
        self._gates.clear()
        await super().stop()
