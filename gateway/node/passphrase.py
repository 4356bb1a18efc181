"""The keystore passphrase: where a command gets it, and the rules it must meet.

Kept apart from :mod:`gateway.node.keystore` (which needs libsodium) so the
command line can set :data:`passphrase_source` and read a passphrase without
loading the crypto layer; the keystore re-exports every name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path

from gateway.errors import ConfigError, InvalidInput

__all__ = [
    "MAX_PASSPHRASE_BYTES",
    "MIN_PASSPHRASE_BYTES",
    "PassphraseSource",
    "check_new_passphrase",
    "obtain_passphrase",
    "passphrase_source",
    "read_passphrase",
]

MIN_PASSPHRASE_BYTES = 12
MAX_PASSPHRASE_BYTES = 4096

PassphraseSource = Callable[[bool], bytes]
passphrase_source: ContextVar[PassphraseSource | None] = ContextVar(
    "passphrase_source", default=None
)
"""Set by the CLI so that ``gateway init`` (which runs init steps without a
context object) reads the passphrase the same way every other command does."""


def _read_passphrase_file(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"passphrase file {path} may be read by other users: "
                f"restrict it with 'chmod 600 {path}'",
                reason="keystore.passphrase-file",
            )
        with path.open("rb") as handle:
            data = handle.read(MAX_PASSPHRASE_BYTES + 3)
    except FileNotFoundError:
        raise ConfigError(
            f"passphrase file {path} does not exist", reason="keystore.passphrase-file"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"passphrase file {path} cannot be read: {exc.strerror}",
            reason="keystore.passphrase-file",
        ) from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    return data


def read_passphrase(
    environ: Mapping[str, str],
    passphrase_file: Path | None,
    *,
    prompt: bool,
    new: bool = False,
) -> bytes:
    """The keystore passphrase: ``--passphrase-file``, else ``GATEWAY_PASSPHRASE``,
    else a prompt on the terminal (asked twice when ``new``), else refuse."""
    if passphrase_file is not None:
        passphrase = _read_passphrase_file(passphrase_file)
    elif environ.get("GATEWAY_PASSPHRASE"):
        passphrase = environ["GATEWAY_PASSPHRASE"].encode("utf-8")
    elif prompt and sys.stdin.isatty():
        import getpass  # noqa: PLC0415 - only a prompt needs the terminal module

        first = getpass.getpass("New keystore passphrase: " if new else "Keystore passphrase: ")
        if new:
            again = getpass.getpass("Repeat the passphrase: ")
            if again != first:
                raise InvalidInput("the two passphrases differ; nothing was changed")
        passphrase = first.encode("utf-8")
    else:
        raise ConfigError(
            "no keystore passphrase: set GATEWAY_PASSPHRASE, pass --passphrase-file FILE, "
            "or run on a terminal to be asked",
            reason="keystore.no-passphrase",
        )
    if not passphrase:
        raise ConfigError("the keystore passphrase is empty", reason="keystore.no-passphrase")
    if len(passphrase) > MAX_PASSPHRASE_BYTES:
        raise ConfigError(
            f"the keystore passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes",
            reason="keystore.no-passphrase",
        )
    if new:
        check_new_passphrase(passphrase)
    return passphrase


def check_new_passphrase(passphrase: bytes) -> None:
    """Refuse a passphrase too short to protect keys at rest."""
    if len(passphrase) < MIN_PASSPHRASE_BYTES:
        raise InvalidInput(
            f"the keystore passphrase must be at least {MIN_PASSPHRASE_BYTES} bytes long"
        )


def obtain_passphrase(environ: Mapping[str, str], *, new: bool) -> bytes:
    """The passphrase from the CLI's source when one is set, else from ``environ``."""
    source = passphrase_source.get()
    if source is not None:
        passphrase = source(new)
        if new:
            check_new_passphrase(passphrase)
        return passphrase
    return read_passphrase(environ, None, prompt=True, new=new)
