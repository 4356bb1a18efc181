"""How a command's output and failure reach the user, without importing click.

Shared by the click commands and the fast path of :mod:`gateway.cli.fast`, so
both print the same bytes and exit with the same code. :func:`echo` writes as
``click.echo`` does; where the two could differ (click already loaded, a
terminal escape in the text, a stream that is not UTF-8) it hands the text to
``click.echo`` itself.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from gateway import log
from gateway.errors import EXIT_ERROR, GatewayError

if TYPE_CHECKING:
    from gateway.cli.context import AppContext

__all__ = ["echo", "failed", "report"]


def _plain_stream(stream: object) -> bool:
    encoding = getattr(stream, "encoding", None)
    return isinstance(encoding, str) and encoding.lower().replace("-", "") == "utf8"


def echo(text: str, *, err: bool = False) -> None:
    """Print ``text`` and a newline to stdout (or stderr with ``err``) and flush.

    The bytes are those of ``click.echo(text, err=err)``: when click is loaded
    (a command run through it, a test's runner), the text holds an escape
    character (click strips styles off a terminal) or the stream's encoding
    is not UTF-8 (click re-wraps it), click prints it.
    """
    stream = sys.stderr if err else sys.stdout
    if "click" in sys.modules or "\x1b" in text or not _plain_stream(stream):
        import click  # noqa: PLC0415 - the rare case pays for click

        click.echo(text, err=err)
        return
    stream.write(text + "\n")
    stream.flush()


def report(app: AppContext, exc: BaseException, code: int, reason: str, message: str) -> None:
    """Tell the user a command failed: the traceback with --debug, the JSON error
    object with --json, and ``error: <message>`` on stderr (or one JSON log line
    for a service whose stderr is its log)."""
    if app.debug:
        import traceback  # noqa: PLC0415 - only --debug prints one

        traceback.print_exception(exc, file=sys.stderr)
    if app.as_json:
        echo(json.dumps({"error": {"reason": reason, "message": message, "exit_code": code}}))
    if log.is_service() and log.is_json():
        # A service's stderr is its log: the failure is one more JSON line of it.
        log.get_logger("cli").error("failed", reason=reason, message=message, exit_code=code)
        return
    echo(f"error: {message}", err=True)


def failed(app: AppContext, exc: BaseException) -> int:
    """Report a command's failure and return its exit code (SPEC §8), in one place.

    A :class:`~gateway.errors.GatewayError` exits with its family's code;
    ``KeyboardInterrupt`` with 130; anything else is an internal error (exit
    1) told in one line, the traceback only with --debug. Anything that is not
    an ``Exception`` nor ``KeyboardInterrupt`` is raised again.
    """
    if isinstance(exc, GatewayError):
        report(app, exc, exc.exit_code, exc.reason, exc.diagnostics())
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        if log.is_service() and log.is_json():
            log.get_logger("cli").warning("interrupted", exit_code=130)
        else:
            echo("interrupted", err=True)
        return 130
    if not isinstance(exc, Exception):
        raise exc
    log.get_logger("cli").error("internal_error", error_type=type(exc).__name__)
    report(
        app,
        exc,
        EXIT_ERROR,
        "internal",
        f"internal error ({type(exc).__name__}); run with --debug for the traceback",
    )
    return EXIT_ERROR
