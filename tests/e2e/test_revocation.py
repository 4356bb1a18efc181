"""Revocation with a time, end to end: two real nodes, Islamabad rotates and revokes.

Islamabad (``pk``) sends Tokyo (``jp``) bundles under its first signing key,
some before and some after a moment T; rotates; sends one under the new key;
then revokes the old key "compromised since T". Tokyo, a real ``gateway
serve`` process, must keep opening what it received before T (verified while
trusted), refuse anything new under the revoked key, mark what it received
after T as suspect, refuse to open a suspect bundle unless an officer accepts
it (recorded), and link the bundles Islamabad re-sends with ``gateway resend
--suspect``, which open normally. Both ledgers record each step and verify.

Times are the real clock throughout (the processes' and this one's): T is
derived from it, never pinned.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.core.envelope import seal
from gateway.core.keys import format_time
from gateway.node.context import NodeContext
from gateway.node.ledger.read import list_entries
from gateway.node.outbox import send_case
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.store.models_exchange import InboxEntry
from tests.conftest import create_pg_database, drop_pg_database, require_postgres
from tests.e2e.test_exchange import OFFICER, Side, example, post, sync
from tests.node_api import serving_home
from tests.nodes import init_pair, is_user_command, run_gateway, socket_answers


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sides(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Side, Side]]:
    made: list[str] = []
    urls = None
    if request.param == "postgresql":
        require_postgres()
        made = [create_pg_database(), create_pg_database()]
        urls = {"jp": made[0], "pk": made[1]}
    homes = init_pair(tmp_path_factory.mktemp(f"revoke-{request.param}"), db_urls=urls)
    jp, pk = Side(homes["jp"]), Side(homes["pk"])
    try:
        yield jp, pk
    finally:
        jp.close()
        pk.close()
        for url in made:
            drop_pg_database(url)


def gateway(side: Side, *args: str, token: str | None = None) -> tuple[int, Any]:
    """``gateway --json ARGS`` for ``side`` as its own process: (exit code, parsed output).

    A user command reaches the node's local API: when no ``gateway serve`` of the
    home answers on its socket, the API is served in this process while it runs.
    """

    def call() -> subprocess.CompletedProcess[str]:
        return run_gateway(
            side.home.home, "--json", *args, env=side.home.env(token=token or side.officer)
        )

    if is_user_command(args) and not socket_answers(side.home.home):
        with serving_home(side.home.home, side.home.env(), passphrase=side.home.passphrase):
            done = call()
    else:
        done = call()
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else done.stderr


def synced(side: Side) -> dict[str, Any]:
    done = sync(side)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def inbox_rows(side: Side) -> dict[str, InboxEntry]:
    with side.node.db.transaction() as session:
        return {row.bundle_id: row for row in session.scalars(select(InboxEntry))}


def kinds(side: Side, kind: str) -> list[Any]:
    with side.node.db.transaction() as session:
        return list_entries(session, kind=kind)


@pytest.mark.slow  # several real serve processes for a minute: with the long runs
def test_revoking_a_key_keeps_what_was_trusted_marks_the_rest_and_resend_replaces_it(
    sides: tuple[Side, Side], tmp_path: Path
) -> None:
    jp, pk = sides
    jp.start()  # Tokyo receives; Islamabad delivers with 'gateway sync'
    old_keyring = pk.keyring()
    old_key = old_keyring.signing_key_id

    # Before T: three bundles, one of them public, under the first key.
    before = [pk.send("exam-fraud"), pk.send("broker-misconduct")]
    public = send_case(
        NodeContext(pk.node, pk.keyring()), OFFICER, "consultation", example("consultation"), [],
        public=True, reply_to=None, now=utc_now(),
    )  # fmt: skip
    before.append(public.bundle_id)
    assert len(synced(pk)["delivered"]) == 3
    # T: the next whole second after everything above was received (times are seconds).
    since = (utc_now() + timedelta(seconds=1)).replace(microsecond=0)
    while utc_now() <= since:
        time.sleep(0.05)
    after = [pk.send("exam-fraud"), pk.send("acceptance-suspension")]
    assert len(synced(pk)["delivered"]) == 2

    pk.home.run("keys", "rotate")
    new_keyring = pk.keyring(fresh=True)
    assert new_keyring.signing_key_id != old_key
    assert synced(pk)["manifests_sent"] == 1
    fresh = pk.send("return-assistance")
    assert len(synced(pk)["delivered"]) == 1

    # keys revoke says what it marks before it acts; without a terminal it needs --yes.
    code, _out = gateway(
        pk, "keys", "revoke", old_key, "--reason", "laptop lost",
        "--compromised-since", format_time(since), token=pk.home.admin_token,
    )  # fmt: skip
    assert code == 2
    assert all(k["state"] != "revoked" for k in pk.home.run("keys", "show")["keys"])
    revoked = pk.home.run(
        "keys", "revoke", old_key, "--reason", "laptop lost",
        "--compromised-since", format_time(since), "--yes",
    )  # fmt: skip
    assert revoked["revoked"] == [old_key]
    assert revoked["impact"]["suspect_bundles"] == after
    assert revoked["impact"]["verified_while_trusted_at_peer"] == len(before)
    assert revoked["impact"]["undelivered"] == []
    assert synced(pk)["manifests_sent"] == 1

    # Tokyo marked exactly the bundles it received after T.
    rows = inbox_rows(jp)
    assert {b for b, r in rows.items() if r.suspect_since is not None} == set(after)
    code, listed = gateway(jp, "inbox", "--suspect")
    assert code == 0
    assert [b["bundle_id"] for b in listed["bundles"]] == after
    assert all(b["suspect"] and b["signing_key_id"] == old_key for b in listed["bundles"])

    # Everything received before T still opens, verified while trusted; the new key's too.
    for bundle_id in before:
        code, shown = gateway(jp, "show", bundle_id)
        assert code == 0, shown
        assert shown["trust"] == "verified-while-trusted"
    code, shown = gateway(jp, "show", fresh)
    assert (code, shown["trust"]) == (0, "valid")

    # A suspect bundle is refused without --accept-suspect, and opens with it, recorded.
    code, refused = gateway(jp, "show", after[0])
    assert code == 4
    assert refused["error"]["reason"] == "envelope.suspect"
    assert "--accept-suspect" in refused["error"]["message"]
    code, accepted = gateway(jp, "show", after[0], "--accept-suspect")
    assert (code, accepted["trust"]) == (0, "suspect-accepted")
    [acceptance] = kinds(jp, "suspect-accepted")
    assert acceptance.bundle_id == after[0]
    assert acceptance.actor_name == "officer-jp"

    # Anything new signed by the revoked key is refused.
    forged = tmp_path / "forged"
    with forged.open("w+b") as handle:
        seal(
            handle,
            case_type="exam-fraud",
            case=example("exam-fraud"),
            keyring=old_keyring,
            peer_manifest=pk.peer_manifest(),
            policy=load_policy(pk.settings),
            sequence=10_000,
            now=utc_now(),
        )
    [answer] = post(pk, [forged])
    assert (answer.status, answer.reason) == ("refused", "envelope.signing-key")

    # Islamabad re-sends what it sent after T; Tokyo links each to its original.
    code, report = gateway(pk, "resend", "--suspect")
    assert code == 0, report
    assert [r["replaces"] for r in report["resent"]] == after
    replacement = {r["replaces"]: r["bundle_id"] for r in report["resent"]}
    assert len(synced(pk)["delivered"]) == 2
    rows = inbox_rows(jp)
    for original, new in replacement.items():
        assert rows[original].replaced_by == new
        assert rows[new].replaces == original
        assert rows[new].suspect_since is None
        code, shown = gateway(jp, "show", new)
        assert (code, shown["trust"], shown["replaces"]) == (0, "valid", original)
    code, again = gateway(pk, "resend", "--suspect")
    assert (code, again["resent"]) == (0, [])
    code, listed = gateway(jp, "inbox", "--suspect")
    assert all(b["replaced_by"] == replacement[b["bundle_id"]] for b in listed["bundles"])

    # Each step is in the ledgers, and both still verify.
    [revocation] = [e.body for e in kinds(pk, "key-event") if e.body.get("event") == "key-revoked"]
    assert revocation["compromised_since"] == format_time(since)
    assert revocation["suspect_at_peer"] == len(after)
    assert sorted(e.bundle_id for e in kinds(pk, "bundle-resent")) == sorted(after)
    [marked] = [e.body for e in kinds(jp, "key-event") if e.body.get("event") == "peer-key-revoked"]
    assert (marked["suspect"], marked["verified_while_trusted"]) == (len(after), len(before))
    assert sorted(e.bundle_id for e in kinds(jp, "bundle-suspect")) == sorted(after)
    reads = {e.bundle_id: e.body["trust"] for e in kinds(jp, "bundle-read")}
    assert {reads[b] for b in before} == {"verified-while-trusted"}
    assert reads[after[0]] == "suspect-accepted"
    received = {e.bundle_id: e.body for e in kinds(jp, "bundle-received")}
    assert {received[new].get("replaces") for new in replacement.values()} == set(after)
    for side in (jp, pk):
        compliance = side.home.run(
            "users", "add", f"auditor-{side.node_id}", "--role", "compliance"
        )["token"]
        code, verified = gateway(side, "ledger", "verify", token=compliance)
        assert code == 0, verified
