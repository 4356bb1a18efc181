"""Transport failures named by their cause: one classification for client and server.

The peer link fails in a handful of ways an operator must tell apart at once:
the peer's certificate is not from our CA, has expired or names another host;
the peer refused *our* certificate; one side speaks TLS and the other plain
HTTP; the host name does not resolve; nothing listens on the port; no answer
in time. aiohttp reports most of these as a bare class name
(``ClientConnectorCertificateError``, ``ClientOSError``, ``ServerDisconnectedError``);
this module turns the exception chain into a :class:`Failure` with a stable
reason code, a one-line cause and the next step, so the CLI message, the
outbox's ``last_error`` and the log line say the same thing.

* :func:`classify_client_error` maps an exception raised by the client (walking
  ``os_error``, ``certificate_error``, ``__cause__`` and ``__context__``).
* :func:`diagnose_disconnect` settles the ambiguous case (the peer closed the
  connection without a word, which TLS 1.3 does when it refuses our client
  certificate after the handshake, and which a TLS port does to plain HTTP)
  with one short probe connection that reads the TLS alert itself.
* :func:`classify_handshake_error` maps what the *server* sees when it refuses a
  handshake, for its log line.

Reason codes (the contract; ``docs/operations.md`` lists them):

=================================== ============================================
``transport.tls.unknown-issuer``     the peer's certificate is not from a CA in ``tls_ca``
``transport.tls.expired``            the peer's certificate has expired
``transport.tls.not-yet-valid``      the peer's certificate is not valid yet
``transport.tls.name-mismatch``      the peer's certificate does not name the host of ``peer_url``
``transport.tls.verify``             another certificate verification failure
``transport.tls.certificate-refused`` the peer refused our client certificate (or we sent none)
``transport.tls.peer-speaks-http``   we spoke TLS, the peer answers plain HTTP
``transport.tls.peer-speaks-tls``    we spoke plain HTTP to a port that speaks TLS
``transport.tls.handshake``          another TLS handshake failure
``transport.refused``                connection refused: nothing listens there
``transport.dns``                    the host name does not resolve
``transport.timeout``                no connection or no answer in time
``transport.disconnected``           the peer closed the connection without an answer
``transport.unreachable``            the network says no (no route, host down, ...)
=================================== ============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import aiohttp

__all__ = [
    "PROBE_TIMEOUT",
    "Failure",
    "HandshakeFailure",
    "classify_client_error",
    "classify_handshake_error",
    "diagnose_disconnect",
]

PROBE_TIMEOUT: Final = 5.0
"""Seconds the diagnostic probe of :func:`diagnose_disconnect` may take, per step."""

_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")

# OpenSSL X509_V_ERR_* codes (x509_vfy.h).
_UNKNOWN_ISSUER_CODES = frozenset({2, 18, 19, 20, 21})
_NOT_YET_VALID, _EXPIRED, _HOSTNAME_MISMATCH, _IP_MISMATCH = 9, 10, 62, 64

# Alerts a TLS server sends when it refuses the client's certificate.
_CLIENT_CERT_ALERTS: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate and we sent none",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not know the CA that issued it",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it calls it a bad certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it could not verify it",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "its type or usages are not accepted",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked",
    "TLSV1_ALERT_ACCESS_DENIED": "access is denied to it",
    "TLSV1_ALERT_DECRYPT_ERROR": "its signature did not verify",
}
# What a TLS client reads when the other end does not speak TLS.
_NOT_TLS_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)


@dataclass(frozen=True, slots=True)
class Failure:
    """A transport failure named by its cause.

    ``reason`` is the stable code (module docstring), ``cause`` one clause for
    the operator (no secrets: host names, ports and certificate facts only),
    ``hint`` the next step. ``ambiguous`` marks a failure that
    :func:`diagnose_disconnect` may name more precisely.
    """

    reason: str
    cause: str
    hint: str
    ambiguous: bool = False

    def describe(self, where: str) -> str:
        """One line: ``peer at WHERE: CAUSE; HINT``."""
        return f"peer at {where}: {self.cause}; {self.hint}"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps, outermost first, each once."""
    seen: set[int] = set()
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen or len(out) >= 16:
            continue
        seen.add(id(item))
        out.append(item)
        todo.append(getattr(item, "certificate_error", None))
        todo.append(getattr(item, "os_error", None))
        todo.append(item.__cause__)
        todo.append(item.__context__)
    return out


