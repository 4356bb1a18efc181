"""Watching two real ``gateway serve`` processes as an operator would.

- ``/metrics`` of the local API, parsed with Prometheus's own text parser,
  moves as bundles are sent, delivered, refused and held back by a peer
  that is down (on SQLite and on PostgreSQL);
- ``/readyz`` stays ready with the peer down and says so;
- with stderr not a terminal, every line ``serve`` writes is JSON, through
  start, a key rotation's restart and stop, and a rotation never makes the
  peer refuse a request signed by the new key (no ``auth.unknown-key``): the
  new manifest reaches the peer before any checkpoint signed by the new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.peer_auth import sign_request
from gateway.node.runtime import utc_now
from gateway.peer.server import ENVELOPE_CONTENT_TYPE
from tests.nodes import NodeHome, ServeProcess, init_pair, milestones, stop, wait_ready

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "exam-fraud.json"
FAST = {
    "GATEWAY_SERVER_CHECKPOINT_INTERVAL_SECONDS": "0.5",
    "GATEWAY_SERVER_SYNC_INTERVAL_SECONDS": "0.3",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _wait(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = 60.0,
    *,
    logs: Callable[[], dict[str, ServeProcess]] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    shown = "".join(
        f"\n--- {name} ---\n{process.stderr_text()[-6000:]}"
        for name, process in (logs() if logs is not None else {}).items()
    )
    raise AssertionError(f"timed out waiting for {what}{shown}")


def _http_get(url: str, *, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(home: NodeHome, *, token: str | None = None) -> Samples:
    """Every sample of the node's ``/metrics``, keyed by sample name and labels."""
    status, body = _http_get(f"http://127.0.0.1:{home.api_port}/metrics", token=token)
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def readyz(home: NodeHome) -> tuple[int, dict[str, Any]]:
    status, body = _http_get(f"http://127.0.0.1:{home.api_port}/readyz")
    return status, json.loads(body)


