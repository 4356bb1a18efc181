"""Creating a node home: configuration, directories, database.

``init_node`` is all-or-nothing: if any step fails, what it created is removed
again, and a home that holds a node already is never touched.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import gateway
from gateway.errors import AlreadyExists, ConfigError, StorageError
from gateway.files import sync_file, sync_folder, sync_folders
from gateway.node.certs import check_node_certificate, names_to_check
from gateway.node.users import add_user
from gateway.settings import CONFIG_FILE, Settings, load_settings, parse_host_port, write_config
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord
from gateway.tls import require_peer_tls

__all__ = ["TLS_DIR", "InitResult", "InitStep", "TlsFiles", "init_node", "register_init_step"]

HOME_MODE = 0o700


@dataclass
class InitResult:
    """What ``gateway init`` made, to print for the administrator."""

    home: Path
    node_id: str
    config_path: Path
    database_url: str
    migrations: list[str]
    made: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    admin_name: str = ""
    admin_token: str = field(default="", repr=False)
    environ: dict[str, str] = field(default_factory=dict, repr=False)
    """The environment ``init_node`` was given (steps read e.g. the passphrase from it)."""


InitStep = Callable[[Settings, Session, datetime, InitResult], None]
"""A later stage of node creation (keys, first admin user): gets the loaded
settings, the open transaction that also records the node row (so a failing
stage leaves no row behind), the time, and the result to add what it made to."""

_STEPS: list[tuple[int, str, InitStep]] = []

INIT_STEP_MODULES = ("gateway.node.own_keys", "gateway.node.policy")
"""Modules whose import registers a stage of ``init_node`` (:func:`register_init_step`);
``init_node`` imports them itself, so whoever calls it gets every stage."""


def register_init_step(order: int, name: str, step: InitStep) -> None:
    """Register a stage of ``init_node``; stages run by ascending ``order``."""
    if any(existing == name for _, existing, _ in _STEPS):
        return
    _STEPS.append((order, name, step))
    _STEPS.sort(key=lambda item: item[0])


def _validate_inputs(node_id: str, listen: str | None, peer_url: str | None) -> None:
    if node_id not in ("jp", "pk"):
        raise ConfigError(f"node must be 'jp' or 'pk', not {node_id!r}", reason="config.node")
    if listen is not None:
        try:
            parse_host_port(listen)
        except ValueError as exc:
            raise ConfigError(f"--listen: {exc}", reason="config.value") from None
    if peer_url is not None and not peer_url.startswith(("http://", "https://")):
        raise ConfigError("--peer-url must start with http:// or https://", reason="config.value")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The node's TLS material given to ``init``: certificate chain, key, and the CA
    the peer's certificates are checked against (None: the system's CAs)."""

    cert: Path
    key: Path
    ca: Path | None = None


TLS_DIR = "keys/tls"
"""Where ``init`` copies the TLS material, relative to the home (settings name it so)."""


def _check_tls(tls: TlsFiles, listen_host: str, now: datetime) -> None:
    """Refuse TLS material that fails an offline check (init then removes what it made)."""

    names = names_to_check(listen_host)
    checks = check_node_certificate(tls.cert, tls.key, tls.ca, now=now, names=names)
    failed = [f"{check.name}: {check.detail}" for check in checks if check.status == "fail"]
    if failed:
        raise ConfigError(
            "the TLS material given is not usable: " + "; ".join(failed), reason="config.tls"
        )


def _copy_private(source: Path, target: Path, mode: int) -> None:
    """Copy a file into the home with ``mode``, synced (its folder is synced after the
    copies); never overwrites."""
    data = source.read_bytes()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        sync_file(handle)
    target.chmod(mode)


def _sqlite_folder(db: Database) -> list[Path]:
    """The folder of the database's SQLite file (none for PostgreSQL or in memory)."""
    url = db.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return []
    return [Path(url.database).absolute().parent]


def _install_tls(home: Path, tls: TlsFiles) -> dict[str, str]:
    """Copy the TLS material to ``<home>/keys/tls``; the settings that name it."""
    folder = home / TLS_DIR
    folder.mkdir(mode=HOME_MODE, exist_ok=True)
    folder.chmod(HOME_MODE)
    _copy_private(tls.cert, folder / "node.crt", 0o644)
    _copy_private(tls.key, folder / "node.key", 0o600)
    settings = {"tls_cert": f"{TLS_DIR}/node.crt", "tls_key": f"{TLS_DIR}/node.key"}
    if tls.ca is not None:
        _copy_private(tls.ca, folder / "ca.crt", 0o644)
        settings["tls_ca"] = f"{TLS_DIR}/ca.crt"
    sync_folder(folder)
    return settings


