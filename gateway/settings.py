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
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import ConfigError

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
# Variables with the prefix that are not settings.
_NOT_SETTINGS = frozenset(
    {
        "GATEWAY_HOME",
        "GATEWAY_PASSPHRASE",
        "GATEWAY_KEYSTORE_STRENGTH",
        "GATEWAY_TOKEN",
        "GATEWAY_API_URL",
        "GATEWAY_API_CA",
        "GATEWAY_CRASH_AT",
        "GATEWAY_TEST_PG_URL",
    }
)

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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    id: Literal["jp", "pk"]


class ServerSettings(_Section):
    listen: str = "127.0.0.1:8701"
    api_listen: str = "127.0.0.1:8702"
    peer_url: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure_http: bool = False
    sync_interval_seconds: float = Field(default=2.0, gt=0, le=3600)
    checkpoint_interval_seconds: float = Field(default=60.0, gt=0, le=86400)
    retention_interval_seconds: float = Field(default=3600.0, gt=0, le=86400)

    @field_validator("listen", "api_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("peer_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def listen_address(self) -> HostPort:
        return parse_host_port(self.listen)

    @property
    def api_listen_address(self) -> HostPort:
        return parse_host_port(self.api_listen)


class DatabaseSettings(_Section):
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _known_engine(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(
            ("sqlite:", "sqlite+pysqlite:", "postgresql:", "postgresql+psycopg:")
        ):
            raise ValueError("only sqlite:/// and postgresql:// URLs are supported")
        return value


class PolicySettings(_Section):
    dir: Path | None = None


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Section):
    """Everything a node needs to know to run; immutable once loaded."""

    home: Path
    node: NodeSettings
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    policy: PolicySettings = PolicySettings()
    log: LogSettings = LogSettings()

    @property
    def node_id(self) -> str:
        return self.node.id

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def policy_dir(self) -> Path:
        return self.policy.dir if self.policy.dir is not None else self.home / "policies"

    @property
    def database_url(self) -> str:
        return self.database.url or default_sqlite_url(self.home)


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


_SECTIONS: dict[str, type[_Section]] = {
    "node": NodeSettings,
    "server": ServerSettings,
    "database": DatabaseSettings,
    "policy": PolicySettings,
    "log": LogSettings,
}


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Settings from ``GATEWAY_<SECTION>_<KEY>`` variables, and where each came from."""
    values: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"environment variable {name} names no setting "
                f"(expected GATEWAY_<SECTION>_<KEY>, sections: {', '.join(_SECTIONS)})",
                reason="config.unknown",
            )
        if key not in _SECTIONS[section].model_fields:
            raise ConfigError(
                f"environment variable {name}: [{section}] has no key {key!r}",
                reason="config.unknown",
            )
        values.setdefault(section, {})[key] = raw
        origin[f"{section}.{key}"] = f"environment variable {name}"
    return values, origin


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no node here (run 'gateway init' first, or check --home / GATEWAY_HOME)",
            reason="config.missing",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", reason="config.syntax") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read: {exc.strerror}", reason="config.unreadable"
        ) from None


def load_settings(
    home: Path,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Load and validate the settings of the node at ``home``."""
    env = os.environ if environ is None else environ
    path = home / CONFIG_FILE
    data = _read_file(path)
    origin: dict[str, str] = {}
    merged: dict[str, Any] = {}
    for section, content in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]", reason="config.unknown")
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: {section} must be a table", reason="config.type")
        merged[section] = dict(content)
        for key in content:
            origin[f"{section}.{key}"] = str(path)
    env_values, env_origin = _env_overrides(env)
    for section, content in env_values.items():
        merged.setdefault(section, {}).update(content)
    origin.update(env_origin)
    for section, content in (overrides or {}).items():
        merged.setdefault(section, {}).update(content)
        for key in content:
            origin[f"{section}.{key}"] = "command line"
    for content in merged.values():
        for key in ("tls_cert", "tls_key", "tls_ca", "dir"):
            value = content.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                content[key] = str(home / value)
    try:
        return Settings(home=home, **merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        where = origin.get(loc, str(path))
        if first["type"] == "missing":
            raise ConfigError(
                f"{where}: required setting {loc} is missing", reason="config.missing"
            ) from None
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{where}: unknown setting {loc}", reason="config.unknown") from None
        raise ConfigError(f"{where}: {loc}: {first['msg']}", reason="config.value") from None


def write_config(home: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``gateway.toml`` for a new node; never overwrites one that exists."""
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
    except FileExistsError:
        raise ConfigError(
            f"{path} exists already: a node lives here", reason="config.exists"
        ) from None
    return path
