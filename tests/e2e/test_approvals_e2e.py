"""The two-person rule end to end: two real ``gateway serve`` processes, the CLI only.

Islamabad (``pk``) originates a confidential case and Tokyo (``jp``) asks for
consent to pass it to a third party. Islamabad's policy says
``[approvals.consent-grant] k = 2`` (docs/consent.md, "Approvals"), so one
officer's ``gateway consent grant`` only makes a pending proposal: nothing is
signed or sent and Tokyo's ``gateway disclose`` stays refused (exit 3). A
second officer holding the approver capability approves; the grant, naming
both, travels to Tokyo, which then discloses. An officer without the
capability, and an officer approving twice, are refused.

Every step is a ``gateway`` process run with the acting user's own token and
no keystore passphrase in its environment (user commands are clients of the
running node, SPEC §8); delivery is the serve processes' sender workers, and
``gateway sync`` (a host operation) is run to show a pending proposal leaves
nothing to deliver. Times are the real clock throughout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import EXIT_CONSENT_REFUSED, EXIT_ERROR
from gateway.settings import load_settings
from tests.conftest import create_pg_database, drop_pg_database, require_postgres
from tests.nodes import (
    NodeHome,
    ServeProcess,
    init_pair,
    run_gateway,
    socket_answers,
    stop,
    wait_ready,
)
from tests.policies import set_approvals

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
EMBASSY = "Embassy of Example"
PURPOSE = "visa screening of the broker's workers"


@dataclass
class Answer:
    """One ``gateway --json`` process: its exit code and parsed standard output."""

    code: int
    data: Any
    stderr: str

    def ok(self) -> Any:
        assert self.code == 0, (self.code, self.data, self.stderr)
        return self.data

    def refused(self, code: int, reason: str) -> dict[str, Any]:
        assert self.code == code, (self.code, self.data, self.stderr)
        error: dict[str, Any] = self.data["error"]
        assert error["reason"] == reason, error
        return error


def user_env(home: NodeHome, token: str) -> dict[str, str]:
    """The environment of a user command: the user's token, no keystore passphrase."""
    env = home.env(token=token)
    del env["GATEWAY_PASSPHRASE"]
    return env


def gateway(home: NodeHome, token: str, *args: str) -> Answer:
    """``gateway --json ARGS`` as the user holding ``token``, against the running node."""
    assert socket_answers(home.home), f"no gateway serve answers for {home.node_id}"
    done = run_gateway(home.home, "--json", *args, env=user_env(home, token))
    data = json.loads(done.stdout) if done.stdout.strip() else None
    return Answer(done.returncode, data, done.stderr)


def host(home: NodeHome, *args: str) -> Any:
    """A host operation (``gateway sync``): run beside the node with the passphrase."""
    done = run_gateway(home.home, "--json", *args, env=home.env())
    assert done.returncode == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def add_user(home: NodeHome, name: str, role: str, *flags: str) -> str:
    """``gateway users add`` by the node's administrator; the new user's token."""
    made = gateway(home, home.admin_token, "users", "add", name, "--role", role, *flags).ok()
    assert (made["name"], made["role"]) == (name, role)
    return str(made["token"])


def approver_token(home: NodeHome, name: str) -> str:
    """An officer holding the approver capability, enrolled by the host operator
    (``gateway users enrol``, the passphrase and no token) while the node serves: a
    token no one else holds, so two such approvals are two people (docs/consent.md,
    "Token custody"). The token they approve with."""
    made = host(home, "users", "enrol", name, "--role", "officer", "--approver")
    assert (made["name"], made["role"], made["approver"]) == (name, "officer", True)
    token = str(made["token"])
    assert gateway(home, token, "approvals", "list").ok() == []
    return token


def wait_for(what: str, probe: Callable[[], Any], *, timeout: float = 120.0) -> Any:
    """Poll ``probe`` until it answers something truthy; that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {what}")


def outbox_settled(home: NodeHome, token: str) -> list[dict[str, Any]]:
    """This node's outbox once nothing in it is queued (its sender worker delivered)."""

    def look() -> list[dict[str, Any]] | None:
        bundles: list[dict[str, Any]] = gateway(home, token, "outbox").ok()["bundles"]
        return None if any(b["state"] != "delivered" for b in bundles) else bundles

    settled: list[dict[str, Any]] = wait_for(f"{home.node_id}'s outbox delivered", look)
    return settled


