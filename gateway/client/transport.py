"""How a user command reaches the running node: HTTP over its Unix socket or TCP.

Standard library only: a user command imports neither the database layer nor
the web server nor the crypto library. A JSON request over the Unix socket
goes through :mod:`gateway.client.plainhttp`; TCP, HTTPS and streamed answers
through ``http.client`` (and ``ssl``), imported only then.
Every request carries the user's bearer token; every answer is read with a
bound; every error answer becomes an exception of :mod:`gateway.errors` with
the exit code the same command gives when it fails in the node (SPEC §8: 3
for a consent refusal, 4 for a failed verification).

Where the node is:

* default: the Unix socket ``<home>/run/api.sock`` of ``--home`` /
  ``GATEWAY_HOME`` (see :mod:`gateway.client.paths`);
* ``--api-url`` / ``GATEWAY_API_URL``: ``http://HOST:PORT`` or
  ``https://HOST:PORT``; HTTPS verifies the node's certificate against
  ``GATEWAY_API_CA``, else the home's ``[server] tls_ca`` (the CA that signed
  the node's certificate), else the system's trust store.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from gateway.client.paths import api_socket_path
from gateway.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    ConsentRefused,
    GatewayError,
    Gone,
    InvalidInput,
    NotFound,
    PolicyRefused,
    RefusedError,
    StorageError,
    TransportError,
    VerificationError,
)

if TYPE_CHECKING:
    import http.client

    from gateway.client.files import Received

__all__ = [
    "MAX_ANSWER_BYTES",
    "ApiClient",
    "NodeNotRunning",
    "Target",
    "error_from_answer",
    "path_of",
    "resolve_target",
]

MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""Largest JSON answer a user command reads (bytes); streams are read in chunks."""
_MAX_ERROR_BYTES = 64 * 1024
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 600.0
_CHUNK = 64 * 1024


class NodeNotRunning(TransportError):
    """No node answers where the user command looked for it. Exit code 1."""

    reason = "client.no-node"


class Target(NamedTuple):
    """Where the node's local API is: a Unix socket, or an HTTP(S) URL.

    (A named tuple: ``dataclasses`` would import ``inspect`` for every client command.)
    """

    socket_path: Path | None = None
    url: str | None = None
    home: Path | None = None
    ca_file: Path | None = None

    def describe(self) -> str:
        return str(self.socket_path) if self.socket_path is not None else str(self.url)

    def how_to_start(self) -> str:
        if self.home is not None:
            return f"start it with 'gateway serve --home {self.home}'"
        return "start it with 'gateway serve --home DIR' on its host"


def _home_ca(home: Path) -> Path | None:
    """``[server] tls_ca`` of the home's gateway.toml, resolved against the home."""
    import tomllib  # noqa: PLC0415 - only a TCP target reads the home's settings

    try:
        with (home / "gateway.toml").open("rb") as handle:
            data = tomllib.loads(handle.read(1024 * 1024).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    server = data.get("server")
    value = server.get("tls_ca") if isinstance(server, dict) else None
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else home / path


def resolve_target(environ: Mapping[str, str], *, home: Path | None, api_url: str | None) -> Target:
    """Where to reach the node: ``api_url`` (or ``GATEWAY_API_URL``), else the home's socket.

    Raises :class:`ConfigError` for a URL that is not ``http://`` or
    ``https://``, or when neither a URL nor a home is given.
    """
    url = api_url or environ.get("GATEWAY_API_URL") or None
    chosen_home = home
    if chosen_home is None and environ.get("GATEWAY_HOME"):
        chosen_home = Path(environ["GATEWAY_HOME"]).expanduser().resolve()
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--api-url {url!r} must be http://HOST:PORT or https://HOST:PORT",
                reason="config.api-url",
            )
        ca: Path | None = None
        if environ.get("GATEWAY_API_CA"):
            ca = Path(environ["GATEWAY_API_CA"]).expanduser()
        elif chosen_home is not None:
            ca = _home_ca(chosen_home)
        return Target(url=url.rstrip("/"), home=chosen_home, ca_file=ca)
    if chosen_home is None:
        raise ConfigError(
            "no node given: pass --home DIR (or set GATEWAY_HOME) to reach the node's "
            "socket, or --api-url URL (GATEWAY_API_URL) to reach it over TCP",
            reason="config.home",
        )
    return Target(socket_path=api_socket_path(chosen_home), home=chosen_home)


