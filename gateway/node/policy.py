"""Loading the node policy from ``<home>/policies/policy.toml`` (or ``[policy] dir``).

The policy is validated when the node starts; a bad file is a
:class:`~gateway.errors.ConfigError` naming the file and the key
(``/srv/gw/policies/policy.toml: limits.max_attachments: ...``), so the node
never runs under rules it misread.

``gateway init`` copies the policy files shipped with the package (the
repository's ``policies/``, carried inside the wheel as package data) into the
new home (init step ``policies``, order 20), so a node home is self-contained
and its rules change only when an administrator replaces the files. A policy
folder named by ``--policy-dir``, ``GATEWAY_POLICY_DIR`` or ``[policy] dir``
that already holds ``policy.toml`` is used as it is.
"""

from __future__ import annotations

import shutil
import tomllib
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session

import gateway
from gateway.core.policy import Policy
from gateway.errors import ConfigError
from gateway.files import make_private_folders, sync_file, sync_folder
from gateway.node.setup import InitResult, register_init_step
from gateway.settings import Settings

__all__ = [
    "POLICY_FILE",
    "install_policies",
    "load_policy",
    "load_policy_file",
    "shipped_policy_dir",
]

POLICY_FILE = "policy.toml"
_MAX_POLICY_BYTES = 256 * 1024


def shipped_policy_dir() -> Path:
    """The default policy files shipped inside the ``gateway`` package.

    ``gateway/policies`` is package data: in a source checkout it is a link to
    the repository's ``policies/`` (the one source of truth), in a built wheel
    a copy of those files made at build time (``pyproject.toml``,
    ``[tool.setuptools.package-data]``). Raises :class:`ConfigError` when the
    installation lacks them.
    """
    candidate = Path(gateway.__file__).resolve().parent / "policies"
    if not (candidate / POLICY_FILE).is_file():
        raise ConfigError(
            f"the policy files shipped with the package are not found at {candidate} "
            f"(expected {POLICY_FILE}): reinstall ssw-gateway, or name a folder holding "
            "the agreed policy files with --policy-dir or GATEWAY_POLICY_DIR",
            reason="config.policy",
        )
    return candidate


def load_policy_file(path: Path) -> Policy:
    """Read and validate one policy file; errors name the file and the key."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: policy file missing (copy the agreed policy files there, "
            "or point [policy] dir / GATEWAY_POLICY_DIR at the folder holding them)",
            reason="config.policy",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read: {exc.strerror}", reason="config.policy"
        ) from None
    if len(raw) > _MAX_POLICY_BYTES:
        raise ConfigError(
            f"{path}: larger than {_MAX_POLICY_BYTES} bytes; not a policy file",
            reason="config.policy",
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", reason="config.policy") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", reason="config.policy") from None
    try:
        return Policy.from_data(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        key = ".".join(str(part) for part in first["loc"]) or "(file)"
        kind = first["type"]
        if kind == "missing":
            reason = "required key is missing"
        elif kind == "extra_forbidden":
            reason = "unknown key"
        else:
            reason = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{path}: {key}: {reason}", reason="config.policy") from None


def load_policy(settings: Settings) -> Policy:
    """The policy of the node described by ``settings``."""
    return load_policy_file(settings.policy_dir / POLICY_FILE)


def install_policies(target: Path, *, source: Path | None = None) -> list[Path]:
    """Copy the shipped policy files into ``target`` unless it holds a policy already.

    The copy is validated before anything is written, so a broken shipped file
    never lands in a home. Every file is synced, then ``target`` (and each
    folder made above it) into its parent (:mod:`gateway.files`). Returns the
    files written (empty when kept as is).
    """
    if (target / POLICY_FILE).exists():
        load_policy_file(target / POLICY_FILE)
        return []
    origin = source if source is not None else shipped_policy_dir()
    load_policy_file(origin / POLICY_FILE)
    written: list[Path] = []
    try:
        make_private_folders(target)
        for item in sorted(origin.iterdir()):
            if item.is_file() and item.suffix in (".toml", ".md"):
                destination = target / item.name
                shutil.copyfile(item, destination)
                destination.chmod(0o644)
                written.append(destination)
                with destination.open("rb+") as copied:
                    sync_file(copied)
        sync_folder(target)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot copy the policy files into {target}: {exc.strerror}", reason="config.policy"
        ) from None
    return written


def _init_step(settings: Settings, _session: Session, _now: datetime, result: InitResult) -> None:
    written = install_policies(settings.policy_dir)
    policy = load_policy(settings)
    result.made.extend(str(path) for path in written)
    result.facts["policy_version"] = policy.version


register_init_step(order=20, name="policies", step=_init_step)