def _ssl_reason(exc: BaseException) -> str | None:
    """OpenSSL's reason token (``UNKNOWN_CA``...) of an ``ssl.SSLError``, or parsed
    from the text aiohttp copies into ``ClientOSError`` args."""
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if isinstance(reason, str) and reason:
        return reason
    match = _SSL_REASON.search(" ".join(str(arg) for arg in exc.args))
    return match.group(1) if match else None


def _verify_failure(exc: ssl.SSLCertVerificationError, host: str) -> Failure:
    code = exc.verify_code
    message = exc.verify_message or "certificate verify failed"
    if code in _UNKNOWN_ISSUER_CODES:
        return Failure(
            "transport.tls.unknown-issuer",
            f"TLS certificate verify failed: unknown issuer ({message}): the peer's "
            "certificate is not issued by a CA in [server] tls_ca",
            "put the CA that issued the peer's certificate into the file [server] tls_ca names",
        )
    if code == _EXPIRED:
        return Failure(
            "transport.tls.expired",
            "TLS certificate verify failed: the peer's certificate has expired",
            "the peer's administrator must renew its certificate (check both clocks too)",
        )
    if code == _NOT_YET_VALID:
        return Failure(
            "transport.tls.not-yet-valid",
            "TLS certificate verify failed: the peer's certificate is not valid yet",
            "check this host's clock (NTP), or wait until the certificate's start time",
        )
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return Failure(
            "transport.tls.name-mismatch",
            f"TLS certificate verify failed: name mismatch, the peer's certificate "
            f"does not name {host!r}",
            "use a name the peer's certificate lists in [server] peer_url, or have it reissued",
        )
    return Failure(
        "transport.tls.verify",
        f"TLS certificate verify failed: {message}",
        "check the peer's certificate chain against [server] tls_ca",
    )


def _ssl_failure(reason: str, *, scheme: str) -> Failure | None:
    if reason in _CLIENT_CERT_ALERTS:
        return Failure(
            "transport.tls.certificate-refused",
            f"the peer refused our TLS client certificate: {_CLIENT_CERT_ALERTS[reason]}",
            "our [server] tls_cert must be valid, with clientAuth, from a CA in the peer's tls_ca",
        )
    if reason in _NOT_TLS_REASONS and scheme == "https":
        return Failure(
            "transport.tls.peer-speaks-http",
            "we speak TLS (https://) but the peer answers plain HTTP",
            "the peer serves without TLS: give it [server] tls_cert/tls_key, "
            "or (loopback tests only) use an http:// peer URL",
        )
    if reason in ("UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL"):
        return None
    return Failure(
        "transport.tls.handshake",
        f"TLS handshake failed: {reason.lower().replace('_', ' ')}",
        "compare both nodes' TLS settings (versions, certificates)",
    )


def _timeout_failure(exc: BaseException) -> Failure:
    connecting = isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError)
    what = "no connection" if connecting else "no answer"
    return Failure(
        "transport.timeout",
        f"timeout: {what} from the peer in time",
        "check that a firewall lets the port through and the peer is not overloaded",
    )


