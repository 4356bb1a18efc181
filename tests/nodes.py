"""Test helpers for the peer transport and for real node processes.

Two kinds of helpers live here:

- an in-process peer server (:class:`ServerThread`) running the real aiohttp
  application on a real socket in a background thread, with real Ed25519 keys
  (:class:`RawSigner`) and the real database nonce store, for transport tests;
- real ``gateway serve`` processes (:func:`start_serve`, :func:`stop`,
  :func:`kill`, :func:`wait_ready`, :func:`wait_health`) for end-to-end tests:
  the process harness of :mod:`gateway.demo.harness`, which ``gateway demo``
  uses too, with this source tree's ``gateway`` command line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import nacl.signing
from aiohttp import web

from gateway.core.domain import tagged
from gateway.demo import harness
from gateway.demo.harness import (  # noqa: F401 - shared with gateway demo; tests import it from here
    GATEWAY,
    ServeProcess,
    free_port,
    kill,
    milestones,
    stop,
    wait_health,
    wait_ready,
)
from gateway.errors import NotFound
from gateway.peer.server import (
    PeerServer,
    PeerServices,
    TransportLimits,
    create_peer_app,
    database_nonce_recorder,
)
from gateway.store.db import Database, open_database

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Program:
    """How a test starts ``gateway``: the command, its working folder, and whether
    the source tree is put on ``PYTHONPATH`` (not for an installed package)."""

    argv: tuple[str, ...] = GATEWAY
    cwd: Path = REPO
    source_on_path: bool = True


SOURCE = Program()
"""``gateway`` run from this source tree by the test interpreter."""

TEST_LIMITS = TransportLimits(
    max_header_bytes=4096,
    max_body_bytes=64 * 1024,
    max_envelope_bytes=16 * 1024,
    max_batch_envelopes=4,
    max_small_body_bytes=16 * 1024,
    rate_per_second=1000.0,
    rate_burst=1000,
    body_idle_timeout=1.0,
    body_total_timeout=5.0,
    clock_skew=timedelta(minutes=5),
)


@dataclass
class RawSigner:
    """A node's operational signing key as a plain libsodium key."""

    node: str
    signing_key_id: str
    key: nacl.signing.SigningKey

    @classmethod
    def make(cls, node: str, key_id: str) -> RawSigner:
        return cls(node, key_id, nacl.signing.SigningKey.generate())

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        return bytes(self.key.sign(tagged(purpose, payload)).signature)

    @property
    def public_key(self) -> bytes:
        return bytes(self.key.verify_key)


@dataclass
class KeyTable:
    """The peer's signing keys a server accepts (stands in for the pinned manifest)."""

    keys: dict[str, bytes] = field(default_factory=dict)

    def lookup(self, key_id: str, _at: datetime) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise NotFound(f"no signing key {key_id}") from None


@dataclass
class EnvelopeStore:
    """A real receiving handler: keeps envelopes in a folder, answers a fake-free receipt.

    The receipt is the SHA-256 of the envelope signed by the receiving node's
    key, which is enough for transport tests to check that the right bytes
    arrived and the receipt bytes travel unchanged.
    """

    folder: Path
    signer: RawSigner
    refuse_containing: bytes = b"REFUSE"

    def __call__(self, path: Path, *, now: datetime) -> bytes:
        from gateway.errors import VerificationError  # noqa: PLC0415

        data = path.read_bytes()
        if self.refuse_containing in data:
            raise VerificationError("test envelope is marked bad", reason="envelope.signature")
        import hashlib  # noqa: PLC0415

        digest = hashlib.sha256(data).hexdigest()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / digest).write_bytes(data)
        return self.signer.sign(b"ssw-gateway/receipt/v1", bytes.fromhex(digest))

    def stored(self) -> list[bytes]:
        if not self.folder.exists():
            return []
        return sorted(p.read_bytes() for p in self.folder.iterdir())


def migrated_database(url: str) -> Database:
    db = open_database(url)
    db.upgrade()
    return db