def set_consent_grant_k(home: NodeHome, k: int) -> None:
    """Set ``[approvals.consent-grant] k`` in the node's policy (before it serves)."""
    set_approvals(load_settings(home.home, environ=home.env()).policy_dir, "consent-grant", k)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def homes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, NodeHome]]:
    """jp and pk initialised and pinned to each other, Islamabad's consent grants
    needing two approvers, both serving until the test ends."""
    made: list[str] = []
    urls = None
    if request.param == "postgresql":
        require_postgres()
        made = [create_pg_database(), create_pg_database()]
        urls = {"jp": made[0], "pk": made[1]}
    nodes = init_pair(tmp_path_factory.mktemp(f"approvals-{request.param}"), db_urls=urls)
    set_consent_grant_k(nodes["pk"], 2)
    serving: list[ServeProcess] = []
    try:
        for node in nodes.values():
            serving.append(node.serve())
        for process in serving:
            wait_ready(process)
        yield nodes
    finally:
        for process in serving:
            if process.process.poll() is None:
                stop(process)
        for url in made:
            drop_pg_database(url)


def kinds_by_actor(entries: list[dict[str, Any]], prefix: str) -> list[tuple[str, str]]:
    return [(e["kind"], e["actor"]) for e in entries if e["kind"].startswith(prefix)]