def classify_client_error(exc: BaseException, *, url: str) -> Failure:
    """Name the cause of a client-side failure reaching ``url``.

    Looks through the whole exception chain; never raises. An unrecognised
    failure is ``transport.unreachable`` with the innermost error's text.
    """
    parts = urlsplit(url)
    host = parts.hostname or "?"
    scheme = parts.scheme
    chain = _chain(exc)
    for item in chain:
        # aiohttp's ClientConnectorCertificateError is one too, without the codes.
        if isinstance(item, ssl.SSLCertVerificationError) and hasattr(item, "verify_code"):
            return _verify_failure(item, host)
    for item in chain:
        reason = _ssl_reason(item) if isinstance(item, ssl.SSLError | OSError) else None
        if reason is not None:
            failure = _ssl_failure(reason, scheme=scheme)
            if failure is not None:
                return failure
    for item in chain:
        if isinstance(item, socket.gaierror) or type(item).__name__ == "ClientConnectorDNSError":
            detail = item.strerror if isinstance(item, OSError) and item.strerror else "unknown"
            return Failure(
                "transport.dns",
                f"DNS failure: the host name {host!r} does not resolve ({detail})",
                "check the host in [server] peer_url and this host's DNS resolver",
            )
    for item in chain:
        if isinstance(item, ConnectionRefusedError) or (
            isinstance(item, OSError) and item.errno == errno.ECONNREFUSED
        ):
            return Failure(
                "transport.refused",
                f"connection refused: nothing listens on {parts.netloc}",
                "check that the peer's 'gateway serve' runs and the port in [server] "
                "peer_url is its [server] listen port",
            )
    for item in chain:
        if isinstance(item, TimeoutError | aiohttp.ServerTimeoutError):
            return _timeout_failure(item)
    for item in chain:
        if isinstance(
            item, aiohttp.ServerDisconnectedError | ConnectionResetError | BrokenPipeError
        ) or (isinstance(item, ssl.SSLError) and _ssl_reason(item) is not None):
            return Failure(
                "transport.disconnected",
                "the peer closed the connection without an answer",
                "see the peer's log for the refusal",
                ambiguous=True,
            )
    for item in chain:
        if isinstance(item, OSError) and item.errno in (
            errno.EHOSTUNREACH,
            errno.ENETUNREACH,
            errno.EHOSTDOWN,
            errno.EADDRNOTAVAIL,
        ):
            return Failure(
                "transport.unreachable",
                f"network unreachable: {item.strerror or type(item).__name__}",
                "check the route to the peer's host and its firewall",
            )
    inner = chain[-1]
    text = (
        inner.strerror
        if isinstance(inner, OSError) and inner.strerror
        else str(inner)[:120] or type(inner).__name__
    )
    return Failure(
        "transport.unreachable",
        f"unreachable: {type(inner).__name__}: {text}",
        "check the peer's address and that it is serving",
        ambiguous=isinstance(exc, aiohttp.ClientOSError),
    )


@dataclass(frozen=True, slots=True)
class _Probe:
    """What one probe connection met: an error, or how far it got."""

    error: BaseException | None = None
    handshake_done: bool = False
    answered: bool = False