def _unix_connection(path: Path, timeout: float) -> http.client.HTTPConnection:
    """An ``http.client`` connection over the Unix domain socket ``path``."""
    import http.client  # noqa: PLC0415 - only streamed answers over the socket use it

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(_CONNECT_TIMEOUT)
            try:
                sock.connect(str(path))
            except BaseException:
                sock.close()
                raise
            sock.settimeout(self.timeout)
            self.sock = sock

    return UnixConnection("localhost", timeout=timeout)


_STATUS_FAMILIES: dict[int, type[GatewayError]] = {
    400: InvalidInput,
    401: AccessDenied,
    404: NotFound,
    408: PolicyRefused,
    409: RefusedError,
    410: Gone,
    413: PolicyRefused,
    415: InvalidInput,
    422: InvalidInput,
    429: PolicyRefused,
    500: GatewayError,
    502: TransportError,
    503: StorageError,
}


def error_from_answer(status: int, body: bytes) -> GatewayError:
    """The exception of the gateway's tree an error answer stands for.

    The node answers ``{"error": {"reason", "message", "check"?}}``; the
    family follows the reason code first (``consent`` is a consent refusal,
    exit 3; an answer with ``check`` is a failed verification, exit 4), then
    the status (see :func:`gateway.api.app.error_status`).
    """
    reason, message, check = "error", f"the node answered HTTP {status}", None
    try:
        error = json.loads(body.decode("utf-8"))["error"]
        if isinstance(error.get("reason"), str):
            reason = error["reason"]
        if isinstance(error.get("message"), str):
            message = error["message"]
        if isinstance(error.get("check"), str):
            check = error["check"]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    if (reason == "consent" or reason.startswith("consent.")) and status == 403:
        return ConsentRefused(message, reason=reason)
    if check is not None:
        return VerificationError(message, check=check, reason=reason)
    if status == 403:
        return AccessDenied(message, reason=reason)
    if status == 409 and reason.startswith("exists"):
        return AlreadyExists(message, reason=reason)
    if status == 422 and reason.startswith(("policy", "consent")):
        return PolicyRefused(message, reason=reason)
    if status == 500 and reason.startswith("config"):
        return ConfigError(message, reason=reason)
    family = _STATUS_FAMILIES.get(status, GatewayError)
    return family(message, reason=reason)


def path_of(*segments: str, query: Mapping[str, str | None] | None = None) -> str:
    """``/api/v1/<segments>?<query>``, each segment percent-encoded, ``None`` values left out."""
    path = "/api/v1/" + "/".join(quote(segment, safe="") for segment in segments)
    kept = {k: v for k, v in (query or {}).items() if v is not None}
    return path + ("?" + urlencode(kept) if kept else "")