@pytest.mark.slow  # two serve processes and some forty CLI processes per engine
@pytest.mark.timeout(900)  # two inits, two serves and ~40 processes: minutes on a busy machine
def test_a_grant_needs_two_approvers_and_only_then_the_peer_discloses(
    homes: dict[str, NodeHome], tmp_path: Path
) -> None:
    jp, pk = homes["jp"], homes["pk"]
    tanaka = add_user(jp, "tanaka", "officer")
    clerk_pk = add_user(pk, "imran", "officer")  # sends the case; no approver capability
    asma = approver_token(pk, "asma")
    bilal = approver_token(pk, "bilal")
    clerk = add_user(pk, "chaudhry", "officer")  # an officer without the capability
    auditors = {node.node_id: add_user(node, "auditor", "compliance") for node in (jp, pk)}

    # Islamabad sends Tokyo a confidential case with an attachment.
    attachment = tmp_path / "passport-scan.txt"
    attachment.write_text("scan of the worker's passport\n")
    sent = gateway(
        pk, clerk_pk, "send", "broker-misconduct", str(EXAMPLES / "broker-misconduct.json"),
        "--attach", str(attachment),
    ).ok()  # fmt: skip
    case_id = sent["bundle_id"]
    wait_for(
        "the case in Tokyo's inbox",
        lambda: any(
            b["bundle_id"] == case_id for b in gateway(jp, tanaka, "inbox").ok()["bundles"]
        ),
    )

    # Tokyo asks Islamabad's consent to pass it to the embassy.
    asked = gateway(
        jp, tanaka, "consent", "request", case_id, "--recipient", EMBASSY, "--purpose", PURPOSE
    ).ok()
    request_id = asked["request_id"]
    wait_for(
        "the request at Islamabad",
        lambda: any(
            r["request_id"] == request_id
            for r in gateway(pk, asma, "consent", "list").ok()["requests"]
        ),
    )
    out = tmp_path / "to-embassy"
    disclose = ("disclose", case_id, "--recipient", EMBASSY, "--purpose", PURPOSE, "--out")
    gateway(jp, tanaka, *disclose, str(out)).refused(EXIT_CONSENT_REFUSED, "consent")

    # The first approver's grant is a pending proposal: nothing signed, nothing sent.
    proposed = gateway(pk, asma, "consent", "grant", request_id, "--max-uses", "2").ok()
    assert (proposed["state"], proposed["approvals"], proposed["needed"]) == ("pending", 1, 2)
    assert "consent_id" not in proposed or proposed["consent_id"] is None
    proposal_id = proposed["proposal_id"]
    outbox = outbox_settled(pk, clerk_pk)
    assert [b for b in outbox if b["type"] == "consent-grant"] == []
    synced = host(pk, "sync")
    assert (synced["delivered"], synced["remaining"]) == ([], 0)
    error = gateway(jp, tanaka, *disclose, str(out)).refused(EXIT_CONSENT_REFUSED, "consent")
    assert "no consent" in error["message"]
    assert not out.exists()
    assert gateway(jp, tanaka, "consent", "list").ok()["consents"] == []

    # An officer without the capability, and the proposer again, are refused.
    gateway(pk, clerk, "approvals", "approve", proposal_id, "--yes").refused(
        EXIT_ERROR, "approval.not-approver"
    )
    gateway(pk, asma, "approvals", "approve", proposal_id, "--yes").refused(
        EXIT_ERROR, "approval.already-approved"
    )

    # The second approver sees the proposal, approves the terms reviewed, and it executes.
    [listed] = gateway(pk, bilal, "approvals", "list", "--state", "pending").ok()
    assert listed["proposal_id"] == proposal_id
    assert (listed["action"], listed["approvers"], listed["proposer"]) == (
        "consent-grant", ["asma"], "asma",
    )  # fmt: skip
    assert listed["terms"]["items"] == [case_id]
    assert (listed["terms"]["third_party"], listed["terms"]["max_uses"]) == (EMBASSY, 2)
    done = gateway(
        pk, bilal, "approvals", "approve", proposal_id, "--terms", listed["terms_sha256"]
    ).ok()
    assert (done["state"], done["counted"]) == ("executed", ["asma", "bilal"])
    consent_id = done["result"]["consent_id"]
    # Approving a proposal already executed is refused, whoever tries.
    for token in (bilal, asma):
        gateway(pk, token, "approvals", "approve", proposal_id, "--yes").refused(
            EXIT_ERROR, "approval.decided"
        )
    grants = [b for b in outbox_settled(pk, clerk_pk) if b["type"] == "consent-grant"]
    assert [b["state"] for b in grants] == ["delivered"]

    # Tokyo holds the grant naming both approvers and now discloses under it.
    [held] = wait_for(
        "the grant at Tokyo", lambda: gateway(jp, tanaka, "consent", "list").ok()["consents"]
    )
    assert (held["consent_id"], held["direction"]) == (consent_id, "received")
    assert (held["approvers"], held["granting_officer"]) == (["asma", "bilal"], "asma")
    text = run_gateway(jp.home, "consent", "list", env=user_env(jp, tanaka))
    assert text.returncode == 0, text.stderr
    assert "approved by asma, bilal" in text.stdout
    disclosed = gateway(jp, tanaka, *disclose, str(out)).ok()
    assert (disclosed["kind"], disclosed["consent_id"]) == ("disclosure-made", consent_id)
    assert (out / "disclosure.json").is_file()
    [copied] = [path for path in out.rglob("*") if path.name == attachment.name]
    assert copied.read_bytes() == attachment.read_bytes()

    # Each node's ledger records the steps with their actors, and verifies.
    pk_entries = gateway(pk, auditors["pk"], "ledger", "list").ok()
    assert kinds_by_actor(pk_entries, "approval-") == [
        ("approval-rules", "system"),  # k in force, recorded before the first grant
        ("approval-proposed", "asma"),
        ("approval-given", "asma"),
        ("approval-given", "bilal"),
        ("approval-executed", "bilal"),
    ]
    [executed] = [e for e in pk_entries if e["kind"] == "approval-executed"]
    assert executed["body"]["approvers"] == ["asma", "bilal"]
    [granted] = [e for e in pk_entries if e["kind"] == "consent-granted"]
    assert (granted["actor"], granted["consent_id"]) == ("asma", consent_id)
    jp_entries = gateway(jp, auditors["jp"], "ledger", "list").ok()
    [received] = [e for e in jp_entries if e["kind"] == "consent-granted"]
    assert (received["consent_id"], received["body"]["approvers"]) == (
        consent_id, ["asma", "bilal"],
    )  # fmt: skip
    outcomes = [
        (e["kind"], e["actor"])
        for e in jp_entries
        if e["kind"] in ("disclosure-blocked", "disclosure-made")
    ]
    assert outcomes == [
        ("disclosure-blocked", "tanaka"),
        ("disclosure-blocked", "tanaka"),
        ("disclosure-made", "tanaka"),
    ]
    for node in (jp, pk):
        verified = gateway(node, auditors[node.node_id], "ledger", "verify").ok()
        assert verified["intact"] is True, verified
