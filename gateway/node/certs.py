"""The node's TLS certificate checked offline: validity, key match, usages, names, CA.

Used by ``gateway init --tls-cert/--tls-key/--tls-ca`` (refuses material that
fails) and ``gateway doctor`` (reports it). Files are read bounded; nothing of
a private key is ever put into a message.

A node's certificate serves the peer port and is presented as the client
certificate to the peer, so it needs both extended key usages, ``serverAuth``
and ``clientAuth`` (docs/operations.md), and a subject alternative name for
the host it listens on when that is a specific name or address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.settings import is_loopback

__all__ = [
    "EXPIRY_WARNING",
    "MAX_PEM_BYTES",
    "CertCheck",
    "check_node_certificate",
    "names_to_check",
]

MAX_PEM_BYTES: Final = 1024 * 1024
EXPIRY_WARNING: Final = timedelta(days=30)
"""A certificate expiring sooner than this is reported as a warning."""

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class CertCheck:
    """One finding: ``name`` (``tls-cert``, ``tls-key``...), status and one line."""

    name: str
    status: Status
    detail: str


def _read(path: Path, what: str) -> bytes | CertCheck:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        return CertCheck(what, "fail", f"{path}: cannot be read ({exc.strerror})")
    if len(data) > MAX_PEM_BYTES:
        return CertCheck(what, "fail", f"{path}: larger than {MAX_PEM_BYTES} bytes")
    return data


def _certificates(path: Path, what: str) -> list[x509.Certificate] | CertCheck:
    data = _read(path, what)
    if isinstance(data, CertCheck):
        return data
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        return CertCheck(what, "fail", f"{path}: not a PEM certificate")
    return found


def names_to_check(listen_host: str) -> list[str]:
    """The host names the certificate must carry: the listen host, unless it is a
    wildcard or loopback address (then the peer reaches the node through a name
    only its ``peer_url`` knows, which ``gateway peer ping`` there checks)."""
    if listen_host in ("", "0.0.0.0", "::", "*") or is_loopback(listen_host):  # noqa: S104
        return []
    return [listen_host]


def _san_matches(cert: x509.Certificate, name: str) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        return address in sans.get_values_for_type(x509.IPAddress)
    wanted = name.lower().rstrip(".")
    for dns in sans.get_values_for_type(x509.DNSName):
        pattern = dns.lower().rstrip(".")
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _validity(cert: x509.Certificate, path: Path, now: datetime) -> CertCheck:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return CertCheck("tls-cert", "fail", f"{path}: not valid before {start.isoformat()}")
    if now >= end:
        return CertCheck("tls-cert", "fail", f"{path}: expired at {end.isoformat()}")
    if end - now < EXPIRY_WARNING:
        left = end - now
        when = f"{left.days} day(s)" if left.days else f"{left.seconds // 3600} hour(s)"
        return CertCheck(
            "tls-cert", "warn", f"{path}: expires in {when} ({end.isoformat()}): renew it"
        )
    return CertCheck("tls-cert", "ok", f"{path}: valid until {end.isoformat()}")


def _key_match(cert: x509.Certificate, key_path: Path) -> CertCheck:
    data = _read(key_path, "tls-key")
    if isinstance(data, CertCheck):
        return data
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return CertCheck("tls-key", "fail", f"{key_path}: not an unencrypted PEM private key")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, public)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER, public)
    if ours != theirs:
        return CertCheck(
            "tls-key", "fail", f"{key_path}: does not belong to the certificate (key mismatch)"
        )
    return CertCheck("tls-key", "ok", f"{key_path}: matches the certificate")


def _usages(cert: x509.Certificate) -> CertCheck:
    problems: list[str] = []
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        for oid, label in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        ):
            if oid not in eku:
                problems.append(f"extended key usage lacks {label}")
    except x509.ExtensionNotFound:
        pass  # no restriction: any usage
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            problems.append("key usage lacks digitalSignature")
    except x509.ExtensionNotFound:
        pass
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            problems.append("it is a CA certificate, not a node certificate")
    except x509.ExtensionNotFound:
        pass
    if problems:
        return CertCheck("tls-usage", "fail", "; ".join(problems))
    return CertCheck("tls-usage", "ok", "serves and authenticates as a client")


def _names(cert: x509.Certificate, names: list[str]) -> CertCheck:
    if not names:
        return CertCheck(
            "tls-names",
            "ok",
            "listening on a wildcard or loopback address: the peer checks the name in its "
            "peer_url ('gateway peer ping' there)",
        )
    missing = [name for name in names if not _san_matches(cert, name)]
    if missing:
        return CertCheck(
            "tls-names",
            "fail",
            f"subject alternative names do not include {', '.join(missing)} "
            "([server] listen); the peer's TLS check would refuse it",
        )
    return CertCheck("tls-names", "ok", f"names {', '.join(names)}")


def _issued_by(cert: x509.Certificate, ca_path: Path) -> CertCheck:
    found = _certificates(ca_path, "tls-ca")
    if isinstance(found, CertCheck):
        return found
    if not found:
        return CertCheck("tls-ca", "fail", f"{ca_path}: holds no certificate")
    for ca in found:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return CertCheck(
            "tls-ca", "ok", f"{ca_path}: {len(found)} certificate(s), ours is issued by one"
        )
    return CertCheck(
        "tls-ca",
        "warn",
        f"{ca_path}: our certificate is not issued by a CA in it; fine only if the peer's "
        "tls_ca holds our CA (a bundle of both sides' CAs)",
    )


def check_node_certificate(
    cert_path: Path,
    key_path: Path,
    ca_path: Path | None,
    *,
    now: datetime,
    names: list[str],
) -> list[CertCheck]:
    """Every finding on the node's TLS material, in a fixed order.

    ``now`` is the time validity is judged at; ``names`` the host names the
    certificate must carry (:func:`names_to_check`). Never raises for bad
    material: each problem is a ``fail`` finding naming the file.
    """
    found = _certificates(cert_path, "tls-cert")
    if isinstance(found, CertCheck):
        return [found]
    if not found:
        return [CertCheck("tls-cert", "fail", f"{cert_path}: holds no certificate")]
    leaf = found[0]
    checks = [
        _validity(leaf, cert_path, now),
        _key_match(leaf, key_path),
        _usages(leaf),
        _names(leaf, names),
    ]
    if ca_path is not None:
        checks.append(_issued_by(leaf, ca_path))
    return checks
