"""A serving node keeps itself honest without a restart by hand.

* After ``gateway keys rotate`` or ``keys revoke`` run from another process,
  the running ``gateway serve`` drains and starts again in the same process
  with the new keys, so the peer receives bundles signed by the new key and
  nothing signed by a revoked one.
* It signs ledger checkpoints on its own and gives them to the peer, which
  keeps them as a witness.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.node import ledger
from gateway.node.ledger import witness as ledger_witness
from gateway.node.runtime import Node
from gateway.settings import load_settings
from gateway.store.models_exchange import InboxEntry
from tests.nodes import NodeHome, ServeProcess, init_pair, milestones, stop, wait_ready

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "exam-fraud.json"


def _serving_lines(serve: ServeProcess) -> int:
    return len(milestones(serve, "serving"))


def _wait(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _inbox_key_ids(home: NodeHome) -> dict[str, str]:
    node = Node.open(load_settings(home.home, environ=home.env()))
    try:
        with node.db.transaction() as session:
            rows = session.execute(select(InboxEntry.bundle_id, InboxEntry.signing_key_id)).all()
        return dict(rows)  # type: ignore[arg-type]
    finally:
        node.close()


@pytest.fixture
def serving_pair(tmp_path: Path) -> Iterator[tuple[dict[str, NodeHome], dict[str, ServeProcess]]]:
    nodes = init_pair(tmp_path)
    processes = {
        node_id: home.serve(
            GATEWAY_SERVER_CHECKPOINT_INTERVAL_SECONDS="0.5",
            GATEWAY_SERVER_SYNC_INTERVAL_SECONDS="0.3",
        )
        for node_id, home in nodes.items()
    }
    try:
        for process in processes.values():
            wait_ready(process)
        yield nodes, processes
    finally:
        for process in processes.values():
            stop(process)


def test_serve_restarts_itself_with_rotated_keys_and_never_signs_with_a_revoked_one(
    serving_pair: tuple[dict[str, NodeHome], dict[str, ServeProcess]],
) -> None:
    nodes, processes = serving_pair
    jp, pk = nodes["jp"], nodes["pk"]
    officer = jp.add_user("officer-jp", "officer")
    before = jp.keyring().signing_key_id
    pid = processes["jp"].process.pid

    jp.run("keys", "rotate")
    _wait(lambda: _serving_lines(processes["jp"]) >= 2, "jp to restart with its new keys")
    assert processes["jp"].process.pid == pid
    assert processes["jp"].process.poll() is None
    after_rotation = jp.keyring().signing_key_id
    assert after_rotation != before

    jp.run("keys", "revoke", before, "--reason", "superseded and retired", "--yes")
    _wait(lambda: _serving_lines(processes["jp"]) >= 3, "jp to restart after the revocation")

    sent = jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)["bundle_id"]
    _wait(lambda: sent in _inbox_key_ids(pk), "the bundle to reach pk")
    assert _inbox_key_ids(pk)[sent] == after_rotation
    assert "restarting jp with its new keys" in milestones(processes["jp"], "restarting")


def test_serving_nodes_publish_checkpoints_that_the_peer_witnesses(
    serving_pair: tuple[dict[str, NodeHome], dict[str, ServeProcess]],
) -> None:
    nodes, _processes = serving_pair
    jp, pk = nodes["jp"], nodes["pk"]
    officer = jp.add_user("officer-jp", "officer")
    jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)

    def witnessed_by_pk() -> int:
        node = Node.open(load_settings(pk.home, environ=pk.env()))
        try:
            with node.db.transaction() as session:
                latest = ledger_witness.last_witnessed(session, "jp")
            return -1 if latest is None else latest.size
        finally:
            node.close()

    _wait(lambda: witnessed_by_pk() > 0, "pk to witness a checkpoint of jp")
    first = witnessed_by_pk()
    assert first <= _ledger_size(jp)
    # The ledger grows: the next checkpoint is taken by pk only with a consistency proof
    # from the size it witnessed (asked for with 409 proof-required, then sent).
    jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)
    _wait(lambda: witnessed_by_pk() > first, "pk to witness a larger, proven checkpoint")
    # The witness it holds verifies on pk's side, and jp's own checkpoints on jp's.
    for home in (pk, jp):
        auditor = home.add_user(f"audit-{home.node_id}", "compliance")
        report = home.run("ledger", "verify", token=auditor)
        assert report["checkpoints"] >= 1 or report["witnessed"] >= 1
    assert (
        pk.run(
            "ledger",
            "verify",
            token=pk.add_user("audit2", "compliance"),
        )["witnessed"]
        >= 1
    )


def _ledger_size(home: NodeHome) -> int:
    node = Node.open(load_settings(home.home, environ=home.env()))
    try:
        with node.db.transaction() as session:
            return ledger.ledger_size(session)
    finally:
        node.close()