def init_node(
    home: Path,
    node_id: str,
    *,
    now: datetime,
    listen: str | None = None,
    api_listen: str | None = None,
    peer_url: str | None = None,
    db_url: str | None = None,
    admin_name: str = "admin",
    policy_dir: Path | None = None,
    environ: dict[str, str] | None = None,
    tls: TlsFiles | None = None,
    insecure_http: bool = False,
) -> InitResult:
    """Create a node home with its configuration and database.

    ``policy_dir`` is recorded as ``[policy] dir``: the node then reads its
    policy there instead of ``<home>/policies`` (the folder is used as it is
    when it holds ``policy.toml``, else the shipped files are copied into it).
    ``tls`` is copied into ``<home>/keys/tls`` and checked offline (validity at
    ``now``, key match, usages, the effective listen host among the names)
    (key 0600); an ``https://`` peer URL without TLS settings (flags or
    ``GATEWAY_SERVER_TLS_*``) is refused unless ``insecure_http``. Every name
    init makes is synced into its folder before the node is recorded. Raises
    :class:`ConfigError`, :class:`AlreadyExists` or :class:`StorageError` (the
    disk); leaves nothing behind then.
    """
    _validate_inputs(node_id, listen, peer_url)
    if (home / CONFIG_FILE).exists():
        raise AlreadyExists(
            f"{home} holds a node already ({CONFIG_FILE} exists); nothing was changed"
        )
    created_home = not home.exists()
    if home.exists() and not home.is_dir():
        raise ConfigError(f"{home} exists and is not a directory")
    made_paths: list[Path] = []
    missing = [p for p in (home.absolute(), *home.absolute().parents) if not os.path.lexists(p)]
    try:
        home.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
        for sub in ("keys", "data", "data/blobs"):
            path = home / sub
            if not path.exists():
                path.mkdir(mode=HOME_MODE)
                made_paths.append(path)
            path.chmod(HOME_MODE)
        server: dict[str, Any] = {
            "listen": listen,
            "api_listen": api_listen,
            "peer_url": peer_url,
            "insecure_http": True if insecure_http else None,
        }
        if tls is not None:
            if not (home / TLS_DIR).exists():
                made_paths.append(home / TLS_DIR)  # never the user's own folder
            server |= _install_tls(home, tls)
        config_path = write_config(
            home,
            {
                "node": {"id": node_id},
                "server": server,
                "database": {"url": db_url},
                "policy": {"dir": str(policy_dir) if policy_dir is not None else None},
            },
        )
        made_paths.append(config_path)
        settings = load_settings(home, environ=environ if environ is not None else dict(os.environ))
        if tls is not None:
            _check_tls(tls, settings.server.listen_address[0], now)
        require_peer_tls(settings.server)
        db = open_database(settings.database_url)
        try:
            migrations = db.upgrade()
            result = InitResult(
                home=home,
                node_id=node_id,
                config_path=config_path,
                database_url=settings.database_url,
                migrations=migrations,
                made=[str(config_path), str(home / "keys"), str(home / "data")],
                environ=dict(environ) if environ is not None else dict(os.environ),
            )
            with db.transaction() as session:
                owners = session.scalars(select(NodeRecord.node_id)).all()
                if owners:
                    raise AlreadyExists(
                        f"the database given already belongs to node {owners[0]!r}; "
                        "each node needs its own database"
                    )
                session.add(
                    NodeRecord(
                        node_id=node_id, created_at=now, software_version=gateway.__version__
                    )
                )
                session.flush()
                for module in INIT_STEP_MODULES:
                    importlib.import_module(module)
                for _order, _name, step in _STEPS:
                    step(settings, session, now, result)
                admin = add_user(
                    session, admin_name, "admin", created_by="init", now=now, by_host=True
                )
                result.admin_name = admin.name
                result.admin_token = admin.token.text
                # The names init made, durable before the node is recorded (the key
                # files, TLS copies and policies sync their own folders): the data
                # folder, a SQLite file's folder, the home, and any folder made above it.
                sync_folders(
                    [
                        home / "data",
                        *_sqlite_folder(db),
                        home,
                        *(path.parent for path in missing),
                    ]
                )
        finally:
            db.dispose()
    except BaseException as exc:
        if created_home:
            shutil.rmtree(home, ignore_errors=True)
        else:
            for path in reversed(made_paths):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise AlreadyExists(
                f"{exc.filename} exists already; init never overwrites a file"
            ) from None
        if isinstance(exc, OSError):  # the disk or the file system, not a bug
            where = f" ({exc.filename})" if exc.filename else ""
            raise StorageError(
                f"cannot make the node home {home}: {exc.strerror or exc}{where}; nothing was kept"
            ) from None
        raise
    return result