def make_services(
    tmp_path: Path,
    db: Database,
    *,
    keys: KeyTable,
    receiver: RawSigner,
    node_id: str = "pk",
    peer_id: str = "jp",
    clock: Callable[[], datetime] | None = None,
    apply_manifest: Any = None,
    preview_manifest: Any = None,
) -> tuple[PeerServices, EnvelopeStore]:
    from gateway.node.runtime import utc_now  # noqa: PLC0415

    now = clock or utc_now
    store = EnvelopeStore(tmp_path / "received", receiver)
    services = PeerServices(
        node_id=node_id,
        peer_id=peer_id,
        spool_dir=tmp_path / "spool",
        lookup_key=keys.lookup,
        remember_nonce=database_nonce_recorder(db, skew=timedelta(minutes=5), clock=now),
        receive_envelope=store,
        apply_manifest=apply_manifest,
        preview_manifest=preview_manifest,
        clock=now,
    )
    return services, store


class ServerThread:
    """The peer application served on 127.0.0.1 from a background event loop."""

    def __init__(
        self,
        app: web.Application,
        limits: TransportLimits = TEST_LIMITS,
        *,
        host: str = "127.0.0.1",
        ssl_context: Any = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.host = host
        self.ssl_context = ssl_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: PeerServer | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._server = PeerServer(self.app, self.limits, drain_timeout=2.0)
        server = self._server
        self.port = self._call(server.start(self.host, 0, ssl_context=self.ssl_context))
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._call(self._server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"


def start_test_server(
    services: PeerServices, limits: TransportLimits = TEST_LIMITS, **kwargs: Any
) -> ServerThread:
    return ServerThread(create_peer_app(services, limits), limits, **kwargs)


# --- raw sockets ---------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks: list[bytes] = []
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            if _complete_response(b"".join(chunks)):
                sock.settimeout(3.0)
        return b"".join(chunks), closed


def _complete_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise AssertionError(f"not an HTTP response: {response[:80]!r}")
    return int(parts[1])


# --- real gateway processes -----------------------------------------------------------------


def gateway_env(home: Path, *, program: Program = SOURCE, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "PYTHONPATH"
    }
    env["GATEWAY_HOME"] = str(home)
    env.setdefault("GATEWAY_PASSPHRASE", "correct horse battery staple")
    # Key files made in tests use the cheapest Argon2id cost; production keeps the default.
    env.setdefault("GATEWAY_KEYSTORE_STRENGTH", os.environ.get("GATEWAY_KEYSTORE_STRENGTH", "min"))
    if "GATEWAY_TEST_PG_URL" in os.environ:
        env["GATEWAY_TEST_PG_URL"] = os.environ["GATEWAY_TEST_PG_URL"]
    if program.source_on_path:
        env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_gateway(
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    program: Program = SOURCE,
) -> subprocess.CompletedProcess[str]:
    """Run one ``gateway`` command to completion for the node at ``home``."""
    return subprocess.run(  # noqa: PLW1510 - callers check returncode themselves
        [*program.argv, "--home", str(home), *args],
        env=env or gateway_env(home, program=program),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=program.cwd,
    )


def start_serve(
    home: Path, *, env: dict[str, str] | None = None, program: Program = SOURCE
) -> ServeProcess:
    """Start ``gateway serve`` for the node at ``home`` (does not wait for readiness)."""
    return harness.start_serve(
        home, env=env or gateway_env(home, program=program), argv=program.argv, cwd=program.cwd
    )


# --- two node homes with keys exchanged and pinned -------------------------------------------

_USER_COMMANDS = {
    "send", "inbox", "outbox", "show", "resend", "consent", "disclose", "users", "approvals",
    ("ledger", "list"), ("ledger", "verify"), ("ledger", "export"), ("ledger", "audit-peer"), ("ledger", "account"),
    ("peer", "show"), ("keys", "show"),
}  # fmt: skip


def is_user_command(args: tuple[str, ...]) -> bool:
    """True for the commands that are clients of the running node (SPEC §8)."""
    words = [a for a in args if not a.startswith("-")]
    return bool(words) and (words[0] in _USER_COMMANDS or tuple(words[:2]) in _USER_COMMANDS)


def socket_answers(home: Path) -> bool:
    """True when a node answers on ``<home>/run/api.sock``."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(home / "run" / "api.sock"))
        except OSError:
            return False
    return True


@dataclass
class NodeHome:
    """One initialised node home and what tests need to drive it."""

    node_id: str
    home: Path
    port: int
    api_port: int
    passphrase: str
    admin_token: str
    db_url: str | None = None
    program: Program = SOURCE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, *, token: str | None = None, **extra: str) -> dict[str, str]:
        env = gateway_env(
            self.home, program=self.program, GATEWAY_PASSPHRASE=self.passphrase, **extra
        )
        env["GATEWAY_KEYSTORE_STRENGTH"] = "interactive"
        env["GATEWAY_TOKEN"] = token if token is not None else self.admin_token
        return env

    def run(self, *args: str, token: str | None = None, check: bool = True) -> Any:
        """Run ``gateway --json ARGS`` for this node; return the parsed JSON output.

        A user command is a client of the running node: when no ``gateway serve``
        of this home answers on its socket, the node is served in this process
        (the same local API app on the same socket) while the command runs.
        """
        import json  # noqa: PLC0415

        def call() -> subprocess.CompletedProcess[str]:
            return run_gateway(
                self.home, "--json", *args, env=self.env(token=token), program=self.program
            )

        if is_user_command(args) and not socket_answers(self.home):
            from tests.node_api import serving_home  # noqa: PLC0415

            with serving_home(self.home, self.env(), passphrase=self.passphrase):
                done = call()
        else:
            done = call()
        if check and done.returncode != 0:
            raise AssertionError(
                f"gateway {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return json.loads(done.stdout) if done.stdout.strip() else None

    def add_user(self, name: str, role: str) -> str:
        """Add a user on the host (as ``init`` adds the first administrator); its token.

        ``gateway users add`` is a client of the running node; test set-up that
        runs before ``serve`` adds users through the node's own service instead.
        """
        from gateway.node.runtime import utc_now  # noqa: PLC0415
        from gateway.node.users import add_user  # noqa: PLC0415
        from gateway.settings import load_settings  # noqa: PLC0415

        settings = load_settings(self.home, environ=self.env())
        db = open_database(settings.database_url)
        try:
            with db.transaction() as session:
                return add_user(session, name, role, created_by="admin", now=utc_now()).token.text
        finally:
            db.dispose()

    def serve(self, **extra: str) -> ServeProcess:
        return start_serve(self.home, env=self.env(**extra), program=self.program)

    def host_operation(self, action: str, work: Callable[..., T], *args: Any) -> T:
        """``work(session, settings, *args, actor=...)`` run as the host command
        ``action`` runs it, in this process: the node opened, the administrator's token
        authorized for ``action``, then one transaction."""
        from gateway.node.runtime import Node  # noqa: PLC0415
        from gateway.node.users import authorize  # noqa: PLC0415
        from gateway.settings import load_settings  # noqa: PLC0415

        settings = load_settings(self.home, environ=self.env())
        with Node.open(settings) as node:
            with node.db.transaction() as session:
                actor = authorize(session, self.admin_token, action)
            with node.db.transaction() as session:
                return work(session, settings, *args, actor=actor)

    def keyring(self) -> Any:
        """This node's unlocked keyring, in this process (to sign requests by hand)."""
        from gateway.node.own_keys import unlock_keyring  # noqa: PLC0415
        from gateway.settings import load_settings  # noqa: PLC0415

        settings = load_settings(self.home, environ=self.env())
        db = open_database(settings.database_url)
        try:
            with db.transaction() as session:
                return unlock_keyring(settings, self.passphrase.encode(), session)
        finally:
            db.dispose()


def init_pair(
    root: Path, *, db_urls: dict[str, str] | None = None, program: Program = SOURCE
) -> dict[str, NodeHome]:
    """Initialise ``jp`` and ``pk`` under ``root`` on free loopback ports, each
    pinning the other's key manifest by its root fingerprint; ``program`` says
    which ``gateway`` runs (this source tree by default, or an installed one)."""
    import json  # noqa: PLC0415
    import secrets  # noqa: PLC0415

    ports = {node_id: (free_port(), free_port()) for node_id in ("jp", "pk")}
    nodes: dict[str, NodeHome] = {}
    for node_id, peer in (("jp", "pk"), ("pk", "jp")):
        home = root / node_id
        passphrase = secrets.token_urlsafe(18)
        args = [
            "--json",
            "init",
            "--node",
            node_id,
            "--listen",
            f"127.0.0.1:{ports[node_id][0]}",
            "--api-listen",
            f"127.0.0.1:{ports[node_id][1]}",
            "--peer-url",
            f"http://127.0.0.1:{ports[peer][0]}",
        ]
        url = (db_urls or {}).get(node_id)
        if url is not None:
            args += ["--db", url]
        env = gateway_env(
            home,
            program=program,
            GATEWAY_PASSPHRASE=passphrase,
            GATEWAY_KEYSTORE_STRENGTH="interactive",
        )
        done = run_gateway(home, *args, env=env, program=program)
        if done.returncode != 0:
            raise AssertionError(f"gateway init {node_id} failed:\n{done.stdout}\n{done.stderr}")
        token = json.loads(done.stdout)["admin_token"]
        nodes[node_id] = NodeHome(
            node_id, home, ports[node_id][0], ports[node_id][1], passphrase, token, url, program
        )
    fingerprints: dict[str, str] = {}
    if program != SOURCE:
        # An installed gateway pins with its own commands.
        for node_id, peer in (("jp", "pk"), ("pk", "jp")):
            manifest = root / f"{peer}-manifest.json"
            if peer not in fingerprints:
                # A host operation: ``keys show`` would need the node running.
                exported = nodes[peer].run("keys", "export", "--out", str(manifest))
                fingerprints[peer] = exported["root_fingerprint"]
            nodes[node_id].run("peer", "add", str(manifest), "--fingerprint", fingerprints[peer])
        return nodes
    # The same two host operations, run in this process (a command each would start
    # a process that imports the whole gateway for a few milliseconds of work).
    for node_id, peer in (("jp", "pk"), ("pk", "jp")):
        manifest = root / f"{peer}-manifest.json"
        if peer not in fingerprints:
            fingerprints[peer] = nodes[peer].host_operation(
                "keys.export", _export_manifest, manifest
            )
        nodes[node_id].host_operation("peer.add", _pin_peer, manifest, fingerprints[peer])
    return nodes


def _export_manifest(session: Any, settings: Any, out: Path, *, actor: Any) -> str:
    """What ``gateway keys export --out OUT`` does; the exported root fingerprint."""
    from gateway.node import own_keys  # noqa: PLC0415

    del settings, actor
    return str(own_keys.export_manifest(session, out).root_fingerprint)


def _pin_peer(session: Any, settings: Any, manifest: Path, fingerprint: str, *, actor: Any) -> None:
    """What ``gateway peer add MANIFEST --fingerprint FP`` does."""
    from gateway.node import peer_trust  # noqa: PLC0415
    from gateway.node.runtime import utc_now  # noqa: PLC0415

    peer_trust.pin_peer(
        session,
        manifest.read_bytes(),
        node=peer_trust.peer_node_of(settings.node_id),
        expected_fingerprint=fingerprint,
        now=utc_now(),
        actor=actor,
    )


# --- two nodes opened in this process, keys exchanged and pinned -----------------------------


def open_pinned_pair(
    root: Path, urls: dict[str, str], environ: dict[str, str], *, now: datetime
) -> dict[str, Any]:
    """``init_node`` jp and pk under ``root`` on the given databases, open both in this
    process and pin each one's manifest at the other (what ``peer add`` does)."""
    from gateway.core.roles import Actor, Role  # noqa: PLC0415
    from gateway.node import own_keys, peer_trust  # noqa: PLC0415
    from gateway.node.runtime import Node  # noqa: PLC0415
    from gateway.node.setup import init_node  # noqa: PLC0415
    from gateway.settings import load_settings  # noqa: PLC0415

    nodes: dict[str, Node] = {}
    for node_id in ("jp", "pk"):
        init_node(root / node_id, node_id, now=now, db_url=urls[node_id], environ=environ)
        nodes[node_id] = Node.open(load_settings(root / node_id, environ=environ))
    manifests = {}
    for node_id, node in nodes.items():
        with node.db.transaction() as session:
            manifests[node_id] = own_keys.own_manifest(session)
    admin = Actor(name="admin", role=Role.ADMIN)
    for node_id, node in nodes.items():
        peer = "pk" if node_id == "jp" else "jp"
        with node.db.transaction() as session:
            peer_trust.pin_peer(
                session,
                manifests[peer].raw,
                node=peer,
                expected_fingerprint=manifests[peer].root_fingerprint,
                now=now,
                actor=admin,
            )
    return nodes