def _signed_garbage(sender: NodeHome, body: bytes) -> bytes:
    """A well-signed request from ``sender`` carrying an envelope the peer must refuse."""
    headers = sign_request(
        sender.keyring(),
        method="POST",
        path="/v1/envelopes",
        body_sha256=hashlib.sha256(body).digest(),
        recipient="pk" if sender.node_id == "jp" else "jp",
        now=utc_now(),
        nonce=os.urandom(16),
    )
    lines = [
        "POST /v1/envelopes HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {ENVELOPE_CONTENT_TYPE}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _post_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.fixture
def pair_on(
    engine_name: str, tmp_path: Path, pg_database_factory: Callable[[], str]
) -> dict[str, NodeHome]:
    urls = None
    if engine_name == "postgresql":
        urls = {"jp": pg_database_factory(), "pk": pg_database_factory()}
    return init_pair(tmp_path, db_urls=urls)


@pytest.fixture
def serving(pair_on: dict[str, NodeHome]) -> Iterator[dict[str, ServeProcess]]:
    processes = {node_id: home.serve(**FAST) for node_id, home in pair_on.items()}
    try:
        for process in processes.values():
            wait_ready(process)
        yield processes
    finally:
        for process in processes.values():
            stop(process)


def test_metrics_move_as_bundles_are_sent_delivered_refused_and_held_back(
    pair_on: dict[str, NodeHome], serving: dict[str, ServeProcess]
) -> None:
    jp, pk = pair_on["jp"], pair_on["pk"]
    officer = jp.add_user("officer-jp", "officer")
    before = {"jp": scrape(jp), "pk": scrape(pk)}
    sent_name = "ssw_gateway_delivery_envelopes_sent_total"
    delivered_name = "ssw_gateway_delivery_envelopes_delivered_total"
    received_name = "ssw_gateway_envelopes_received_total"

    # Sent and delivered: the counters of both sides move by one bundle.
    jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)
    _wait(
        lambda: value(scrape(pk), received_name) > value(before["pk"], received_name),
        "pk to count the bundle received",
    )
    _wait(
        lambda: value(scrape(jp), delivered_name) > value(before["jp"], delivered_name),
        "jp to count the bundle delivered",
    )
    after = {"jp": scrape(jp, token=officer), "pk": scrape(pk)}
    assert value(after["jp"], sent_name) - value(before["jp"], sent_name) >= 1
    assert value(after["jp"], delivered_name) - value(before["jp"], delivered_name) == 1
    assert value(after["pk"], received_name) - value(before["pk"], received_name) == 1
    assert value(after["jp"], "ssw_gateway_outbox_queued", channel="jp->pk") == 0
    assert value(after["jp"], "ssw_gateway_database_up") == 1
    assert value(after["jp"], "ssw_gateway_peer_up") == 1
    # The peer's request latency is kept per route template.
    assert (
        value(
            after["pk"],
            "ssw_gateway_http_request_duration_seconds_count",
            listener="peer",
            method="POST",
            route="/v1/envelopes",
        )
        >= 1
    )
    assert value(after["jp"], "ssw_gateway_key_manifest_version", side="peer") >= 1
    assert value(after["jp"], "ssw_gateway_key_expiry_days", side="own", use="sign") > 30

    # Refused: a well-signed request carrying no real envelope.
    refused_before = total(after["pk"], "ssw_gateway_envelopes_refused_total")
    answer = _post_raw(pk.port, _signed_garbage(jp, b"not an envelope at all" * 4))
    assert b'"refused"' in answer, answer[:300]
    refused = scrape(pk)
    assert total(refused, "ssw_gateway_envelopes_refused_total") == refused_before + 1
    assert value(refused, received_name) == value(after["pk"], received_name)

    # Held back: with pk down the backlog grows and transport failures are counted,
    # while jp stays ready and reports the peer unreachable.
    stop(serving["pk"])
    jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)
    _wait(
        lambda: (
            total(scrape(jp), "ssw_gateway_delivery_failures_total", kind="transport")
            > total(after["jp"], "ssw_gateway_delivery_failures_total", kind="transport")
        ),
        "jp to count a failed delivery pass",
    )
    held = scrape(jp)
    assert value(held, "ssw_gateway_outbox_queued", channel="jp->pk") == 1
    assert value(held, "ssw_gateway_outbox_oldest_age_seconds", channel="jp->pk") >= 0
    assert value(held, "ssw_gateway_peer_up") == 0
    status, ready = readyz(jp)
    assert status == 200, ready
    assert (ready["peer"], ready["outbox_queued"]) == ("unreachable", 1)

    serving["pk"] = pk.serve(**FAST)
    wait_ready(serving["pk"])
    _wait(
        lambda: value(scrape(jp), "ssw_gateway_outbox_queued", channel="jp->pk") == 0,
        "jp's backlog to drain once pk is back",
    )
    drained = scrape(jp)
    assert value(drained, delivered_name) == value(after["jp"], delivered_name) + 1
    assert value(drained, "ssw_gateway_peer_up") == 1
    assert readyz(jp)[1]["peer"] == "reachable"


# ------------------------------------------------------------------ JSON log lines and rotation


