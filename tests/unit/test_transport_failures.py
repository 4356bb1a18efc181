"""The classification of transport failures, table by table, on constructed exceptions.

The real sockets are in ``tests/integration/test_transport_failures.py``; here
every branch of the mapping is pinned, including those a loopback test cannot
produce (unreachable networks, IP mismatches, not-yet-valid certificates).
"""

from __future__ import annotations

import errno
import socket
import ssl

import aiohttp
import pytest

from gateway.peer.failures import classify_client_error, classify_handshake_error

URL = "https://pk.example.org:8701"


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()} (_ssl.c:1006)")
    error.reason = reason
    return error


def wrapped(inner: BaseException) -> BaseException:
    """As the client meets it: inside an aiohttp error, the cause chained."""
    outer = aiohttp.ClientConnectionError("connection failed")
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            verify_error(20, "unable to get local issuer certificate"),
            "transport.tls.unknown-issuer",
        ),
        (
            verify_error(19, "self-signed certificate in certificate chain"),
            "transport.tls.unknown-issuer",
        ),
        (verify_error(18, "self-signed certificate"), "transport.tls.unknown-issuer"),
        (verify_error(10, "certificate has expired"), "transport.tls.expired"),
        (verify_error(9, "certificate is not yet valid"), "transport.tls.not-yet-valid"),
        (verify_error(62, "Hostname mismatch"), "transport.tls.name-mismatch"),
        (verify_error(64, "IP address mismatch"), "transport.tls.name-mismatch"),
        (verify_error(26, "unsupported certificate purpose"), "transport.tls.verify"),
        (ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "transport.tls.certificate-refused"),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "transport.tls.certificate-refused"),
        (ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "transport.tls.certificate-refused"),
        (ssl_error("WRONG_VERSION_NUMBER"), "transport.tls.peer-speaks-http"),
        (ssl_error("NO_PROTOCOLS_AVAILABLE"), "transport.tls.handshake"),
        (
            aiohttp.ClientOSError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"),
            "transport.tls.certificate-refused",
        ),
        (socket.gaierror(-2, "Name or service not known"), "transport.dns"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "transport.refused"),
        (TimeoutError(), "transport.timeout"),
        (aiohttp.ServerTimeoutError("read"), "transport.timeout"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "transport.unreachable"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "transport.unreachable"),
        (aiohttp.ServerDisconnectedError(), "transport.disconnected"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transport.disconnected"),
    ],
)
def test_each_client_failure_gets_its_reason_bare_and_wrapped(
    error: BaseException, reason: str
) -> None:
    assert classify_client_error(error, url=URL).reason == reason
    assert classify_client_error(wrapped(error), url=URL).reason == reason


def test_a_name_mismatch_names_the_host_of_the_peer_url() -> None:
    failure = classify_client_error(verify_error(62, "Hostname mismatch"), url=URL)
    assert "'pk.example.org'" in failure.cause
    assert failure.describe("pk.example.org:8701").startswith("peer at pk.example.org:8701: ")


def test_only_a_silent_close_is_left_for_the_probe() -> None:
    assert classify_client_error(aiohttp.ServerDisconnectedError(), url=URL).ambiguous
    for error in (verify_error(10, "expired"), ConnectionRefusedError(), TimeoutError()):
        assert not classify_client_error(error, url=URL).ambiguous


def test_an_unknown_failure_keeps_the_innermost_text() -> None:
    failure = classify_client_error(wrapped(ValueError("odd thing")), url=URL)
    assert failure.reason == "transport.unreachable"
    assert "ValueError: odd thing" in failure.cause


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            verify_error(20, "unable to get local issuer certificate"),
            "tls.client-certificate-unknown-issuer",
        ),
        (verify_error(10, "certificate has expired"), "tls.client-certificate-expired"),
        (verify_error(9, "certificate is not yet valid"), "tls.client-certificate-not-yet-valid"),
        (verify_error(26, "unsupported certificate purpose"), "tls.client-certificate-invalid"),
        (ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "tls.no-client-certificate"),
        (ssl_error("HTTP_REQUEST"), "tls.plain-http"),
        (ssl_error("WRONG_VERSION_NUMBER"), "tls.not-tls"),
        (ssl_error("UNSUPPORTED_PROTOCOL"), "tls.protocol-version"),
        (ssl_error("NO_SHARED_CIPHER"), "tls.no-shared-cipher"),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "tls.server-certificate-refused"),
        (ssl_error("UNEXPECTED_EOF_WHILE_READING"), "tls.client-closed"),
        (ConnectionResetError(), "tls.client-closed"),
        (TimeoutError(), "tls.timeout"),
        (ssl_error("SOMETHING_NEW"), "tls.handshake"),
    ],
)
def test_each_refused_handshake_gets_its_reason_on_the_server(
    error: BaseException, reason: str
) -> None:
    assert classify_handshake_error(error).reason == reason
