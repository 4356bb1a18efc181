"""Node settings: one typed, validated object loaded from the node home.

Precedence, highest first: explicit overrides (CLI flags), ``GATEWAY_*``
environment variables, ``<home>/gateway.toml``, built-in defaults.

An environment variable names a setting by section and key in capitals:
``GATEWAY_SERVER_LISTEN`` overrides ``[server] listen``, ``GATEWAY_DATABASE_URL``
overrides ``[database] url``. ``GATEWAY_HOME``, ``GATEWAY_PASSPHRASE`` and
``GATEWAY_TOKEN`` are not settings (they select the home and carry secrets) and
are read elsewhere, as are ``GATEWAY_API_URL`` and ``GATEWAY_API_CA`` (where a
user command finds the running node, :mod:`gateway.client.transport`).

A bad or missing value is a :class:`~gateway.errors.ConfigError` naming the key
and where it came from (the file, or the environment variable).

The typed models and :func:`load_settings` live in :mod:`gateway._settings_models`
(pydantic) and are imported from here on first use: naming the node home, the
config file or a listen address costs the command line no pydantic.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway._settings_models import (
        DatabaseSettings,
        LogSettings,
        NodeSettings,
        PolicySettings,
        ServerSettings,
        Settings,
        load_settings,
    )

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "DatabaseSettings",
    "HostPort",
    "LogSettings",
    "NodeSettings",
    "PolicySettings",
    "ServerSettings",
    "Settings",
    "default_sqlite_url",
    "load_settings",
    "parse_host_port",
    "resolve_home",
    "write_config",
]

CONFIG_FILE = "gateway.toml"
ENV_PREFIX = "GATEWAY_"
NODE_IDS = ("jp", "pk")
HostPort = tuple[str, int]


def parse_host_port(text: str) -> HostPort:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a pair; raise ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is outside 1-65535")
    return host, number


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_sqlite_url(home: Path) -> str:
    return f"sqlite:///{(home / 'data' / 'gateway.sqlite3').resolve()}"


def resolve_home(home: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """The node home: the explicit value, else ``GATEWAY_HOME``, else refuse."""
    chosen = home if home is not None else environ.get("GATEWAY_HOME")
    if not chosen:
        raise ConfigError(
            "no node home given: pass --home DIR or set GATEWAY_HOME", reason="config.home"
        )
    return Path(chosen).expanduser().resolve()


def write_config(home: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``gateway.toml`` for a new node; never overwrites one that exists."""
    import tomli_w  # noqa: PLC0415 - only init writes a config file

    path = home / CONFIG_FILE
    clean = {
        section: {k: v for k, v in body.items() if v is not None}
        for section, body in config.items()
    }
    payload = tomli_w.dumps({section: body for section, body in clean.items() if body})
    try:
        with path.open("x", encoding="utf-8") as handle:
            handle.write(
                "# ssw-gateway node settings; GATEWAY_<SECTION>_<KEY> variables override.\n"
            )
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())  # its name is synced with the new home's (init)
    except FileExistsError:
        raise ConfigError(
            f"{path} exists already: a node lives here", reason="config.exists"
        ) from None
    return path


_MODELS = frozenset(
    {
        "DatabaseSettings",
        "LogSettings",
        "NodeSettings",
        "PolicySettings",
        "ServerSettings",
        "Settings",
        "load_settings",
    }
)


def __getattr__(name: str) -> Any:
    """The pydantic models and :func:`load_settings`, imported on first use (PEP 562)."""
    if name in _MODELS:
        from gateway import _settings_models  # noqa: PLC0415 - the point of this hook

        value = getattr(_settings_models, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
