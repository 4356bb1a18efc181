"""Where a node's local API listens on its host: one fixed place in the home.

Shared by the serving side (:mod:`gateway.api.unix_socket`) and the client, so
both name the same file. Standard library only.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "RUN_DIR_MODE",
    "SOCKET_MODE",
    "api_socket_path",
]

RUN_DIR_MODE = 0o750
"""Mode of ``<home>/run``: the node's user and its group may enter it."""
SOCKET_MODE = 0o660
"""Mode of ``<home>/run/api.sock``: access is granted by group membership."""
MAX_SOCKET_PATH_BYTES = 107
"""Longest path a Unix domain socket may have on Linux (``sun_path`` is 108 bytes)."""


def api_socket_path(home: Path) -> Path:
    """The local API's Unix socket of the node at ``home``: ``<home>/run/api.sock``."""
    return home / "run" / "api.sock"
