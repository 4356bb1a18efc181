"""The encrypted keystore under the node home's ``keys/`` directory.

Two kinds of file, one format:

- ``root-<key id>.key``: the root Ed25519 seed. Only certifies manifests; an
  administrator may move it to offline media between ceremonies.
- ``operational.key``: the operational private keys (Ed25519 signing seeds,
  X25519 private keys, old encryption keys kept to read old data).

A file is canonical JSON::

    {"format": "ssw-gateway/keystore/v1", "kind": "root"|"operational",
     "node": "jp", "key_ids": [...],
     "kdf": {"alg": "argon2id13", "opslimit": N, "memlimit": N, "salt": b64},
     "aead": "xchacha20poly1305-ietf", "nonce": b64, "ciphertext": b64}

The key is Argon2id(passphrase, salt, opslimit, memlimit); the cipher is
XChaCha20-Poly1305 with every header field except ``ciphertext`` bound as
associated data under ``Purpose.KEYSTORE``, so a file cannot be relabelled
(kind, node, key ids) or weakened (KDF limits) without failing to open. The
plaintext names its kind and node again and every private key is checked
against its key id after opening. Files are written atomically (temp file,
fsync, rename, fsync of the directory) with mode 0600.

The Argon2id cost of a new file comes from ``GATEWAY_KEYSTORE_STRENGTH``
(``moderate`` by default; ``interactive`` or ``min`` for tests and demos);
each file records its own limits, and reading refuses limits outside
libsodium's range so a crafted file cannot demand unbounded memory.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.pwhash
import nacl.signing
import nacl.utils

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.domain import Purpose, tagged
from gateway.core.keys import key_id
from gateway.errors import ConfigError, GatewayError, InvalidInput
from gateway.files import sync_folder
from gateway.log import get_logger
from gateway.node.passphrase import (
    MIN_PASSPHRASE_BYTES,
    check_new_passphrase,
    obtain_passphrase,
    passphrase_source,
    read_passphrase,
)

__all__ = [
    "KEYSTORE_FORMAT",
    "MIN_PASSPHRASE_BYTES",
    "OPERATIONAL_FILE",
    "STRENGTHS",
    "KeystoreCorrupt",
    "KeystoreLocked",
    "OperationalKeys",
    "check_new_passphrase",
    "obtain_passphrase",
    "passphrase_source",
    "read_operational",
    "read_passphrase",
    "read_root",
    "root_file_name",
    "root_limits",
    "strength_from_environ",
    "write_operational",
    "write_root",
]

KEYSTORE_FORMAT = "ssw-gateway/keystore/v1"
OPERATIONAL_FILE = "operational.key"
MAX_FILE_BYTES = 256 * 1024
FILE_MODE = 0o600
_SALT_BYTES = nacl.pwhash.argon2id.SALTBYTES
_NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES

Strength = Literal["min", "interactive", "moderate", "sensitive"]
STRENGTHS: dict[str, tuple[int, int]] = {
    "min": (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN),
    "interactive": (
        nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
        nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
    ),
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "sensitive": (
        nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE,
        nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE,
    ),
}
_OPS_RANGE = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE)
_MEM_RANGE = (nacl.pwhash.argon2id.MEMLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE)

_log = get_logger("keystore")


class KeystoreLocked(GatewayError):
    """The passphrase does not open a key file (or the file was altered)."""

    reason = "keystore.passphrase"


class KeystoreCorrupt(GatewayError):
    """A key file is malformed, truncated, or holds keys that do not match."""

    reason = "keystore.corrupt"


def strength_from_environ(environ: Mapping[str, str]) -> Strength:
    """The Argon2id cost for new key files (``GATEWAY_KEYSTORE_STRENGTH``)."""
    value = environ.get("GATEWAY_KEYSTORE_STRENGTH", "moderate")
    if value not in STRENGTHS:
        raise ConfigError(
            f"GATEWAY_KEYSTORE_STRENGTH must be one of {', '.join(STRENGTHS)}, not {value!r}",
            reason="config.value",
        )
    return value  # type: ignore[return-value]


# -- file format --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, path: Path) -> bytes:
    if not isinstance(value, str):
        raise KeystoreCorrupt(f"key file {path} is corrupt: {what} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeystoreCorrupt(f"key file {path} is corrupt: {what} is not base64") from None


def _derive(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return bytes(nacl.pwhash.argon2id.kdf(_KEY_BYTES, passphrase, salt, opslimit, memlimit))


def _associated(header: Mapping[str, Any]) -> bytes:
    return tagged(Purpose.KEYSTORE, canonical_bytes(dict(header)))


def _seal_file(
    *,
    kind: str,
    node: str,
    key_ids: list[str],
    plaintext: bytes,
    passphrase: bytes,
    opslimit: int,
    memlimit: int,
) -> bytes:
    salt = nacl.utils.random(_SALT_BYTES)
    nonce = nacl.utils.random(_NONCE_BYTES)
    header: dict[str, Any] = {
        "format": KEYSTORE_FORMAT,
        "kind": kind,
        "node": node,
        "key_ids": key_ids,
        "kdf": {
            "alg": "argon2id13",
            "opslimit": opslimit,
            "memlimit": memlimit,
            "salt": _b64(salt),
        },
        "aead": "xchacha20poly1305-ietf",
        "nonce": _b64(nonce),
    }
    key = _derive(passphrase, salt, opslimit, memlimit)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _associated(header), nonce, key
    )
    return canonical_bytes({**header, "ciphertext": _b64(ciphertext)})


@dataclass(frozen=True)
class _Opened:
    header: dict[str, Any]
    plaintext: bytes


def _open_file(path: Path, passphrase: bytes, *, kind: str, node: str) -> _Opened:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} is missing", reason="keystore.missing") from None
    except OSError as exc:
        raise ConfigError(
            f"key file {path} cannot be read: {exc.strerror}", reason="keystore.unreadable"
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise KeystoreCorrupt(f"key file {path} is corrupt: larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = parse_canonical(data, max_bytes=MAX_FILE_BYTES, max_depth=4)
    except InvalidInput as exc:
        raise KeystoreCorrupt(f"key file {path} is corrupt: {exc.message}") from None
    expected = {"format", "kind", "node", "key_ids", "kdf", "aead", "nonce", "ciphertext"}
    if not isinstance(doc, dict) or set(doc) != expected:
        raise KeystoreCorrupt(f"key file {path} is corrupt: unexpected fields")
    if doc["format"] != KEYSTORE_FORMAT or doc["aead"] != "xchacha20poly1305-ietf":
        raise KeystoreCorrupt(f"key file {path} is not a {KEYSTORE_FORMAT} file")
    if doc["kind"] != kind:
        raise KeystoreCorrupt(f"key file {path} holds {doc['kind']!r} keys, not {kind!r}")
    if doc["node"] != node:
        raise KeystoreCorrupt(f"key file {path} belongs to node {doc['node']!r}, not {node!r}")
    kdf = doc["kdf"]
    if not isinstance(kdf, dict) or set(kdf) != {"alg", "opslimit", "memlimit", "salt"}:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad kdf parameters")
    opslimit, memlimit = kdf["opslimit"], kdf["memlimit"]
    if (
        kdf["alg"] != "argon2id13"
        or not isinstance(opslimit, int)
        or not isinstance(memlimit, int)
        or isinstance(opslimit, bool)
        or isinstance(memlimit, bool)
        or not _OPS_RANGE[0] <= opslimit <= _OPS_RANGE[1]
        or not _MEM_RANGE[0] <= memlimit <= _MEM_RANGE[1]
    ):
        raise KeystoreCorrupt(f"key file {path} is corrupt: Argon2id limits out of range")
    salt = _unb64(kdf["salt"], "salt", path)
    nonce = _unb64(doc["nonce"], "nonce", path)
    ciphertext = _unb64(doc["ciphertext"], "ciphertext", path)
    if len(salt) != _SALT_BYTES or len(nonce) != _NONCE_BYTES:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad salt or nonce length")
    header = {k: v for k, v in doc.items() if k != "ciphertext"}
    key = _derive(passphrase, salt, opslimit, memlimit)
    try:
        plaintext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, _associated(header), nonce, key
        )
    except nacl.exceptions.CryptoError:
        raise KeystoreLocked(
            f"cannot open key file {path}: wrong passphrase, or the file was altered"
        ) from None
    return _Opened(header=header, plaintext=bytes(plaintext))


def _write_atomic(path: Path, data: bytes) -> None:
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = directory / f".{path.name}.{nacl.utils.random(6).hex()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    sync_folder(directory)


def _limits(strength: Strength | tuple[int, int]) -> tuple[int, int]:
    if isinstance(strength, tuple):
        return strength
    return STRENGTHS[strength]


# -- root key -----------------------------------------------------------------------------


def root_file_name(root_key_id: str) -> str:
    return f"root-{root_key_id}.key"


def write_root(
    path: Path,
    root: nacl.signing.SigningKey,
    *,
    node: str,
    passphrase: bytes,
    strength: Strength | tuple[int, int],
) -> None:
    """Write the root seed encrypted to ``path`` (atomic, 0600)."""
    kid = key_id(bytes(root.verify_key))
    plaintext = canonical_bytes(
        {"kind": "root", "node": node, "key_id": kid, "seed": _b64(bytes(root))}
    )
    ops, mem = _limits(strength)
    data = _seal_file(
        kind="root",
        node=node,
        key_ids=[kid],
        plaintext=plaintext,
        passphrase=passphrase,
        opslimit=ops,
        memlimit=mem,
    )
    _write_atomic(path, data)
    _log.info("key_file_written", kind="root", key_id=kid, path=str(path))


def root_limits(path: Path, passphrase: bytes, *, node: str) -> tuple[int, int]:
    """The Argon2id limits a root key file was written with (it is opened to check them)."""
    opened = _open_file(path, passphrase, kind="root", node=node)
    return int(opened.header["kdf"]["opslimit"]), int(opened.header["kdf"]["memlimit"])


def read_root(
    path: Path, passphrase: bytes, *, node: str, expected_key_id: str
) -> nacl.signing.SigningKey:
    """Open a root key file and check it holds the root ``expected_key_id``."""
    opened = _open_file(path, passphrase, kind="root", node=node)
    try:
        body = parse_canonical(opened.plaintext, max_bytes=MAX_FILE_BYTES, max_depth=2)
    except InvalidInput:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad plaintext") from None
    if not isinstance(body, dict) or set(body) != {"kind", "node", "key_id", "seed"}:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad plaintext")
    if body["kind"] != "root" or body["node"] != node:
        raise KeystoreCorrupt(f"key file {path} is corrupt: kind or node differ inside")
    seed = _unb64(body["seed"], "seed", path)
    if len(seed) != 32:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad seed length")
    root = nacl.signing.SigningKey(seed)
    kid = key_id(bytes(root.verify_key))
    if kid != body["key_id"] or [kid] != opened.header["key_ids"]:
        raise KeystoreCorrupt(f"key file {path} is corrupt: the key does not match its id")
    if kid != expected_key_id:
        raise KeystoreCorrupt(
            f"key file {path} holds root {kid}, but the node's current root is {expected_key_id}"
        )
    return root


# -- operational keys ---------------------------------------------------------------------


@dataclass
class OperationalKeys:
    """Private operational keys by key id (in memory only; ``repr`` names ids only)."""

    signing: dict[str, nacl.signing.SigningKey]
    encryption: dict[str, nacl.public.PrivateKey]
    opslimit: int
    memlimit: int

    def __repr__(self) -> str:
        return (
            f"OperationalKeys(signing={sorted(self.signing)!r}, "
            f"encryption={sorted(self.encryption)!r})"
        )

    __str__ = __repr__


def write_operational(
    path: Path,
    keys: OperationalKeys,
    *,
    node: str,
    passphrase: bytes,
) -> None:
    """Write every operational private key encrypted to ``path`` (atomic, 0600)."""
    entries = [
        {"key_id": kid, "use": "sign", "private": _b64(bytes(k))}
        for kid, k in sorted(keys.signing.items())
    ] + [
        {"key_id": kid, "use": "encrypt", "private": _b64(bytes(k))}
        for kid, k in sorted(keys.encryption.items())
    ]
    ids = [str(e["key_id"]) for e in entries]
    plaintext = canonical_bytes({"kind": "operational", "node": node, "keys": entries})
    data = _seal_file(
        kind="operational",
        node=node,
        key_ids=ids,
        plaintext=plaintext,
        passphrase=passphrase,
        opslimit=keys.opslimit,
        memlimit=keys.memlimit,
    )
    _write_atomic(path, data)
    _log.info("key_file_written", kind="operational", key_ids=ids, path=str(path))


def read_operational(path: Path, passphrase: bytes, *, node: str) -> OperationalKeys:
    """Open the operational key file; every key is checked against its id."""
    opened = _open_file(path, passphrase, kind="operational", node=node)
    try:
        body = parse_canonical(opened.plaintext, max_bytes=MAX_FILE_BYTES, max_depth=3)
    except InvalidInput:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad plaintext") from None
    if not isinstance(body, dict) or set(body) != {"kind", "node", "keys"}:
        raise KeystoreCorrupt(f"key file {path} is corrupt: bad plaintext")
    if body["kind"] != "operational" or body["node"] != node or not isinstance(body["keys"], list):
        raise KeystoreCorrupt(f"key file {path} is corrupt: kind or node differ inside")
    result = OperationalKeys(
        signing={},
        encryption={},
        opslimit=opened.header["kdf"]["opslimit"],
        memlimit=opened.header["kdf"]["memlimit"],
    )
    ids: list[str] = []
    for entry in body["keys"]:
        if not isinstance(entry, dict) or set(entry) != {"key_id", "use", "private"}:
            raise KeystoreCorrupt(f"key file {path} is corrupt: bad key entry")
        raw = _unb64(entry["private"], "private key", path)
        if len(raw) != 32:
            raise KeystoreCorrupt(f"key file {path} is corrupt: bad private key length")
        if entry["use"] == "sign":
            signing = nacl.signing.SigningKey(raw)
            kid = key_id(bytes(signing.verify_key))
            result.signing[kid] = signing
        elif entry["use"] == "encrypt":
            private = nacl.public.PrivateKey(raw)
            kid = key_id(bytes(private.public_key))
            result.encryption[kid] = private
        else:
            raise KeystoreCorrupt(f"key file {path} is corrupt: unknown key use")
        if kid != entry["key_id"]:
            raise KeystoreCorrupt(f"key file {path} is corrupt: a key does not match its id")
        ids.append(kid)
    if ids != opened.header["key_ids"]:
        raise KeystoreCorrupt(f"key file {path} is corrupt: key ids differ from the header")
    return result
