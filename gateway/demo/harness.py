"""Real ``gateway serve`` processes: start, wait until ready, stop, kill.

One harness for everything that drives whole nodes from outside: ``gateway
demo`` and the end-to-end tests. A :class:`ServeProcess` is a child process
running ``gateway --home HOME serve``; its stderr (the log, one JSON line per
event off a terminal) is read by a background thread into
:attr:`ServeProcess.stderr_lines` and, when ``log_path`` is given, copied to
that file as it arrives. Readiness is the ``serving`` milestone line
(:func:`wait_ready`) or the peer's ``GET /v1/health`` (:func:`wait_health`);
stopping is SIGTERM and a wait for the exit code (:func:`stop`), SIGKILL only
when asked (:func:`kill`) or when a stop takes too long (:func:`stop_or_kill`).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gateway.errors import GatewayError

__all__ = [
    "GATEWAY",
    "ServeFailed",
    "ServeProcess",
    "free_port",
    "kill",
    "milestones",
    "start_serve",
    "stop",
    "stop_or_kill",
    "wait_health",
    "wait_ready",
]

GATEWAY: tuple[str, ...] = (sys.executable, "-c", "from gateway.cli.fast import main; main()")
"""The ``gateway`` command line, run by this interpreter (no installed script needed)."""


class ServeFailed(GatewayError):
    """A ``gateway serve`` process exited, or did not become ready in time.

    The message names the node home and the exit code; the process's own log
    (``ServeProcess.stderr_text()`` or its ``log_path``) says why.
    """

    reason = "serve.failed"


@dataclass
class ServeProcess:
    """A running ``gateway serve``; stderr is collected in the background."""

    home: Path
    process: subprocess.Popen[str]
    log_path: Path | None = None
    stderr_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = field(default=None, repr=False)

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        return "".join(self.stderr_lines)

    def running(self) -> bool:
        return self.process.poll() is None


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10_000


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (Linux; 32768 by
    default, and the IANA range's 49152 where it cannot be read)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def free_port() -> int:
    """A TCP port on loopback that is free right now, chosen below the ephemeral range.

    The port is bound later, by a ``gateway serve`` started after this returns (and
    again after each restart). A port from the ephemeral range (what binding port 0
    gives) can meanwhile become the local end of any outgoing connection, a
    database client's say, and stay taken for as long as it lives; the kernel never
    hands out a port below the range that way. Falls back to port 0's choice when
    the range leaves no room below it.
    """
    low = _ephemeral_low()
    chooser = random.SystemRandom()
    for _ in range(100 if low > _LOWEST_PORT + 1000 else 0):
        port = chooser.randrange(_LOWEST_PORT, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(
    home: Path,
    *,
    env: Mapping[str, str],
    argv: Sequence[str] = GATEWAY,
    cwd: Path | None = None,
    log_path: Path | None = None,
    new_session: bool = False,
) -> ServeProcess:
    """Start ``ARGV --home HOME serve`` (does not wait for readiness).

    ``new_session`` puts the child in a session of its own, so a Ctrl-C meant
    for the parent reaches the child only through :func:`stop`.
    """
    process = subprocess.Popen(  # noqa: S603 - our own command line, no shell
        [*argv, "--home", str(home), "serve"],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=new_session,
    )
    serve = ServeProcess(home, process, log_path=log_path)
    log: IO[str] | None = log_path.open("a", encoding="utf-8") if log_path is not None else None

    def read() -> None:
        try:
            for line in process.stderr or ():
                serve.stderr_lines.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            if log is not None:
                log.close()

    serve._reader = threading.Thread(target=read, daemon=True, name=f"serve-log-{home.name}")
    serve._reader.start()
    return serve


def milestones(serve: ServeProcess, event: str) -> list[str]:
    """The sentences of ``serve``'s milestone lines named ``event`` (serving, restarting,
    stopped), whether logged as JSON (``{"event": "serving", "message": ...}``) or bare."""
    found = []
    for line in list(serve.stderr_lines):
        text = line.strip()
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if record.get("event") == event and isinstance(record.get("message"), str):
                found.append(record["message"])
        elif text.startswith(f"{event} "):
            found.append(text)
    return found


def _exited(serve: ServeProcess) -> ServeFailed:
    time.sleep(0.2)  # let the reader take the last lines
    where = f"; see {serve.log_path}" if serve.log_path is not None else ""
    return ServeFailed(
        f"gateway serve for {serve.home} exited with {serve.process.returncode}{where}:\n"
        f"{serve.stderr_text()}"
    )


def wait_ready(serve: ServeProcess, *, timeout: float = 60.0) -> str:
    """Wait for the ``serving <node> on SCHEME://HOST:PORT ...`` milestone; return it.

    Raises :class:`ServeFailed` when the process exits first or ``timeout``
    (seconds) passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = milestones(serve, "serving")
        if serving:
            return serving[0]
        if serve.process.poll() is not None:
            raise _exited(serve)
        time.sleep(0.05)
    raise ServeFailed(f"gateway serve not ready after {timeout} s:\n{serve.stderr_text()}")


def wait_health(url: str, *, timeout: float = 60.0, serve: ServeProcess | None = None) -> None:
    """Poll ``GET URL/v1/health`` until it answers 200 (``timeout`` in seconds).

    With ``serve`` given, a process that exits meanwhile fails at once.
    Raises :class:`ServeFailed`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve is not None and serve.process.poll() is not None:
            raise _exited(serve)
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/v1/health", timeout=2) as answer:  # noqa: S310 - the caller's own node URL
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ServeFailed(f"{url} did not answer /v1/health within {timeout:g} s")


def _join(serve: ServeProcess) -> None:
    if serve._reader is not None:
        serve._reader.join(timeout=5)


def stop(serve: ServeProcess, sig: int = signal.SIGTERM, *, timeout: float = 60.0) -> int:
    """Signal the process and wait (``timeout`` seconds) for its exit code.

    Raises :class:`subprocess.TimeoutExpired` when it does not exit in time.
    """
    if serve.process.poll() is None:
        serve.process.send_signal(sig)
    code = serve.process.wait(timeout=timeout)
    _join(serve)
    return code


def kill(serve: ServeProcess) -> int:
    """SIGKILL the process (a crash) and reap it."""
    return stop(serve, signal.SIGKILL)


def stop_or_kill(serve: ServeProcess, *, timeout: float) -> int:
    """SIGTERM and wait ``timeout`` seconds; SIGKILL when it is too slow, or when
    the wait is interrupted (a second Ctrl-C while stopping)."""
    try:
        return stop(serve, timeout=timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        return kill(serve)
