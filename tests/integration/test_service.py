"""The composition root of ``gateway serve``: start, fail, stop, all or nothing.

Real nodes (SQLite), real sockets; a component that fails is a real coroutine
that raises, added beside the real ones.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.errors import ConfigError, StorageError, VerificationError
from gateway.node.context import NodeContext
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.peer.client import PeerClient
from gateway.peer.server import limits_from_policy
from gateway.service import Service
from gateway.settings import Settings
from tests.exchange_pair import Pair, open_pair
from tests.nodes import free_port


@pytest.fixture
def sqlite_pair(tmp_path: Path, clean_environ: dict[str, str]) -> Iterator[Pair]:
    urls = {node: f"sqlite:///{tmp_path / f'{node}.sqlite3'}" for node in ("jp", "pk")}
    with open_pair(tmp_path, urls, clean_environ) as opened:
        yield opened


def _on_free_ports(settings: Settings) -> Settings:
    server = settings.server.model_copy(
        update={"listen": f"127.0.0.1:{free_port()}", "api_listen": f"127.0.0.1:{free_port()}"}
    )
    return settings.model_copy(update={"server": server})


def _connects(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, message: str, /, **fields: Any) -> None:
        self.events.append((event, fields))


class _WithFailingPart(Service):
    """The real service with one more worker, which fails once everything serves."""

    def _workers(
        self, client: PeerClient | None
    ) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        workers = super()._workers(client)

        async def broken() -> None:
            await asyncio.sleep(0.2)
            raise StorageError("the disk went away", reason="storage.test")

        workers["broken"] = broken
        return workers


def _service(side: Any, recorder: _Recorder, cls: type[Service] = Service) -> Service:
    settings = _on_free_ports(side.node.settings)
    limits = limits_from_policy(load_policy(settings).limits)
    return cls(
        settings,
        NodeContext(side.node, side.keyring),
        limits,
        announce=recorder,
        drain_seconds=5.0,
        handle_signals=False,
    )


def test_stop_drains_every_part_and_closes_both_listeners(sqlite_pair: Pair) -> None:
    recorder = _Recorder()
    service = _service(sqlite_pair.jp, recorder)
    peer_port = service.settings.server.listen_address[1]
    api_port = service.settings.server.api_listen_address[1]
    seen: list[bool] = []

    async def main() -> bool:
        running = asyncio.create_task(service.run())
        while not recorder.events:
            await asyncio.sleep(0.05)
            assert not running.done(), running.result()
        seen.append(await asyncio.to_thread(_connects, peer_port))
        seen.append(await asyncio.to_thread(_connects, api_port))
        service.stop()
        return await running

    assert asyncio.run(main()) is False
    assert recorder.events[0][0] == "serving"
    assert recorder.events[0][1]["sender"] is False
    assert seen == [True, True]
    assert not _connects(peer_port)
    assert not _connects(api_port)


def test_a_failing_component_stops_the_whole_service_with_its_error_logged(
    sqlite_pair: Pair,
) -> None:
    recorder = _Recorder()
    service = _service(sqlite_pair.jp, recorder, _WithFailingPart)
    peer_port = service.settings.server.listen_address[1]
    with capture_logs() as logs, pytest.raises(StorageError, match="disk went away"):
        asyncio.run(service.run())
    failed = [line for line in logs if line["event"] == "component_failed"]
    assert failed == [
        {
            "event": "component_failed",
            "log_level": "error",
            "component": "broken",
            "reason": "storage.test",
            "error": "the disk went away",
        }
    ]
    assert [event for event, _ in recorder.events] == ["serving"]
    assert not _connects(peer_port)


def test_a_port_already_taken_refuses_to_start_and_leaves_nothing_listening(
    sqlite_pair: Pair,
) -> None:
    recorder = _Recorder()
    service = _service(sqlite_pair.pk, recorder)
    peer_port = service.settings.server.listen_address[1]
    api_host, api_port = service.settings.server.api_listen_address
    with socket.socket() as taken:
        taken.bind((api_host, api_port))
        taken.listen()
        with pytest.raises(ConfigError, match="for the local API") as refused:
            asyncio.run(service.run())
    assert refused.value.reason == "config.listen"
    assert recorder.events == []
    assert not _connects(peer_port)


def test_the_verification_workers_stop_with_the_service(sqlite_pair: Pair) -> None:
    recorder = _Recorder()
    service = _service(sqlite_pair.pk, recorder)
    pool = service.verify_pool
    assert pool.worker_pids() == []  # started lazily, not by serving
    keyring = sqlite_pair.pk.keyring
    with sqlite_pair.pk.node.db.transaction() as session:
        peer = pinned_peer_manifest(session)
    assert peer is not None

    def check_two() -> list[int]:
        answers = pool.verify(
            [b"not an envelope 1", b"not an envelope 2"],
            node=keyring.node,
            held_key_ids=frozenset(keyring.encryption_keys),
            peer_manifest=peer,
            limits=load_policy(service.settings).limits,
            now=utc_now(),
        )
        assert all(isinstance(a, VerificationError) for a in answers)
        return pool.worker_pids()

    async def main() -> list[int]:
        running = asyncio.create_task(service.run())
        while not recorder.events:
            await asyncio.sleep(0.05)
            assert not running.done(), running.result()
        pids = await asyncio.to_thread(check_two)
        service.stop()
        await running
        return pids

    pids = asyncio.run(main())
    assert pids
    assert pool.worker_pids() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
