"""The one exception tree of ssw-gateway.

Every error the gateway raises on purpose derives from :class:`GatewayError`.
Families say *what kind* of failure happened; the CLI maps families to the exit
codes fixed by the specification in one place (:func:`exit_code_for`), and
both HTTP servers (the peer server and the local API) answer the status of one
registry (:func:`http_status_for`): each class carries its ``http_status``,
and the few reason codes whose status differs from their class's are listed
in :data:`STATUS_BY_REASON`. A peer sees the reason code; the log keeps the
detail.

Exit codes (SPEC §8): 0 done; 1 error; 2 usage; 3 refused by the consent
ledger; 4 verification failed (tampering, bad signature, broken chain).

Messages never contain secret material: no private key, passphrase, token or
decrypted content is ever put into an exception's text.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

__all__ = [
    "EXIT_CONSENT_REFUSED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_VERIFICATION_FAILED",
    "STATUS_BY_REASON",
    "AccessDenied",
    "AlreadyExists",
    "ClientDisconnected",
    "ConfigError",
    "ConsentRefused",
    "GatewayError",
    "Gone",
    "InvalidInput",
    "NotFound",
    "PolicyRefused",
    "RefusedError",
    "StorageError",
    "TransportError",
    "VerificationError",
    "exit_code_for",
    "http_status_for",
    "message_for_client",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONSENT_REFUSED = 3
EXIT_VERIFICATION_FAILED = 4


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose.

    ``reason`` is a short, stable, machine-readable code (``"config.missing"``,
    ``"envelope.signature"``) that may be shown to a peer; the message is for
    the local operator and the log.
    """

    exit_code: int = EXIT_ERROR
    reason: str = "error"
    http_status: ClassVar[int] = 500
    """The HTTP status both servers answer for this class (see :func:`http_status_for`)."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def diagnostics(self) -> str:
        """A human explanation, one paragraph, safe to print and to log."""
        return self.message

    def __str__(self) -> str:
        return self.message


class ConfigError(GatewayError):
    """A setting or file of the node home is missing or malformed."""

    reason = "config"
    http_status = 500


class InvalidInput(GatewayError):
    """Input given by a user (case data, a flag value, a file) is not acceptable."""

    reason = "invalid-input"
    http_status = 422


class NotFound(GatewayError):
    """The named object (bundle, user, consent, key) does not exist."""

    reason = "not-found"
    http_status = 404


class Gone(NotFound):
    """The named object existed and was destroyed on purpose (retention). HTTP 410."""

    reason = "gone"
    http_status = 410


class AlreadyExists(GatewayError):
    """Creating something that exists already is refused, never overwritten."""

    reason = "exists"
    http_status = 409


class StorageError(GatewayError):
    """The database or the blob store failed or holds something unexpected."""

    reason = "storage"
    http_status = 503


class TransportError(GatewayError):
    """The peer could not be reached or answered something unusable."""

    reason = "transport"
    http_status = 502
    network_failure = False
    """True when the network itself failed (the peer was never reached), as
    opposed to a peer that answered something unusable; the sender's backoff
    and health probing tell the two apart (docs/sync.md)."""


class ClientDisconnected(TransportError):
    """The client closed its connection before its request body arrived whole.

    Nothing can be answered and nothing was stored; the servers log one line
    (``client disconnected``) and no status, never a traceback.
    """

    reason = "client-disconnected"
    http_status = 400


class AccessDenied(GatewayError):
    """The acting user is unknown, disabled, or lacks the role for an action."""

    reason = "access-denied"
    http_status = 401


class RefusedError(GatewayError):
    """Refused by a rule: policy limits, consent, protocol state."""

    reason = "refused"
    http_status = 409


class PolicyRefused(RefusedError):
    """A policy limit (size, count, rate, validity) refuses the action."""

    reason = "policy"
    http_status = 422


class ConsentRefused(RefusedError):
    """The consent ledger refuses a disclosure (MOC item 3). Exit code 3."""

    exit_code = EXIT_CONSENT_REFUSED
    reason = "consent"
    http_status = 403


class VerificationError(GatewayError):
    """Something failed verification: a signature, a hash, a chain, a proof.

    ``check`` names the verification step that failed, e.g. ``"signature"``
    or ``"ciphertext-hash"``. Exit code 4.
    """

    exit_code = EXIT_VERIFICATION_FAILED
    reason = "verification"
    http_status = 422
    check: str = "verification"

    def __init__(
        self, message: str, *, check: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        if check is not None:
            self.check = check


def exit_code_for(error: BaseException) -> int:
    """The process exit code for an error (SPEC §8)."""
    if isinstance(error, GatewayError):
        return error.exit_code
    return EXIT_ERROR


STATUS_BY_REASON: Mapping[str, int] = MappingProxyType(
    {
        # The caller is known but lacks the role (the others of AccessDenied are 401).
        "access.role": 403,
        "access.unknown-action": 403,
        # The request itself, before its meaning: framing, JSON syntax, media type.
        "request.json": 400,
        "request.framing": 400,
        "request.content-type": 415,
        "request.too-large": 413,
        "request.timeout": 408,
        # Transport limits of the peer server (docs/protocol.md, "Limits").
        "limit.headers": 431,
        "limit.body": 413,
        "limit.envelope": 413,
        "limit.batch": 413,
        "limit.rate": 429,
        "limit.timeout": 408,
        # Policy limits on size and rate (policy.toml [limits]).
        "policy.attachment-size": 413,
        "policy.case-size": 413,
        "policy.envelope-size": 413,
        "policy.header-size": 413,
        "policy.rate": 429,
        # The two-person rule (docs/consent.md, "Approvals"): the others are 409.
        "approval.not-approver": 403,
        "approval.not-distinct": 403,
        "approval.expired": 410,
    }
)
"""Reason codes whose HTTP status differs from their error class's ``http_status``.

The one place besides the classes that decides a status: the peer server
(``gateway/peer/server.py``) and the local API (``gateway/api/app.py``) both
answer :func:`http_status_for`, so one error has one status on both.
"""


def http_status_for(error: BaseException) -> int:
    """The HTTP status for an error: its reason's entry in :data:`STATUS_BY_REASON`,
    else its class's ``http_status``; 500 for anything outside the tree."""
    if not isinstance(error, GatewayError):
        return 500
    return STATUS_BY_REASON.get(error.reason, type(error).http_status)


def message_for_client(error: GatewayError, request_id: str | None) -> str:
    """The message a remote user of the local API or the console is shown for ``error``.

    The error's own message when the fault is the request's (a 4xx status) or
    the peer's (:class:`TransportError`). The node's own faults (any other
    5xx: a :class:`StorageError`, whose message carries the database driver's
    text, the server's address and port, the database and user names; a
    :class:`ConfigError` or a keystore error, whose messages name files of the
    node home) are refused by default: the user is shown a fixed text naming
    the reason code and the request id (none for text stored for later, such
    as an outbox entry's last error), and the administrator reads the cause
    in the node's log under that id.
    """
    if http_status_for(error) < 500 or isinstance(error, TransportError):
        return error.message
    where = f" under request id {request_id}" if request_id else ""
    return (
        f"the node could not do this ({error.reason}); its administrator finds the cause"
        f" in the node's log{where}"
    )
