"""The one exception tree of ssw-gateway.

Every error the gateway raises on purpose derives from :class:`GatewayError`.
Families say *what kind* of failure happened; the CLI maps families to the exit
codes fixed by the specification in one place (:func:`exit_code_for`), the peer
server maps them to an opaque reason code, and the log keeps the detail.

Exit codes (SPEC §8): 0 done; 1 error; 2 usage; 3 refused by the consent
ledger; 4 verification failed (tampering, bad signature, broken chain).

Messages never contain secret material: no private key, passphrase, token or
decrypted content is ever put into an exception's text.
"""

from __future__ import annotations

__all__ = [
    "EXIT_CONSENT_REFUSED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_VERIFICATION_FAILED",
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


class InvalidInput(GatewayError):
    """Input given by a user (case data, a flag value, a file) is not acceptable."""

    reason = "invalid-input"


class NotFound(GatewayError):
    """The named object (bundle, user, consent, key) does not exist."""

    reason = "not-found"


class Gone(NotFound):
    """The named object existed and was destroyed on purpose (retention). HTTP 410."""

    reason = "gone"


class AlreadyExists(GatewayError):
    """Creating something that exists already is refused, never overwritten."""

    reason = "exists"


class StorageError(GatewayError):
    """The database or the blob store failed or holds something unexpected."""

    reason = "storage"


class TransportError(GatewayError):
    """The peer could not be reached or answered something unusable."""

    reason = "transport"


class ClientDisconnected(TransportError):
    """The client closed its connection before its request body arrived whole.

    Nothing can be answered and nothing was stored; the servers log one line
    (``client disconnected``) and no status, never a traceback.
    """

    reason = "client-disconnected"


class AccessDenied(GatewayError):
    """The acting user is unknown, disabled, or lacks the role for an action."""

    reason = "access-denied"


class RefusedError(GatewayError):
    """Refused by a rule: policy limits, consent, protocol state."""

    reason = "refused"


class PolicyRefused(RefusedError):
    """A policy limit (size, count, rate, validity) refuses the action."""

    reason = "policy"


class ConsentRefused(RefusedError):
    """The consent ledger refuses a disclosure (MOC item 3). Exit code 3."""

    exit_code = EXIT_CONSENT_REFUSED
    reason = "consent"


class VerificationError(GatewayError):
    """Something failed verification: a signature, a hash, a chain, a proof.

    ``check`` names the verification step that failed, e.g. ``"signature"``
    or ``"ciphertext-hash"``. Exit code 4.
    """

    exit_code = EXIT_VERIFICATION_FAILED
    reason = "verification"
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
