"""The demonstration story: two real nodes on loopback, driven through the real CLI.

Every step runs the ``gateway`` command line as its own process with its own
environment (the acting user's token, the node's passphrase) and exit code,
exactly as an officer, administrator or compliance officer would type it; both
nodes run as real ``gateway serve`` processes talking HTTP on loopback. The
story therefore proves the whole product (argument parsing, exit codes, JSON
output, the peer protocol, the databases) rather than a shortcut through
in-process service calls, and every command it shows can be run by hand
against the homes ``--keep`` leaves behind. How a command process is made is a
:data:`Runner`: a fresh interpreter (:func:`exec_runner`), or the CLI's
forked runner, which skips the interpreter start.

A step whose command does not exist in this build is reported as not
available (``ok`` false); a step that needs an earlier step's result is not
run when that step did not succeed. Nothing is ever reported as done that was
not done.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.demo.harness import (
    GATEWAY,
    ServeFailed,
    ServeProcess,
    free_port,
    milestones,
    start_serve,
    stop_or_kill,
    wait_health,
)

__all__ = [
    "THIRD_PARTY",
    "CommandResult",
    "DemoInterrupted",
    "DemoNode",
    "DemoStory",
    "Runner",
    "StepOutcome",
    "exec_runner",
    "free_port",
]

THIRD_PARTY = "Aichi Prefectural Police HQ"
SECOND_APPROVER = "pk-approver"
"""Islamabad's second officer holding the approver capability."""
PURPOSE = "criminal investigation of broker fraud against SSW workers in Aichi"
COMMAND_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# Argon2id cost of the demo's key files: "interactive" keeps the story quick;
# a real node uses the default ("moderate") or stronger.
DEMO_KEYSTORE_STRENGTH = "interactive"
CITY = {"jp": "Tokyo", "pk": "Islamabad"}
PEER = {"jp": "pk", "pk": "jp"}


class StepFailed(Exception):
    """A step did not reach its expected result; the message says what happened."""


class DemoInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while the story ran; the nodes are being stopped."""


@dataclass(frozen=True)
class StepOutcome:
    """The result of one step, as printed and as ``gateway demo --json`` reports it."""

    number: int
    total: int
    name: str
    title: str
    ok: bool
    detail: str
    available: bool = True
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.number,
            "name": self.name,
            "title": self.title,
            "ok": self.ok,
            "available": self.available,
            "detail": self.detail,
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class CommandResult:
    """One finished ``gateway`` command."""

    display: str
    code: int
    stdout: str
    stderr: str

    def data(self) -> Any:
        """The command's ``--json`` output, parsed."""
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            raise StepFailed(
                f"`{self.display}` printed no JSON (exit {self.code}): {self.error_line()}"
            ) from None

    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1][:300] if lines else "(no message)"


@dataclass
class DemoNode:
    """One of the two demo nodes: its home, addresses, secrets and process."""

    node_id: str
    home: Path
    port: int
    api_port: int
    passphrase: str
    tokens: dict[str, str] = field(default_factory=dict, repr=False)
    process: ServeProcess | None = field(default=None, repr=False)

    @property
    def city(self) -> str:
        return CITY[self.node_id]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "serve.log"


def _broker_case() -> dict[str, Any]:
    """The MOC 4(1) case Islamabad reports: a sending broker collecting deposits."""
    return {
        "broker": {
            "kind": "corporation",
            "name": "Green Crescent Overseas Employment Promoters (Pvt) Ltd",
            "country": "PAK",
            "licence_number": "OEP-3120/RWP",
            "registration_number": "0123456",
            "address": "Plot 14, I-9 Markaz, Islamabad",
            "representative": "Imran Qureshi",
        },
        "acts": ["a", "e"],
        "summary": (
            "The promoter collected a deposit of PKR 450,000 from each of three candidates "
            "for food-service placements in Aichi, to be forfeited on resignation, and charged "
            "fees without showing how they were calculated."
        ),
        "period": {"start": "2026-03-01", "end": "2026-09-30"},
        "affected": [
            {
                "family_name": "Khan",
                "given_names": "Ayesha",
                "passport_number": "AB1234561",
                "nationality": "PAK",
                "date_of_birth": "1998-04-12",
                "status": "worker",
            },
            {
                "family_name": "Ahmed",
                "given_names": "Bilal",
                "passport_number": "CD7654321",
                "nationality": "PAK",
                "date_of_birth": "2000-11-02",
                "status": "candidate",
            },
        ],
        "measures_taken": "Licence suspended by the Bureau of Emigration on 2026-10-15.",
    }


