"""The node's typed settings (pydantic) and :func:`load_settings`.

Imported through :mod:`gateway.settings`, which re-exports every name here on
first use; import from there. Precedence and error rules are described there.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.settings import (
    CONFIG_FILE,
    ENV_PREFIX,
    HostPort,
    default_sqlite_url,
    parse_host_port,
)

__all__ = [
    "DatabaseSettings",
    "LogSettings",
    "NodeSettings",
    "PolicySettings",
    "ServerSettings",
    "Settings",
    "load_settings",
]

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


VERIFY_POOL_MIN_ENVELOPES = 256
"""Measured default of ``[server] verify_pool_min_envelopes`` (docs/performance.md)."""


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
    peer_mode: Literal["push", "pull"] = "push"
    """How this node reaches its peer: ``push`` (it listens for the peer's requests)
    or ``pull`` (it opens no peer listener and fetches what the peer holds for it
    from ``peer_url``; docs/protocol.md, "Pull mode")."""
    pull_wait_seconds: float = Field(default=20.0, gt=0, le=25)
    """In pull mode: how long one pull waits at the host when it holds nothing (long poll)."""
    verify_pool_workers: int | None = Field(default=None, ge=0, le=16)
    """Processes that check the signatures of a large received batch; ``None`` is
    ``min(2, CPUs)``, ``0`` checks every batch in the serving process
    (docs/performance.md, "Verification pool")."""
    verify_pool_min_envelopes: int = Field(default=VERIFY_POOL_MIN_ENVELOPES, ge=2)
    """Least number of a batch's envelopes still to check for the pool to be used;
    below it the hop to another process costs more than it saves."""
    spool_direct_io: bool = False
    """Write a received lone envelope larger than 1 MiB past the page cache
    (``O_DIRECT``, one 1 MiB block at a time) instead of through it with
    background flushes; the sync before its receipt is the same either way.
    Off by default: on the reference machine the page cache path was 1.3x
    faster at 64 MiB (docs/performance.md, "The receiver's event loop, and large
    envelopes through the page cache"); storage whose buffered writeback
    competes with other work may do better with it on. Pushed envelopes only,
    posted with their length (the peer client always sends it); envelopes a
    pulling node fetches are written through the page cache."""
    peer_delivery: Literal["push", "hold"] = "push"
    """How this node delivers to its peer: ``push`` (it posts to ``peer_url``) or
    ``hold`` (the peer pulls: its traffic waits in the outbox for the peer's pulls,
    and nothing is ever posted to it)."""

    @model_validator(mode="after")
    def _modes(self) -> ServerSettings:
        if self.peer_mode == "pull" and self.peer_delivery == "hold":
            raise ValueError(
                'peer_mode = "pull" with peer_delivery = "hold" leaves no way to the peer: '
                'a node that pulls delivers by push (set peer_delivery = "push")'
            )
        if self.peer_mode == "pull" and self.peer_url is None:
            raise ValueError('peer_mode = "pull" needs peer_url (the host it pulls from)')
        return self

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
    inline_envelope_max_bytes: int = Field(default=65536, ge=0, le=1 << 20)
    """A received envelope of at most this many bytes is kept in its inbox row
    instead of a file of the envelope store (one file, link and fsync fewer);
    larger ones stay files. 0 keeps every envelope a file. Bounded at 1 MiB so
    a row never carries an attachment-sized value (docs/operations.md)."""

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