async def _tls_probe(
    host: str, port: int, context: ssl.SSLContext, *, server_hostname: str | None
) -> _Probe:
    """Handshake, send one harmless request, read the first bytes of the answer."""
    writer: asyncio.StreamWriter | None = None
    handshake_done = False
    try:
        async with asyncio.timeout(PROBE_TIMEOUT * 2):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=PROBE_TIMEOUT,
            )
            handshake_done = True
            writer.write(
                b"GET /v1/health HTTP/1.1\r\nHost: " + host.encode("idna") + b"\r\n"
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            first = await reader.read(16)
    except (OSError, TimeoutError) as exc:
        return _Probe(error=exc, handshake_done=handshake_done)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await writer.wait_closed()
    return _Probe(handshake_done=True, answered=bool(first))


def _unverified_context() -> ssl.SSLContext:
    """Only to ask 'does this port speak TLS?': nothing is sent after the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a probe: it sends no data after the handshake
    return context


async def diagnose_disconnect(
    url: str, context: ssl.SSLContext | None, first: Failure, *, client_certificate: bool
) -> Failure:
    """Name an ambiguous failure with one probe connection; ``first`` when it cannot.

    For an ``https://`` URL the probe repeats the handshake with our own TLS
    context and reads, so the alert with which the peer refuses our client
    certificate is seen. For an ``http://`` URL it tries a TLS handshake that
    verifies nothing and sends nothing: a port that completes it speaks TLS.
    ``client_certificate`` says whether ``context`` presents one.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if host is None:
        return first
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https" and context is not None:
        probe = await _tls_probe(host, port, context, server_hostname=host)
        if probe.error is not None:
            found = classify_client_error(probe.error, url=url)
            if found.reason != "transport.disconnected":
                return found
        if probe.handshake_done and not probe.answered:
            # TLS 1.3: the client's handshake ends before the server has checked
            # the client certificate; a server that then closes without a word
            # refused it (asyncio servers send no alert).
            detail = (
                "it closed the connection right after the handshake (its tls_ca does not "
                "hold the CA of our certificate, or ours expired or lacks clientAuth)"
                if client_certificate
                else _CLIENT_CERT_ALERTS["TLSV13_ALERT_CERTIFICATE_REQUIRED"]
            )
            return Failure(
                "transport.tls.certificate-refused",
                f"the peer refused our TLS client certificate: {detail}",
                "our [server] tls_cert must be valid, with clientAuth, from a CA in the "
                "peer's tls_ca",
            )
        return first
    if parts.scheme == "http":
        probe = await _tls_probe(host, port, _unverified_context(), server_hostname=None)
        reason = _ssl_reason(probe.error) if probe.error is not None else None
        if probe.handshake_done or (reason is not None and reason not in _NOT_TLS_REASONS):
            return Failure(
                "transport.tls.peer-speaks-tls",
                "we speak plain HTTP (http://) to a port that speaks TLS",
                "use an https:// [server] peer_url with [server] tls_cert, tls_key and tls_ca",
            )
    return first


# -- the server's side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    """Why the server refused a TLS handshake: a code and one clause."""

    reason: str
    cause: str


_SERVER_REASONS: Final = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "tls.no-client-certificate",
        "the client sent no certificate (mutual TLS requires one)",
    ),
    "HTTP_REQUEST": ("tls.plain-http", "the client spoke plain HTTP to the TLS port"),
    "WRONG_VERSION_NUMBER": ("tls.not-tls", "the client did not speak TLS"),
    "UNSUPPORTED_PROTOCOL": ("tls.protocol-version", "the client's TLS version is too old"),
    "VERSION_TOO_LOW": ("tls.protocol-version", "the client's TLS version is too old"),
    "NO_SHARED_CIPHER": ("tls.no-shared-cipher", "no cipher suite in common"),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "tls.server-certificate-refused",
        "the client does not trust our certificate (unknown CA)",
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "tls.server-certificate-refused",
        "the client refused our certificate (bad certificate)",
    ),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        "tls.server-certificate-refused",
        "the client refused our certificate (expired)",
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        "tls.server-certificate-refused",
        "the client refused our certificate (name or chain)",
    ),
}


def classify_handshake_error(exc: BaseException) -> HandshakeFailure:
    """Name why a handshake the server was doing failed (for its log line)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and hasattr(exc, "verify_code"):
        code = exc.verify_code
        if code in _UNKNOWN_ISSUER_CODES:
            return HandshakeFailure(
                "tls.client-certificate-unknown-issuer",
                "the client's certificate is not issued by a CA in [server] tls_ca",
            )
        if code == _EXPIRED:
            return HandshakeFailure(
                "tls.client-certificate-expired", "the client's certificate has expired"
            )
        if code == _NOT_YET_VALID:
            return HandshakeFailure(
                "tls.client-certificate-not-yet-valid", "the client's certificate is not valid yet"
            )
        return HandshakeFailure(
            "tls.client-certificate-invalid",
            f"the client's certificate failed verification: {exc.verify_message or 'unknown'}",
        )
    if isinstance(exc, TimeoutError):
        return HandshakeFailure("tls.timeout", "the client did not finish the handshake in time")
    reason = _ssl_reason(exc)
    if reason is not None and reason in _SERVER_REASONS:
        code_, cause = _SERVER_REASONS[reason]
        return HandshakeFailure(code_, cause)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError) or reason in (
        "UNEXPECTED_EOF_WHILE_READING",
        "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL",
    ):
        return HandshakeFailure("tls.client-closed", "the client closed during the handshake")
    if reason is not None:
        return HandshakeFailure("tls.handshake", reason.lower().replace("_", " "))
    return HandshakeFailure("tls.handshake", type(exc).__name__)