_EVIDENCE = (
    b"RECEIPT No. 0457\n"
    b"Received from Ayesha Khan the sum of PKR 450,000 as security deposit,\n"
    b"not refundable if the candidate leaves the employer before three years.\n"
    b"Green Crescent Overseas Employment Promoters (Pvt) Ltd\n"
)


def _find(data: Any, key: str) -> Any:
    """``data[key]`` from a command's JSON output, or a step failure naming what is missing."""
    if isinstance(data, dict) and data.get(key) not in (None, ""):
        return data[key]
    raise StepFailed(f"the command's JSON output has no {key}: {data!r:.200}")


Step = Callable[[], str]

Runner = Callable[[Sequence[str], Mapping[str, str], float], tuple[int, str, str]]
"""Runs ``gateway ARGV`` as its own process with exactly the environment given;
returns (exit code, stdout, stderr); raises ``subprocess.TimeoutExpired``."""


def exec_runner(
    argv: Sequence[str], env: Mapping[str, str], timeout: float
) -> tuple[int, str, str]:
    """A fresh interpreter per command: the plain way, and the fallback."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and fixed arguments
        [*GATEWAY, *argv],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout, done.stderr


@dataclass
class _StepSpec:
    name: str
    title: str
    commands: tuple[str, ...]
    requires: tuple[str, ...]
    run: Step


class DemoStory:
    """Runs the story in ``root``; reports each step through ``on_step``.

    ``available`` says whether a ``gateway`` command path (``"consent grant"``)
    exists in this build; ``on_command`` sees each command line as it runs
    (tokens and passphrases are never part of it).
    """

    def __init__(
        self,
        root: Path,
        *,
        available: Callable[[str], bool],
        on_step: Callable[[StepOutcome], None],
        on_start: Callable[[int, int, str], None] | None = None,
        on_command: Callable[[str], None] | None = None,
        environ: Mapping[str, str] | None = None,
        runner: Runner = exec_runner,
    ) -> None:
        self.root = root
        self.runner = runner
        self.available = available
        self.on_step = on_step
        self.on_start = on_start or (lambda _number, _total, _title: None)
        self.on_command = on_command or (lambda _line: None)
        base = dict(os.environ if environ is None else environ)
        self._base_env = {k: v for k, v in base.items() if not k.startswith("GATEWAY_")}
        self.nodes: dict[str, DemoNode] = {}
        self.outcomes: list[StepOutcome] = []
        self.files: dict[str, Path] = {}
        self._facts: dict[str, Any] = {}
        self.signalled: str | None = None
        self._steps = self._plan()

    # -- running -------------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self._steps)

    def run(self) -> list[StepOutcome]:
        """Run every step, then stop the nodes (also when interrupted)."""
        previous = self._install_signal_handlers()
        try:
            for number, spec in enumerate(self._steps, start=1):
                self._check_signalled()
                self.on_start(number, self.total, spec.title)
                self.outcomes.append(self._run_step(number, spec))
                self.on_step(self.outcomes[-1])
        finally:
            try:
                self.stop_nodes()
            finally:
                self._restore_signal_handlers(previous)
        return self.outcomes

    def _run_step(self, number: int, spec: _StepSpec) -> StepOutcome:
        missing = [c for c in spec.commands if not self.available(c)]
        if missing:
            return StepOutcome(
                number,
                self.total,
                spec.name,
                spec.title,
                ok=False,
                available=False,
                detail="not available in this build: " + ", ".join(f"gateway {c}" for c in missing),
            )
        failed = [o.name for o in self.outcomes if o.name in spec.requires and not o.ok]
        if failed:
            return StepOutcome(
                number,
                self.total,
                spec.name,
                spec.title,
                ok=False,
                detail=f"not run: it needs step(s) {', '.join(failed)}, which did not succeed",
            )
        started = time.monotonic()
        try:
            detail = spec.run()
            ok = True
        except StepFailed as exc:
            detail, ok = str(exc), False
        return StepOutcome(
            number,
            self.total,
            spec.name,
            spec.title,
            ok=ok,
            detail=detail,
            seconds=time.monotonic() - started,
        )

    def _check_signalled(self) -> None:
        if self.signalled is not None:
            raise DemoInterrupted(self.signalled)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def interrupted(signum: int, _frame: FrameType | None) -> None:
            # Remembered as well as raised: should the exception be swallowed
            # (a hook that ignores errors), the story still stops at the next check.
            self.signalled = signal.Signals(signum).name
            raise DemoInterrupted(self.signalled)

        previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, interrupted)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # -- commands ------------------------------------------------------------------

    def _env(self, node: DemoNode, user: str | None) -> dict[str, str]:
        """The host operator has the passphrase (and the administrator acts on the host);
        officers and compliance officers have their token only: their commands reach
        the running node through its socket."""
        env = dict(self._base_env)
        env["GATEWAY_HOME"] = str(node.home)
        env.pop("GATEWAY_PASSPHRASE", None)
        if user in (None, "admin"):
            env["GATEWAY_PASSPHRASE"] = node.passphrase
            env["GATEWAY_KEYSTORE_STRENGTH"] = DEMO_KEYSTORE_STRENGTH
        if user is not None:
            env["GATEWAY_TOKEN"] = node.tokens[user]
        return env

    def gateway(
        self, node: DemoNode, user: str | None, *args: str, expect: Sequence[int] = (0,)
    ) -> CommandResult:
        """Run ``gateway --home <node> ARGS --json`` as ``user``; check its exit code."""
        argv = ["--home", str(node.home), *args, "--json"]
        who = f"{node.node_id}/{user}" if user else node.node_id
        # Shown relative to the demo folder, which is printed once at the start.
        prefix = f"{self.root}{os.sep}"
        display = f"[{who}] gateway " + shlex.join(
            a.removeprefix(prefix) for a in ["--home", str(node.home), *args]
        )
        self._check_signalled()
        self.on_command(display)
        try:
            code, stdout, stderr = self.runner(argv, self._env(node, user), COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"`{display}` did not finish in {COMMAND_TIMEOUT:.0f} s") from None
        result = CommandResult(display, code, stdout, stderr)
        if result.code not in expect:
            raise StepFailed(
                f"`{display}` exited {result.code}, expected "
                f"{' or '.join(map(str, expect))}: {result.error_line()}"
            )
        return result

    def _wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while True:
            if check():
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"{what} did not happen within {DELIVERY_TIMEOUT:.0f} s")
            time.sleep(0.3)

    def _deliver(self, sender: DemoNode) -> None:
        """Deliver the sender's outbox now (the running node would within seconds)."""
        if self.available("sync"):
            self.gateway(sender, None, "sync")

    # -- nodes ---------------------------------------------------------------------

    def start_node(self, node: DemoNode) -> None:
        if node.process is not None and node.process.running():
            return
        self.on_command(
            f"[{node.node_id}] gateway --home {node.home.name} serve    (logs: {node.home.name}/serve.log)"
        )
        node.process = start_serve(
            node.home, env=self._env(node, None), log_path=node.log_path, new_session=True
        )
        try:
            wait_health(node.url, timeout=START_TIMEOUT, serve=node.process)
        except ServeFailed as exc:
            code = node.process.process.returncode
            if code is not None:
                raise StepFailed(
                    f"gateway serve for {node.node_id} exited with {code}; see {node.log_path}"
                ) from None
            raise StepFailed(
                f"{node.city} did not answer /v1/health within {START_TIMEOUT:.0f} s"
            ) from exc

    def stop_node(self, node: DemoNode) -> int | None:
        """SIGTERM the node and wait; SIGKILL only if it does not stop in time."""
        serve = node.process
        if serve is None:
            return None
        node.process = None
        # Too slow, or a second Ctrl-C while stopping (DemoInterrupted): stopped hard.
        return stop_or_kill(serve, timeout=STOP_TIMEOUT)

    def stop_nodes(self) -> dict[str, int | None]:
        return {node.node_id: self.stop_node(node) for node in self.nodes.values()}

    # -- the story -----------------------------------------------------------------

    def _plan(self) -> list[_StepSpec]:
        def step(
            name: str, title: str, commands: tuple[str, ...], requires: tuple[str, ...], run: Step
        ) -> _StepSpec:
            return _StepSpec(name, title, commands, requires, run)

        return [
            step(
                "init", "Create the Tokyo (jp) and Islamabad (pk) nodes", ("init",), (), self._init
            ),
            step(
                "pin-refused",
                "Pinning the peer with a wrong root fingerprint is refused",
                ("keys export", "peer add"),
                ("init",),
                self._pin_refused,
            ),
            step(
                "keys-exchange",
                "Exchange key manifests, each pinned by its root fingerprint",
                ("keys export", "peer add"),
                ("init",),
                self._keys_exchange,
            ),
            step(
                "start",
                "Start both nodes (gateway serve) on loopback",
                ("serve",),
                ("keys-exchange",),
                self._start,
            ),
            step(
                "users",
                "Add officers and compliance officers (through the running node); Islamabad's "
                "host operator enrols its two approvers, so no one else holds their tokens",
                ("users add", "users enrol"),
                ("start",),
                self._users,
            ),
            step(
                "send",
                "Islamabad sends a broker-misconduct case with an attachment",
                ("send",),
                ("start", "users"),
                self._send,
            ),
            step(
                "receive",
                "Tokyo receives and verifies it; an officer opens it",
                ("inbox", "show"),
                ("send",),
                self._receive,
            ),
            step(
                "disclose-blocked",
                f"Disclosure to {THIRD_PARTY} without consent is blocked",
                ("disclose",),
                ("receive",),
                self._disclose_blocked,
            ),
            step(
                "consent-request",
                "Tokyo asks Islamabad for written consent",
                ("consent request", "consent list"),
                ("receive",),
                self._consent_request,
            ),
            step(
                "consent-grant",
                "Islamabad grants written consent: one approver proposes, a second approves",
                ("consent grant", "approvals approve", "consent list"),
                ("consent-request",),
                self._consent_grant,
            ),
            step(
                "disclose-allowed",
                f"Disclosure to {THIRD_PARTY} now succeeds",
                ("disclose",),
                ("consent-grant",),
                self._disclose_allowed,
            ),
            step(
                "consent-revoke",
                "Islamabad revokes its consent",
                ("consent revoke", "consent list"),
                ("consent-grant",),
                self._consent_revoke,
            ),
            step(
                "disclose-revoked",
                "The next disclosure is blocked again",
                ("disclose",),
                ("consent-revoke",),
                self._disclose_revoked,
            ),
            step(
                "ledgers",
                "Compliance officers verify and export both ledgers",
                ("ledger verify", "ledger export"),
                ("users",),
                self._ledgers,
            ),
            step(
                "key-rotation",
                "Islamabad rotates its keys; Tokyo accepts the new manifest",
                ("keys rotate", "keys show", "peer show", "send", "inbox"),
                ("start", "keys-exchange"),
                self._key_rotation,
            ),
            step("stop", "Stop both nodes cleanly", ("serve",), ("start",), self._stop),
        ]

    def _init(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        ports = {node_id: (free_port(), free_port()) for node_id in ("jp", "pk")}
        for node_id in ("jp", "pk"):
            port, api_port = ports[node_id]
            node = DemoNode(
                node_id=node_id,
                home=self.root / node_id,
                port=port,
                api_port=api_port,
                passphrase=secrets.token_urlsafe(24),
            )
            self.nodes[node_id] = node
            result = self.gateway(
                node,
                None,
                "init",
                "--node",
                node_id,
                "--listen",
                f"127.0.0.1:{port}",
                "--api-listen",
                f"127.0.0.1:{api_port}",
                "--peer-url",
                f"http://127.0.0.1:{ports[PEER[node_id]][0]}",
            )
            node.tokens["admin"] = str(_find(result.data(), "admin_token"))
        jp, pk = self.nodes["jp"], self.nodes["pk"]
        return f"Tokyo on {jp.url}, Islamabad on {pk.url}; homes in {self.root}"

    def _users(self) -> str:
        """One officer and one compliance officer per side, added by the administrator
        through the running node. Islamabad grants consent under the two-person rule
        (policy ``[approvals.consent-grant] k = 2``): its host operator enrols its two
        officers holding the approver capability (``users enrol``, with the keystore
        passphrase), so no one else holds their tokens and their two approvals are
        two people (docs/consent.md, "Token custody")."""
        made = []
        for node in self.nodes.values():
            people = [(f"{node.node_id}-compliance", "compliance", "compliance")]
            if node.node_id == "jp":
                people.insert(0, ("jp-officer", "officer", "officer"))
            for name, role, key in people:
                result = self.gateway(node, "admin", "users", "add", name, "--role", role)
                node.tokens[key] = str(_find(result.data(), "token"))
                made.append(name)
        pk = self.nodes["pk"]
        for name, key in (("pk-officer", "officer"), (SECOND_APPROVER, "approver")):
            result = self.gateway(
                pk, None, "users", "enrol", name, "--role", "officer", "--approver"
            )
            pk.tokens[key] = str(_find(result.data(), "token"))
            made.append(f"{name} (approver, enrolled by the host)")
        return "added " + ", ".join(made)

    def _export_manifest(self, node: DemoNode) -> Path:
        """The node's signed key manifest, exported once per key version."""
        key = f"{node.node_id}-manifest"
        if key not in self.files:
            path = self.root / f"{node.node_id}-manifest.json"
            path.unlink(missing_ok=True)
            exported = self.gateway(node, "admin", "keys", "export", "--out", str(path)).data()
            if not path.is_file():
                raise StepFailed(f"gateway keys export wrote no file at {path}")
            self.files[key] = path
            self._facts[f"{node.node_id}-fingerprint"] = str(_find(exported, "root_fingerprint"))
        return self.files[key]

    def _fingerprint(self, node: DemoNode) -> str:
        """The root fingerprint ``keys export`` printed (the node is not running yet,
        so ``keys show``, a client of the running node, cannot tell it)."""
        key = f"{node.node_id}-fingerprint"
        if key not in self._facts:
            self._export_manifest(node)
        return str(self._facts[key])

    def _pin_refused(self) -> str:
        jp, pk = self.nodes["jp"], self.nodes["pk"]
        manifest = self._export_manifest(pk)
        # Tokyo's own fingerprint stands for one misread on the phone.
        wrong = self._fingerprint(jp)
        result = self.gateway(
            jp, "admin", "peer", "add", str(manifest), "--fingerprint", wrong, expect=(1, 4)
        )
        return f"refused with exit {result.code}: {result.error_line()}"

    def _keys_exchange(self) -> str:
        shown = []
        for node in self.nodes.values():
            peer = self.nodes[PEER[node.node_id]]
            manifest = self._export_manifest(peer)
            # The fingerprint is read out of band (a call between the two
            # administrators); here what the peer's `keys export` printed stands for it.
            fingerprint = self._fingerprint(peer)
            self.gateway(node, "admin", "peer", "add", str(manifest), "--fingerprint", fingerprint)
            shown.append(f"{node.city} pinned {peer.city} ({fingerprint[:16]}...)")
        return "; ".join(shown)

    def _start(self) -> str:
        for node in self.nodes.values():
            self.start_node(node)
        return ", ".join(f"{n.city} healthy at {n.url}" for n in self.nodes.values())

    def _send(self) -> str:
        pk, jp = self.nodes["pk"], self.nodes["jp"]
        case_file = self.root / "broker-case.json"
        case_file.write_text(json.dumps(_broker_case(), indent=2), encoding="utf-8")
        evidence = self.root / "deposit-receipt.txt"
        evidence.write_bytes(_EVIDENCE)
        result = self.gateway(
            pk, "officer", "send", "broker-misconduct", str(case_file), "--attach", str(evidence)
        )
        bundle_id = str(_find(result.data(), "bundle_id"))
        self._facts["bundle_id"] = bundle_id
        self._deliver(pk)
        self._wait_for(
            f"delivery of bundle {bundle_id} to Tokyo",
            lambda: bundle_id in self._inbox_ids(jp),
        )
        return f"bundle {bundle_id} delivered to Tokyo with a signed receipt"

    def _inbox_ids(self, node: DemoNode) -> set[str]:
        data = self.gateway(node, "officer", "inbox").data()
        rows = _find(data, "bundles")
        if not isinstance(rows, list):
            raise StepFailed("gateway inbox: bundles is not a list")
        return {str(_find(row, "bundle_id")) for row in rows}

    def _receive(self) -> str:
        jp = self.nodes["jp"]
        bundle_id = self._facts["bundle_id"]
        out = self.root / "tokyo-read"
        result = self.gateway(jp, "officer", "show", bundle_id, "--out", str(out))
        copies = [p for p in out.rglob("*") if p.is_file() and p.read_bytes() == _EVIDENCE]
        if not copies:
            raise StepFailed(f"the attachment was not written intact under {out}")
        data = result.data()
        self.files["tokyo-read"] = out
        return (
            f"{_find(data, 'type')} from {_find(data, 'sender')} "
            f"(sequence {_find(data, 'sequence')}, {_find(data, 'marking')}) verified and "
            f"decrypted; the read is logged; attachment intact at {copies[0]}"
        )

    def _disclose(self, expect: int, out_name: str) -> CommandResult:
        jp = self.nodes["jp"]
        out = self.root / out_name
        return self.gateway(
            jp,
            "officer",
            "disclose",
            self._facts["bundle_id"],
            "--recipient",
            THIRD_PARTY,
            "--purpose",
            PURPOSE,
            "--out",
            str(out),
            expect=(expect,),
        )

    def _disclose_blocked(self) -> str:
        result = self._disclose(3, "disclosed-without-consent")
        leaked = self.root / "disclosed-without-consent"
        if leaked.exists() and any(p.is_file() for p in leaked.rglob("*")):
            raise StepFailed(f"exit 3, but files were written under {leaked}")
        return f"exit 3, nothing released, attempt recorded: {result.error_line()}"

    def _consent_rows(self, node: DemoNode, kind: str) -> list[dict[str, Any]]:
        """The ``requests`` or ``consents`` listed by ``gateway consent list``."""
        rows = _find(self.gateway(node, "officer", "consent", "list").data(), kind)
        if not isinstance(rows, list):
            raise StepFailed(f"gateway consent list: {kind} is not a list")
        return [row for row in rows if isinstance(row, dict)]

    def _consent_state(self, node: DemoNode, consent_id: str) -> str | None:
        for row in self._consent_rows(node, "consents"):
            if row.get("consent_id") == consent_id:
                return str(row.get("state"))
        return None

    def _consent_request(self) -> str:
        jp, pk = self.nodes["jp"], self.nodes["pk"]
        result = self.gateway(
            jp,
            "officer",
            "consent",
            "request",
            self._facts["bundle_id"],
            "--recipient",
            THIRD_PARTY,
            "--purpose",
            PURPOSE,
        )
        request_id = str(_find(result.data(), "request_id"))
        self._facts["request_id"] = request_id
        self._deliver(jp)
        self._wait_for(
            f"consent request {request_id} reaching Islamabad",
            lambda: any(
                row.get("request_id") == request_id for row in self._consent_rows(pk, "requests")
            ),
        )
        return f"request {request_id} delivered to Islamabad"

    def _consent_grant(self) -> str:
        jp, pk = self.nodes["jp"], self.nodes["pk"]
        valid_until = (date.today() + timedelta(days=30)).isoformat()  # noqa: DTZ011 - a calendar date for the officer
        result = self.gateway(
            pk,
            "officer",
            "consent",
            "grant",
            self._facts["request_id"],
            "--valid-until",
            valid_until,
            "--max-uses",
            "5",
        )
        proposed = result.data()
        if _find(proposed, "state") != "pending":
            raise StepFailed(f"one officer's grant was not held for a second approval: {proposed}")
        proposal_id = str(_find(proposed, "proposal_id"))
        # the second approver reviews the terms, then approves exactly what was reviewed
        shown = self.gateway(pk, "approver", "approvals", "show", proposal_id).data()
        reviewed = str(_find(shown, "terms_sha256"))
        approved = self.gateway(
            pk, "approver", "approvals", "approve", proposal_id, "--terms", reviewed
        ).data()
        if _find(approved, "state") != "executed":
            raise StepFailed(f"the second approval did not send the grant: {approved}")
        consent_id = str(_find(_find(approved, "result"), "consent_id"))
        self._facts["consent_id"] = consent_id
        self._deliver(pk)
        self._wait_for(
            f"consent {consent_id} reaching Tokyo",
            lambda: self._consent_state(jp, consent_id) == "valid",
        )
        return (
            f"proposal {proposal_id} held (1 of 2 approvals), approved by {SECOND_APPROVER}; "
            f"written consent {consent_id} (valid until {valid_until}, 5 uses) signed and "
            "delivered"
        )

    def _disclose_allowed(self) -> str:
        self._disclose(0, "disclosed-to-aichi")
        out = self.root / "disclosed-to-aichi"
        released = [p for p in out.rglob("*") if p.is_file()]
        if not released:
            raise StepFailed(f"exit 0 but nothing was written under {out}")
        self.files["disclosed"] = out
        return (
            f"released {len(released)} file(s) under consent {self._facts['consent_id']} to {out}"
        )

    def _consent_revoke(self) -> str:
        jp, pk = self.nodes["jp"], self.nodes["pk"]
        consent_id = self._facts["consent_id"]
        self.gateway(
            pk,
            "officer",
            "consent",
            "revoke",
            consent_id,
            "--reason",
            "investigation handed to the National Police Agency",
        )
        self._deliver(pk)

        def revoked() -> bool:
            return self._consent_state(jp, consent_id) == "revoked"

        self._wait_for(f"revocation of {consent_id} reaching Tokyo", revoked)
        return f"revocation of {consent_id} signed and delivered"

    def _disclose_revoked(self) -> str:
        result = self._disclose(3, "disclosed-after-revocation")
        return f"exit 3 after revocation: {result.error_line()}"

    def _ledgers(self) -> str:
        parts = []
        for node in self.nodes.values():
            self.gateway(node, "compliance", "ledger", "verify")
            for fmt in ("jsonl", "csv"):
                out = self.root / f"ledger-{node.node_id}.{fmt}"
                self.gateway(
                    node, "compliance", "ledger", "export", "--format", fmt, "--out", str(out)
                )
                if not out.is_file():
                    raise StepFailed(f"gateway ledger export wrote no file at {out}")
                self.files[f"ledger-{node.node_id}-{fmt}"] = out
            kinds = [
                str(json.loads(line).get("kind"))
                for line in (self.root / f"ledger-{node.node_id}.jsonl")
                .read_text("utf-8")
                .splitlines()
                if line.strip()
            ]
            counted = ", ".join(
                f"{kinds.count(kind)} {kind}"
                for kind in ("disclosure-blocked", "disclosure-made", "consent-granted")
                if kind in kinds
            )
            parts.append(
                f"{node.city}: chain intact, {len(kinds)} entries exported"
                + (f" ({counted})" if counted else "")
            )
        return "; ".join(parts)

    def _pinned_version(self, node: DemoNode) -> Any:
        data = self.gateway(node, "admin", "peer", "show").data()
        return _find(_find(data, "pinned"), "version")

    def _key_rotation(self) -> str:
        jp, pk = self.nodes["jp"], self.nodes["pk"]
        old_version = _find(self.gateway(pk, "admin", "keys", "show").data(), "version")
        serving = self._milestone_count(pk, "serving")
        rotated = self.gateway(pk, "admin", "keys", "rotate").data()
        new_version = _find(rotated, "version")
        if new_version == old_version:
            raise StepFailed(f"the manifest version stayed {old_version} after rotation")
        if pk.process is not None:
            # The running node sees the new key files and restarts with them; its socket
            # is gone for that moment, so the officer's next command waits for it.
            self._wait_for(
                "Islamabad's node serving again with its new keys",
                lambda: self._milestone_count(pk, "serving") > serving,
            )
        # The signed manifest goes to the peer ahead of any bundle.
        self._deliver(pk)
        self._wait_for(
            f"Tokyo pinning Islamabad's manifest version {new_version}",
            lambda: self._pinned_version(jp) == new_version,
        )
        case_file = self.root / "broker-case.json"
        result = self.gateway(pk, "officer", "send", "broker-misconduct", str(case_file))
        bundle_id = str(_find(result.data(), "bundle_id"))
        self._deliver(pk)
        self._wait_for(
            f"delivery of {bundle_id}, signed with the new key, to Tokyo",
            lambda: bundle_id in self._inbox_ids(jp),
        )
        return (
            f"manifest v{old_version} -> v{new_version} "
            f"(new keys {', '.join(map(str, rotated.get('added', [])))}); Tokyo pinned it "
            f"and accepted bundle {bundle_id} signed with the new key"
        )

    @staticmethod
    def _milestone_count(node: DemoNode, event: str) -> int:
        """How many ``event`` milestone lines (serving, restarting) the node's serve wrote."""
        return 0 if node.process is None else len(milestones(node.process, event))

    def _stop(self) -> str:
        codes = self.stop_nodes()
        bad = {k: v for k, v in codes.items() if v not in (0, None)}
        if bad:
            raise StepFailed(
                "a node did not stop cleanly: "
                + ", ".join(f"{k} exited {v}" for k, v in bad.items())
            )
        return "both nodes stopped (exit 0)"

    def write_secret_files(self) -> dict[str, Path]:
        """Keep each node's passphrase and user tokens in 0600 files for exploring."""
        written = {}
        for node in self.nodes.values():
            folder = node.home / "demo-secrets"
            folder.mkdir(mode=0o700, exist_ok=True)
            for name, value in (("passphrase", node.passphrase), *node.tokens.items()):
                path = folder / (name if name == "passphrase" else f"{name}.token")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as handle:
                    handle.write(value + "\n")
                written[f"{node.node_id}/{path.name}"] = path
        return written
