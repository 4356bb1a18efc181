"""TLS for the peer link: server and client contexts from the node settings.

``[server] tls_cert`` / ``tls_key`` are this node's certificate chain and key,
used as the server certificate and, by the client, as its client certificate.
``tls_ca`` is the certificate authority the peer's certificates are checked
against: when set, the server *requires* a client certificate from it (mutual
TLS) and the client verifies the server against it instead of the system store.

Plain HTTP is allowed only where nothing leaves the machine (a loopback listen
address or peer URL) or when ``insecure_http = true`` says so explicitly; the
caller logs a warning in that case. Anything else refuses to start.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from gateway.errors import ConfigError
from gateway.settings import ServerSettings, is_loopback

__all__ = [
    "api_ssl_context",
    "client_ssl_context",
    "listener_url",
    "plain_http_allowed",
    "require_peer_tls",
    "server_ssl_context",
]


def _check_pair(server: ServerSettings) -> tuple[Path, Path] | None:
    cert, key = server.tls_cert, server.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(
            "[server] tls_cert and tls_key must be given together", reason="config.tls"
        )
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if not path.is_file():
            raise ConfigError(
                f"[server] {name}: {path} is not a readable file", reason="config.tls"
            )
    return cert, key


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"[server] tls_cert/tls_key: cannot load the certificate and key "
            f"({type(exc).__name__}: {getattr(exc, 'reason', None) or 'unreadable'})",
            reason="config.tls",
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    if not ca.is_file():
        raise ConfigError(f"[server] tls_ca: {ca} is not a readable file", reason="config.tls")
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"[server] tls_ca: cannot load the CA certificate ({type(exc).__name__})",
            reason="config.tls",
        ) from None


def require_peer_tls(server: ServerSettings) -> None:
    """Refuse an ``https://`` peer URL without this node's TLS certificate and key.

    Without them the node has no client certificate for the peer's mutual TLS
    and serves its own port in plain HTTP: a configuration that looks secure
    and is not. ``insecure_http = true`` accepts it explicitly. ``gateway init``
    and ``gateway serve`` call this; raises :class:`ConfigError` (``config.tls``).
    """
    url = server.peer_url
    if url is None or not url.startswith("https://") or server.insecure_http:
        return
    if server.tls_cert is None or server.tls_key is None:
        raise ConfigError(
            f"[server] peer_url {url} is https:// but this node has no TLS certificate: "
            "give 'gateway init' --tls-cert, --tls-key and --tls-ca (or set [server] "
            "tls_cert, tls_key and tls_ca), or set insecure_http = true to go without",
            reason="config.tls",
        )


def listener_url(host: str, port: int, *, tls: bool) -> str:
    """The full URL of a listener, scheme included (``https://[::1]:8701``)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def plain_http_allowed(host: str, server: ServerSettings) -> bool:
    """True when plain HTTP to or from ``host`` is acceptable under ``server``."""
    return is_loopback(host) or server.insecure_http


def server_ssl_context(server: ServerSettings, *, host: str) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP where that is allowed.

    Raises :class:`ConfigError` when TLS is half configured or when plain HTTP
    is asked for on a non-loopback address without ``insecure_http``.
    """
    pair = _check_pair(server)
    if pair is None:
        if server.tls_ca is not None:
            raise ConfigError(
                "[server] tls_ca is set but tls_cert/tls_key are not: mutual TLS needs all three",
                reason="config.tls",
            )
        if not plain_http_allowed(host, server):
            raise ConfigError(
                f"refusing plain HTTP on {host}, which is not a loopback address: "
                "set [server] tls_cert and tls_key (and tls_ca for mutual TLS), "
                "or insecure_http = true to accept the risk",
                reason="config.tls",
            )
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    _load_chain(context, *pair)
    if server.tls_ca is not None:
        _load_ca(context, server.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def api_ssl_context(server: ServerSettings, *, host: str) -> ssl.SSLContext | None:
    """TLS for the local user API: the node's certificate, no client certificate
    (users authenticate with tokens); plain HTTP under the same rule as the peer port."""
    pair = _check_pair(server)
    if pair is None:
        if not plain_http_allowed(host, server):
            raise ConfigError(
                f"refusing plain HTTP for the local API on {host}, which is not a loopback "
                "address: set [server] tls_cert and tls_key, or insecure_http = true",
                reason="config.tls",
            )
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    _load_chain(context, *pair)
    return context


def client_ssl_context(server: ServerSettings, *, peer_url: str) -> ssl.SSLContext | None:
    """The client's TLS context for ``peer_url``; None for an allowed ``http://`` URL."""
    parts = urlsplit(peer_url)
    host = parts.hostname or ""
    if parts.scheme == "http":
        if not plain_http_allowed(host, server):
            raise ConfigError(
                f"refusing plain HTTP to {host}, which is not a loopback address: "
                "use an https:// peer URL, or insecure_http = true to accept the risk",
                reason="config.tls",
            )
        return None
    if parts.scheme != "https":
        raise ConfigError(f"peer URL scheme {parts.scheme!r} is not http or https")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if server.tls_ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, server.tls_ca)
    pair = _check_pair(server)
    if pair is not None:
        _load_chain(context, *pair)
    return context