def _records(process: ServeProcess) -> list[dict[str, Any]]:
    """Every stderr line of ``process`` parsed as JSON (fails on the first that is not)."""
    records = []
    for number, line in enumerate(process.stderr_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(
                f"line {number} of {process.home.name} is not JSON: {line!r}"
            ) from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


def _pinned_peer_version(home: NodeHome) -> int:
    status, body = _http_get(f"http://127.0.0.1:{home.api_port}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            if sample.name == "ssw_gateway_key_manifest_version" and sample.labels == {
                "side": "peer"
            }:
                return int(sample.value)
    return 0


@pytest.mark.slow  # several real serve processes for a minute: with the long runs
def test_rotation_restart_logs_only_json_and_the_peer_never_sees_an_unknown_key(
    tmp_path: Path,
) -> None:
    nodes = init_pair(tmp_path)
    jp, pk = nodes["jp"], nodes["pk"]
    processes = {node_id: home.serve(**FAST) for node_id, home in nodes.items()}
    try:
        for process in processes.values():
            wait_ready(process)
        officer = jp.add_user("officer-jp", "officer")
        jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)
        _wait(lambda: "checkpoint_sent" in processes["jp"].stderr_text(), "a first checkpoint")

        jp.run("keys", "rotate")
        _wait(lambda: len(milestones(processes["jp"], "serving")) >= 2, "jp to restart")
        _wait(lambda: _pinned_peer_version(pk) >= 2, "pk to pin jp's new manifest")

        def sent_after_restart() -> bool:
            records = _records(processes["jp"])
            restarted = max(i for i, r in enumerate(records) if r.get("event") == "serving")
            return any(r.get("event") == "checkpoint_sent" for r in records[restarted:])

        _wait(sent_after_restart, "a checkpoint signed with the new key to be witnessed")

        # Rotated while stopped and while pk is down: jp starts, its sender backs
        # off (seconds) while the checkpoint publisher tries every half second;
        # when pk comes back, the publisher must still wait for the manifest.
        assert stop(processes["jp"]) == 0
        first_run = processes["jp"]
        assert stop(processes["pk"]) == 0
        first_pk = processes["pk"]
        jp.run("keys", "rotate")
        processes["jp"] = jp.serve(**FAST)
        wait_ready(processes["jp"])
        _wait(
            lambda: processes["jp"].stderr_text().count('"delivery_failed"') >= 3,
            "jp's sender to back off",
        )
        processes["pk"] = pk.serve(**FAST)
        wait_ready(processes["pk"])
        _wait(lambda: _pinned_peer_version(pk) >= 3, "pk to pin jp's third manifest")
        _wait(sent_after_restart, "a checkpoint signed with the newest key to be witnessed")
        # And a bundle signed with the new key is received.
        jp.run("send", "exam-fraud", str(EXAMPLE), token=officer)
        _wait(
            lambda: (
                value(scrape(pk), "ssw_gateway_envelopes_received_total") >= 1
                and value(scrape(jp), "ssw_gateway_outbox_queued", channel="jp->pk") == 0
            ),
            "the second bundle to be delivered",
            logs=lambda: processes,
        )
    finally:
        codes = {node_id: stop(process) for node_id, process in processes.items()}
    assert codes == {"jp": 0, "pk": 0}

    for node_id, process in [*processes.items(), ("jp", first_run), ("pk", first_pk)]:
        records = _records(process)
        events = [r.get("event") for r in records]
        assert all(r.get("node") == node_id for r in records), node_id
        assert all(isinstance(r.get("timestamp"), str) for r in records), node_id
        # Nothing the peer refused for an unknown key, nothing logged as an error.
        assert not any("auth.unknown-key" in json.dumps(r) for r in records), node_id
        assert [r for r in records if r.get("level") == "error"] == [], node_id
        assert events[-1] == "stopped", events[-3:]
        serving = [r for r in records if r.get("event") == "serving"]
        home = nodes[node_id]
        for record in serving:
            assert record["peer_listen"] == f"http://127.0.0.1:{home.port}"
            assert record["api_listen"] == (
                f"http://127.0.0.1:{home.api_port}, unix:{home.home / 'run' / 'api.sock'}"
            )
            assert f"http://127.0.0.1:{home.port}" in record["message"]
            assert f"http://127.0.0.1:{home.api_port}" in record["message"]
    jp_events = [r.get("event") for r in _records(first_run)]
    assert jp_events.count("serving") == 2
    assert jp_events.count("restarting") == 1
    assert jp_events.index("restarting") < len(jp_events) - 1 - jp_events[::-1].index("serving")
    assert [r["message"] for r in _records(first_run) if r.get("event") == "restarting"] == [
        "restarting jp with its new keys"
    ]


def test_a_serve_that_cannot_start_says_why_in_json(tmp_path: Path) -> None:
    from tests.nodes import free_port, gateway_env, run_gateway  # noqa: PLC0415

    home = tmp_path / "jp"
    env = gateway_env(home, GATEWAY_KEYSTORE_STRENGTH="interactive")
    made = run_gateway(
        home, "init", "--node", "jp", "--listen", f"127.0.0.1:{free_port()}", env=env
    )
    assert made.returncode == 0, made.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_gateway(
            home, "serve", env={**env, "GATEWAY_SERVER_LISTEN": f"127.0.0.1:{port}"}, timeout=60
        )
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records, done.stderr
    last = records[-1]
    assert (last["event"], last["reason"], last["exit_code"], last["node"]) == (
        "failed",
        "config.listen",
        1,
        "jp",
    )
    assert f"127.0.0.1:{port}" in last["message"]
    assert not any(r.get("event") == "serving" for r in records)