class ApiClient:
    """One user's connection to the node's local API (one request at a time)."""

    def __init__(self, target: Target, token: str | None, *, action: str | None = None) -> None:
        self.target = target
        self.action = action
        """What the command acts as (the node authorizes each route itself)."""
        self._token = token

    def preflight(self) -> None:
        """Ask the node who the token belongs to and check its role may do ``action``.

        For commands that check local things (an output path) before their one
        request: a refused user hears about the token or the role first, as
        the node would answer. The node still authorizes the request itself.
        Raises :class:`AccessDenied` (no, wrong or disabled token; role).
        """
        from gateway.core.roles import Role, authorize_role  # noqa: PLC0415

        who = self.call("GET", "/api/v1/whoami")
        if self.action is not None and isinstance(who, dict) and who.get("role"):
            authorize_role(Role(who["role"]), self.action)

    def _connection(self) -> http.client.HTTPConnection:
        import http.client  # noqa: PLC0415 - see the module's docstring
        import ssl  # noqa: PLC0415

        if self.target.socket_path is not None:
            return _unix_connection(self.target.socket_path, _READ_TIMEOUT)
        assert self.target.url is not None
        parts = urlsplit(self.target.url)
        host = parts.hostname or "localhost"
        if parts.scheme == "https":
            context = ssl.create_default_context(
                cafile=str(self.target.ca_file) if self.target.ca_file is not None else None
            )
            return http.client.HTTPSConnection(
                host, parts.port or 443, timeout=_READ_TIMEOUT, context=context
            )
        return http.client.HTTPConnection(host, parts.port or 80, timeout=_READ_TIMEOUT)

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        if not self._token:
            raise AccessDenied(
                "no user token: pass --token-file FILE or set GATEWAY_TOKEN",
                reason="access.no-token",
            )
        return {"Authorization": f"Bearer {self._token}", **(extra or {})}

    def _not_running(self, exc: OSError) -> NodeNotRunning:
        where = self.target.describe()
        detail = exc.strerror or type(exc).__name__
        return NodeNotRunning(
            f"no node is running at {where} ({detail}): {self.target.how_to_start()}"
        )

    @contextmanager
    def open(
        self,
        method: str,
        path: str,
        *,
        body: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """Send one request and yield the successful answer, to be read by the caller.

        Raises :class:`NodeNotRunning` when nothing answers, the mapped error
        of :func:`error_from_answer` for an error status, and
        :class:`TransportError` when the connection breaks.
        """
        import http.client  # noqa: PLC0415 - see the module's docstring
        import ssl  # noqa: PLC0415

        connection = self._connection()
        try:
            try:
                connection.request(method, path, body=body, headers=self._headers(headers))
                answer = connection.getresponse()
            except ssl.SSLError as exc:
                raise TransportError(
                    f"TLS with the node at {self.target.describe()} failed: {exc.reason}; "
                    "check GATEWAY_API_CA or the home's [server] tls_ca",
                    reason="client.tls",
                ) from None
            except (ConnectionRefusedError, FileNotFoundError, socket.gaierror) as exc:
                raise self._not_running(exc) from None
            except (OSError, http.client.HTTPException) as exc:
                raise TransportError(
                    f"the node at {self.target.describe()} closed the connection "
                    f"({type(exc).__name__}); try again, or see the node's log",
                    reason="client.connection",
                ) from None
            if answer.status >= 400:
                raise error_from_answer(answer.status, answer.read(_MAX_ERROR_BYTES))
            yield answer
        finally:
            connection.close()

    def _whole(
        self,
        method: str,
        path: str,
        *,
        body: bytes | Iterable[bytes] | None,
        headers: Mapping[str, str],
    ) -> bytes:
        """Send one request and return the whole successful answer's body (bounded).

        Over the Unix socket by :func:`gateway.client.plainhttp.exchange`, else
        through :meth:`open`; the errors are those of :meth:`open`.
        """
        if self.target.socket_path is None:
            with self.open(method, path, body=body, headers=headers) as streamed:
                return read_bounded(streamed, MAX_ANSWER_BYTES)
        from gateway.client import plainhttp  # noqa: PLC0415

        try:
            answer = plainhttp.exchange(
                method,
                path,
                body=body,
                headers=self._headers(headers),
                limit=MAX_ANSWER_BYTES,
                socket_path=self.target.socket_path,
                connect_timeout=_CONNECT_TIMEOUT,
                timeout=_READ_TIMEOUT,
            )
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise self._not_running(exc) from None
        except plainhttp.AnswerTooLarge:
            raise TransportError(
                f"the node's answer is larger than {MAX_ANSWER_BYTES} bytes",
                reason="client.answer",
            ) from None
        except (OSError, plainhttp.ProtocolError) as exc:
            raise TransportError(
                f"the node at {self.target.describe()} closed the connection "
                f"({type(exc).__name__}); try again, or see the node's log",
                reason="client.connection",
            ) from None
        if answer.status >= 400:
            raise error_from_answer(answer.status, answer.body[:_MAX_ERROR_BYTES])
        return answer.body

    def call(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
    ) -> Any:
        """One JSON request and its JSON answer (bounded to :data:`MAX_ANSWER_BYTES`)."""
        body = None
        headers: dict[str, str] = {"Accept": "application/json"}
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif method != "GET":
            body = b""
        data = self._whole(method, path, body=body, headers=headers)
        try:
            return json.loads(data.decode("utf-8")) if data else None
        except (UnicodeDecodeError, ValueError):
            raise TransportError("the node's answer is not JSON", reason="client.answer") from None

    def send_stream(
        self, method: str, path: str, body: Iterable[bytes], *, headers: Mapping[str, str]
    ) -> Any:
        """Send a streamed body (its length in ``headers``) and read the JSON answer."""
        data = self._whole(method, path, body=body, headers=headers)
        try:
            return json.loads(data.decode("utf-8")) if data else None
        except (UnicodeDecodeError, ValueError):
            raise TransportError("the node's answer is not JSON", reason="client.answer") from None

    @contextmanager
    def lines(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Iterator[Iterator[Any]]:
        """Ask for an NDJSON answer and yield an iterator over its lines, each parsed.

        Each line is bounded to :data:`MAX_ANSWER_BYTES`; a longer line, one
        that is not JSON, or a stream cut off raises :class:`TransportError`.
        Errors before the stream starts are raised as by :meth:`call`.
        """
        body = json.dumps(payload).encode("utf-8") if payload is not None else b""
        headers = {"Accept": "application/x-ndjson", "Content-Type": "application/json"}
        with self.open(method, path, body=body, headers=headers) as answer:
            yield _parsed_lines(answer)

    def receive_files(
        self,
        path: str,
        out_dir: Path,
        *,
        payload: Mapping[str, Any] | None = None,
        progress_enabled: bool = True,
    ) -> tuple[Received, dict[str, Any]]:
        """Ask for a file stream (GET, or POST with ``payload``) and unpack it into ``out_dir``.

        Returns what was placed and the command's result from the stream's
        closing list. All or nothing: see :func:`gateway.client.files.receive_files`.
        """
        from gateway.client.files import receive_files  # noqa: PLC0415
        from gateway.client.framing import TOTAL_BYTES_HEADER  # noqa: PLC0415
        from gateway.client.progress import transfer_progress  # noqa: PLC0415

        method, body, headers = "GET", None, {"Accept": "application/x-tar"}
        if payload is not None:
            method, body = "POST", json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        with self.open(method, path, body=body, headers=headers) as answer:
            announced = answer.getheader(TOTAL_BYTES_HEADER)
            total = int(announced) if announced and announced.isdigit() else None
            with transfer_progress("receive", total, enabled=progress_enabled) as progress:
                received = receive_files(answer, out_dir, progress=progress)
        result = received.result
        return received, result if isinstance(result, dict) else {}


def _parsed_lines(answer: http.client.HTTPResponse) -> Iterator[Any]:
    while True:
        try:
            line = answer.readline(MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(
                f"the answer was cut off ({type(exc).__name__})", reason="client.connection"
            ) from None
        if not line:
            return
        if len(line) > MAX_ANSWER_BYTES:
            raise TransportError(
                f"a line of the node's answer is larger than {MAX_ANSWER_BYTES} bytes",
                reason="client.answer",
            )
        if not line.strip():
            continue
        try:
            yield json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise TransportError(
                "a line of the node's answer is not JSON", reason="client.answer"
            ) from None


def copy_answer(answer: http.client.HTTPResponse, out: Any) -> int:
    """Copy a streamed answer to the file ``out`` 64 KiB at a time; the bytes copied.

    Raises :class:`TransportError` if the stream is cut off (the caller removes
    what it wrote).
    """
    import http.client  # noqa: PLC0415

    total = 0
    try:
        while chunk := answer.read(_CHUNK):
            out.write(chunk)
            total += len(chunk)
    except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
        raise TransportError(
            f"the stream from the node was cut off ({type(exc).__name__}); nothing was kept",
            reason="client.stream-cut",
        ) from None
    return total


def read_bounded(answer: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole answer body if it is at most ``limit`` bytes; else :class:`TransportError`."""
    import http.client  # noqa: PLC0415

    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := answer.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise TransportError(
                    f"the node's answer is larger than {limit} bytes", reason="client.answer"
                )
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(
            f"the answer was cut off ({type(exc).__name__})", reason="client.connection"
        ) from None
    return b"".join(chunks)
