"""The running node for tests of user commands: the real local API app on the
node's Unix socket (``<home>/run/api.sock``), served from a background thread.

User commands are clients of the running node (SPEC §8, who runs what). This
fixture gives them one without a process: the same ``create_api_app`` and the
same socket code ``gateway serve`` uses, over an opened :class:`Node` and its
unlocked keyring. The CLI then runs with the user's token only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.api.app import create_api_app
from gateway.api.unix_socket import start_unix_api
from gateway.client.paths import api_socket_path
from gateway.node.context import NodeContext

__all__ = ["RunningApi", "running_api", "serve_node", "serving_home", "stop_all"]


class RunningApi:
    """The local API of one opened node, listening on its home's Unix socket."""

    def __init__(self, node: Any, keyring_provider: Callable[[], Any]) -> None:
        self.node = node
        self._keyring_provider = keyring_provider
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def socket(self) -> Path:
        return api_socket_path(self.node.settings.home)

    def start(self) -> RunningApi:
        self._thread.start()

        async def up() -> None:
            app = create_api_app(NodeContext(self.node, self._keyring_provider))
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await start_unix_api(self._runner, self.node.settings.home)

        asyncio.run_coroutine_threadsafe(up(), self._loop).result(timeout=30)
        return self

    def add_tcp(self) -> str:
        """Listen on loopback TCP too (plain HTTP); return the URL."""
        assert self._runner is not None
        runner = self._runner

        async def up() -> str:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            return f"http://127.0.0.1:{port}"

        return asyncio.run_coroutine_threadsafe(up(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(timeout=30)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()


@contextmanager
def running_api(node: Any, keyring_provider: Callable[[], Any]) -> Iterator[RunningApi]:
    """Serve ``node``'s local API on its Unix socket for the ``with`` block."""
    api = RunningApi(node, keyring_provider).start()
    try:
        yield api
    finally:
        api.stop()


@contextmanager
def serving_home(
    home: Path, environ: dict[str, str], *, passphrase: str | None = None
) -> Iterator[RunningApi]:
    """Open the node at ``home`` (settings from ``environ``) and serve its local API
    on the home's socket for the ``with`` block; the keyring is unlocked with
    ``passphrase`` when a route first needs it (``None``: routes that seal or open
    bundles fail, as for a node whose keys cannot be unlocked)."""
    from gateway.node.own_keys import unlock_keyring  # noqa: PLC0415
    from gateway.node.runtime import Node  # noqa: PLC0415
    from gateway.settings import load_settings  # noqa: PLC0415

    node = Node.open(load_settings(home, environ=environ))
    unlocked: list[Any] = []

    def keyring() -> Any:
        if not unlocked:
            if passphrase is None:
                raise RuntimeError("this test node serves without its keys")
            with node.db.transaction() as session:
                unlocked.append(unlock_keyring(node.settings, passphrase.encode(), session))
        return unlocked[0]

    try:
        with running_api(node, keyring) as api:
            yield api
    finally:
        node.close()


_started: list[RunningApi] = []


def serve_node(node: Any, keyring_provider: Callable[[], Any]) -> RunningApi:
    """Serve ``node``'s local API on its home's socket until the test ends (once per node).

    The ``_stop_running_apis`` fixture of ``tests/conftest.py`` stops every one
    after the test.
    """
    for api in _started:
        if api.node is node:
            return api
    api = RunningApi(node, keyring_provider).start()
    _started.append(api)
    return api


def stop_all() -> None:
    """Stop every API :func:`serve_node` started."""
    while _started:
        _started.pop().stop()
