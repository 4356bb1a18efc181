"""``gateway doctor``: a node home checked offline, each finding with the next step.

Nothing here contacts the peer (``gateway peer ping`` does) or unlocks a key:
the checks read the settings, file modes, the TLS material, the database and
the policy. Each is a :class:`Check` with status ``ok``, ``warn`` or ``fail``;
the home is healthy when none failed.

Checks, in order (a failed ``settings`` stops the rest, which need them):

- ``settings``: ``gateway.toml`` and ``GATEWAY_*`` variables load and validate.
- ``tls-settings``: the TLS rules ``serve`` applies at start (no half
  configuration, no plain HTTP off loopback, no ``https://`` peer URL without
  a certificate) hold.
- ``modes``: the home, ``keys/`` and ``data/`` are 0700, private key files
  0600 and ``gateway.toml`` writable by its owner only (docs/operations.md).
- ``tls-cert``, ``tls-key``, ``tls-usage``, ``tls-names``, ``tls-ca``: the
  node's certificate (:mod:`gateway.node.certs`).
- ``database``: reachable, schema current, and owned by this node.
- ``keys``: this node's key manifest (expiry) and the pinned peer.
- ``policy``: the policy file loads.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import make_url

from gateway.errors import GatewayError
from gateway.node.certs import EXPIRY_WARNING, check_node_certificate, names_to_check
from gateway.node.own_keys import own_manifest
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import Node, _safe_url
from gateway.settings import CONFIG_FILE, Settings, load_settings
from gateway.tls import api_ssl_context, client_ssl_context, require_peer_tls, server_ssl_context

__all__ = ["Check", "DoctorReport", "examine_home"]

Status = Literal["ok", "warn", "fail"]
_CERTIFICATE_SUFFIXES = (".crt", ".pem", ".cer", ".json", ".md")


@dataclass(frozen=True, slots=True)
class Check:
    """One finding of the doctor."""

    name: str
    status: Status
    detail: str


@dataclass
class DoctorReport:
    home: Path
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "home": str(self.home),
            "ok": self.ok,
            "checks": [
                {"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks
            ],
        }


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _is_private(path: Path) -> bool:
    """Files of ``keys/`` that hold secrets: all but certificates, manifests, notes."""
    return not path.name.endswith(_CERTIFICATE_SUFFIXES)


def _modes(settings: Settings) -> Check:
    problems: list[str] = []
    home = settings.home
    for folder in (home, settings.keys_dir, settings.data_dir):
        if folder.is_dir() and _mode(folder) & 0o077:
            problems.append(f"{folder} is {_mode(folder):04o} (chmod 700 {folder})")
    config = home / CONFIG_FILE
    if config.is_file() and _mode(config) & 0o022:
        problems.append(f"{config} is writable by others ({_mode(config):04o}; chmod 600)")
    private = [p for p in settings.keys_dir.rglob("*") if p.is_file() and _is_private(p)]
    if settings.server.tls_key is not None and settings.server.tls_key.is_file():
        private.append(settings.server.tls_key)
    for path in sorted(set(private)):
        if _mode(path) & 0o077:
            problems.append(f"{path} is {_mode(path):04o} (chmod 600 {path})")
    for path in settings.keys_dir.rglob("*"):
        if path.is_file() and not _is_private(path) and _mode(path) & 0o022:
            problems.append(f"{path} is writable by others ({_mode(path):04o})")
    if problems:
        return Check("modes", "fail", "; ".join(problems))
    return Check("modes", "ok", "home, keys and data private; key files 0600")


def _tls_settings(settings: Settings) -> Check:
    server = settings.server
    try:
        require_peer_tls(server)
        peer = server_ssl_context(server, host=server.listen_address[0])
        api_ssl_context(server, host=server.api_listen_address[0])
        if server.peer_url is not None:
            client_ssl_context(server, peer_url=server.peer_url)
    except GatewayError as exc:
        return Check("tls-settings", "fail", exc.message)
    if peer is None:
        what = "insecure_http = true" if server.insecure_http else "loopback only"
        return Check("tls-settings", "ok", f"plain HTTP ({what}); no TLS configured")
    mutual = "mutual TLS" if server.tls_ca is not None else "TLS without client certificates"
    return Check("tls-settings", "ok", mutual)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (checked before opening: opening would create it)."""

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


def _database(settings: Settings, now: datetime) -> list[Check]:

    where = _safe_url(settings.database_url)
    sqlite_file = _sqlite_file(settings.database_url)
    if sqlite_file is not None and not sqlite_file.is_file():
        return [Check("database", "fail", f"{sqlite_file} does not exist ('gateway init'?)")]
    try:
        node = Node.open(settings)
    except GatewayError as exc:
        return [Check("database", "fail", f"{where}: {exc.message}")]
    except Exception as exc:  # noqa: BLE001 - a driver error is reported, not raised
        return [Check("database", "fail", f"{where}: unreachable ({type(exc).__name__})")]
    checks = [Check("database", "ok", f"{where}: reachable, schema current, node {node.node_id}")]
    try:
        with node.db.transaction() as session:
            try:
                manifest = own_manifest(session)
            except GatewayError as exc:
                manifest = None
                checks.append(Check("keys", "fail", exc.message))
            pinned = pinned_peer_manifest(session)
    except GatewayError as exc:
        return [*checks, Check("keys", "fail", exc.message)]
    finally:
        node.close()
    if manifest is not None:
        left = manifest.expires_at - now
        if left.total_seconds() <= 0:
            checks.append(
                Check("keys", "fail", f"our key manifest expired at {manifest.expires_at}")
            )
        elif left < EXPIRY_WARNING:
            checks.append(
                Check(
                    "keys",
                    "warn",
                    f"our key manifest version {manifest.version} expires in {left.days} "
                    "day(s): 'gateway keys rotate'",
                )
            )
        else:
            checks.append(
                Check("keys", "ok", f"our key manifest version {manifest.version}, valid")
            )
    if pinned is None:
        checks.append(Check("peer", "warn", "no peer manifest pinned yet: 'gateway peer add'"))
    else:
        checks.append(
            Check("peer", "ok", f"peer {pinned.node} manifest version {pinned.version} pinned")
        )
    return checks


def _policy(settings: Settings) -> Check:

    try:
        policy = load_policy(settings)
    except GatewayError as exc:
        return Check("policy", "fail", exc.message)
    window = policy.limits.clock_skew.total_seconds()
    return Check("policy", "ok", f"loaded from {settings.policy_dir} (clock skew {window:.0f} s)")


def examine_home(home: Path, environ: Mapping[str, str], *, now: datetime) -> DoctorReport:
    """Run every check on the node at ``home``; never raises for what it finds.

    ``now`` is the time certificates and manifests are judged at.
    """
    try:
        settings = load_settings(home, environ=environ)
    except GatewayError as exc:
        return DoctorReport(home, [Check("settings", "fail", exc.message)])
    checks = [
        Check("settings", "ok", f"node {settings.node_id}, {home / CONFIG_FILE}"),
        _tls_settings(settings),
        _modes(settings),
    ]
    server = settings.server
    if server.tls_cert is not None and server.tls_key is not None:
        checks += [
            Check(c.name, c.status, c.detail)
            for c in check_node_certificate(
                server.tls_cert,
                server.tls_key,
                server.tls_ca,
                now=now,
                names=names_to_check(server.listen_address[0]),
            )
        ]
    checks += _database(settings, now)
    checks.append(_policy(settings))
    return DoctorReport(home, checks)
