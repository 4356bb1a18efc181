"""The local API on a Unix domain socket inside the node home.

``gateway serve`` listens on ``<home>/run/api.sock`` beside the TCP local API,
so that users on the host reach the running node with their token alone. The
folder ``<home>/run`` is made 0750 and the socket 0660: access to the socket
is granted by group membership, and the token is checked on every request
as on TCP.

A socket file left by a node that was killed is replaced; a socket that a
live node answers on is never taken over (starting a second node on the same
home is refused with :class:`~gateway.errors.ConfigError`). Anything else in
its place (a regular file, a link) is refused too, never removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path

from aiohttp import web

from gateway.client.paths import (
    MAX_SOCKET_PATH_BYTES,
    RUN_DIR_MODE,
    SOCKET_MODE,
    api_socket_path,
)
from gateway.errors import ConfigError

__all__ = ["UnixApiSite", "bind_api_socket", "remove_api_socket", "start_unix_api"]


def _prepare_run_dir(folder: Path) -> None:
    try:
        folder.mkdir(mode=RUN_DIR_MODE, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise ConfigError(
            f"cannot make {folder} for the local API socket: {exc.strerror}",
            reason="config.socket",
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"{folder} is not a folder: remove it so the node can make its socket folder",
            reason="config.socket",
        )
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{folder} belongs to another user: the node's user must own its socket folder",
            reason="config.socket",
        )
    folder.chmod(RUN_DIR_MODE)


def _clear_stale(path: Path) -> None:
    """Remove a socket file no live process answers on; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket: move it away, then start the node again",
            reason="config.socket",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a node that did not stop cleanly
        return
    except OSError as exc:
        raise ConfigError(
            f"cannot tell whether a node serves on {path}: {exc.strerror}",
            reason="config.socket",
        ) from None
    finally:
        probe.close()
    raise ConfigError(
        f"a running node already answers on {path}: stop it before starting another "
        "on the same home",
        reason="config.socket",
    )


def bind_api_socket(home: Path) -> socket.socket:
    """A listening Unix socket at ``<home>/run/api.sock``, mode 0660 from the start.

    The socket is bound under a temporary name in the 0750 folder, given its
    mode, and renamed into place, so it is never reachable with a wider mode.
    Raises :class:`ConfigError` when the path is too long for a Unix socket,
    when the folder cannot be made, or when a live node already listens there.
    """
    path = api_socket_path(home)
    temporary = path.with_name(f".api-{secrets.token_hex(4)}.sock")
    if len(os.fsencode(temporary)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"the socket path {path} is longer than a Unix socket allows "
            f"({MAX_SOCKET_PATH_BYTES} bytes): use a node home with a shorter path",
            reason="config.socket",
        )
    _prepare_run_dir(path.parent)
    _clear_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(temporary))
        temporary.chmod(SOCKET_MODE)
        temporary.rename(path)
        listener.listen(128)
    except OSError as exc:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise ConfigError(
            f"cannot listen on {path} for the local API: {exc.strerror}",
            reason="config.socket",
        ) from None
    listener.setblocking(False)
    return listener


def remove_api_socket(home: Path, inode: int) -> None:
    """Remove the socket file if it is still the one this node made (by inode)."""
    path = api_socket_path(home)
    try:
        if os.lstat(path).st_ino != inode:
            return  # replaced meanwhile: not ours to remove
        path.unlink()
    except FileNotFoundError:
        return


class UnixApiSite(web.SockSite):
    """The runner's site on ``<home>/run/api.sock``; removes its file when stopped."""

    def __init__(self, runner: web.BaseRunner, home: Path) -> None:
        self._home = home
        self._listener = bind_api_socket(home)
        self._inode = os.lstat(api_socket_path(home)).st_ino
        super().__init__(runner, self._listener)

    @property
    def path(self) -> Path:
        return api_socket_path(self._home)

    async def stop(self) -> None:
        remove_api_socket(self._home, self._inode)
        await super().stop()


async def start_unix_api(runner: web.BaseRunner, home: Path) -> UnixApiSite:
    """Serve ``runner``'s application on ``<home>/run/api.sock`` too; return the site.

    The site is stopped (and its file removed) with the runner's ``cleanup()``.
    """
    site = UnixApiSite(runner, home)
    await site.start()
    return site
