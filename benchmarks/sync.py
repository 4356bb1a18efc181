"""Sync throughput end to end, interleaved with its floors in one run.

Two real nodes on loopback: this process is the sender (``deliver_once`` over
the signed peer client, as ``gateway sync`` runs it, batches pipelined) and a
``gateway serve`` process is the receiver (verify every envelope, store it,
ledger entries, signed receipts, one transaction per batch).

Baselines, each measured in the same repetition as the product, in turn:

* **seal+open floor**: the cryptography alone, in two processes side by side
  (one seals N cases with jp's keys, the other opens N envelopes with pk's
  keys, both at once, no network, no database): N / the slower of the two;
* **gpg**: ``gpg --sign --encrypt`` of the same case JSON, one file per run
  (what an officer would otherwise do per case), files per second;
* **bare POST**: for one large attachment, the same envelope bytes posted to a
  bare aiohttp server in another process that reads the body and answers 200.

Prints the median over the repetitions of each figure and the ratios.
Run: ``.venv/bin/python benchmarks/sync.py [--quick] [--engine sqlite|postgresql]
[--count 2000] [--mib 64] [--reps 5] [--spool-direct-io]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from gateway.core.roles import Actor, Role
from gateway.node.context import NodeContext
from gateway.node.outbox import deliver_once, send_case
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.peer.client import PeerClient
from gateway.settings import load_settings
from gateway.store.models_exchange import envelope_path
from tests.nodes import free_port, init_pair, stop, wait_ready

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
OFFICER = Actor(name="bench", role=Role.OFFICER)
GPG_ID = "bench <bench@example.invalid>"


# -- the floors' other processes ------------------------------------------------------


def bare_server(port: int) -> None:
    """The bare POST's receiver: read the whole body, answer 200."""

    async def receive(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
        return web.json_response({"bytes": size})

    app = web.Application(client_max_size=1 << 40)
    app.router.add_post("/v1/envelopes", receive)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def crypto_worker(mode: str, home: Path, argument: str) -> None:
    """One side of the seal+open floor: unlock, say ``ready``, wait for a line, work,
    print the seconds the work took. ``seal``: ``argument`` is the count; ``open``: a
    file listing the envelope paths."""
    from gateway.core.envelope import open_envelope, seal  # noqa: PLC0415
    from gateway.node.peer_trust import pinned_peer_manifest  # noqa: PLC0415
    from gateway.node.policy import load_policy  # noqa: PLC0415

    settings = load_settings(home, environ=dict(os.environ))
    node = Node.open(settings)
    with node.db.transaction() as session:
        keyring = unlock_keyring(settings, os.environ["GATEWAY_PASSPHRASE"].encode(), session)
        peer = pinned_peer_manifest(session)
    assert peer is not None
    policy = load_policy(settings)
    case = case_of_about_4k()
    paths = [] if mode == "seal" else Path(argument).read_text().split()
    print("RESULT ready", flush=True)
    sys.stdin.readline()
    now = utc_now()
    start = time.perf_counter()
    if mode == "seal":
        with tempfile.TemporaryDirectory() as out_dir:
            for index in range(int(argument)):
                with (Path(out_dir) / str(index)).open("wb") as out:
                    seal(
                        out,
                        case_type="exam-fraud",
                        case=case,
                        keyring=keyring,
                        peer_manifest=peer,
                        policy=policy,
                        sequence=index + 1,
                        now=now,
                        marking="confidential",
                    )
            elapsed = time.perf_counter() - start
    else:
        for name in paths:
            with open(name, "rb") as stream:
                open_envelope(stream, keyring=keyring, peer_manifest=peer, policy=policy, now=now)
        elapsed = time.perf_counter() - start
    print(f"RESULT {elapsed:.6f}", flush=True)
    node.close()


def case_of_about_4k() -> dict[str, Any]:
    case = dict(json.loads((EXAMPLES / "exam-fraud.json").read_text()))
    case["description"] = ("Observed at the test centre; statements on file. " * 80)[:4000]
    return case


# -- measurements ---------------------------------------------------------------------


def seal_open_floor(jp_env: dict[str, str], pk_env: dict[str, str], homes: Any,
                    paths: Sequence[Path], work: Path) -> float:  # fmt: skip
    """Seconds for the slower of: sealing len(paths) cases (jp), opening the files (pk)."""
    listing = work / "open-list.txt"
    listing.write_text("\n".join(str(p) for p in paths))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "seal", str(homes["jp"].home), str(len(paths))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=jp_env,
        ),
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "open", str(homes["pk"].home), str(listing)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=pk_env,
        ),
    ]  # fmt: skip
    for proc in procs:
        if _result(proc) != "ready":
            raise RuntimeError("a floor worker did not start")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    times = []
    for proc in procs:
        times.append(float(_result(proc)))
        proc.wait(timeout=600)
    return max(times)


def _result(proc: subprocess.Popen[str]) -> str:
    """The next ``RESULT`` line of a worker (its log lines share the output)."""
    assert proc.stdout is not None
    for text in proc.stdout:
        if text.startswith("RESULT "):
            return text[len("RESULT ") :].strip()
    raise RuntimeError("a floor worker ended without its result")


def gpg_setup(homedir: Path) -> None:
    homedir.mkdir(mode=0o700)
    base = ["gpg", "--batch", "--homedir", str(homedir), "--pinentry-mode", "loopback",
            "--passphrase", ""]  # fmt: skip
    subprocess.run([*base, "--quick-gen-key", GPG_ID, "ed25519", "sign", "never"],
                   check=True, capture_output=True)  # fmt: skip
    listing = subprocess.run(
        ["gpg", "--homedir", str(homedir), "--list-keys", "--with-colons"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    fingerprint = next(
        line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")
    )
    subprocess.run([*base, "--quick-add-key", fingerprint, "cv25519", "encr", "never"],
                   check=True, capture_output=True)  # fmt: skip


def gpg_files(homedir: Path, source: Path, count: int, out_dir: Path) -> float:
    """Seconds to ``gpg --sign --encrypt`` the case file ``count`` times, one run each."""
    start = time.perf_counter()
    for index in range(count):
        subprocess.run(
            ["gpg", "--batch", "--yes", "--homedir", str(homedir), "--pinentry-mode",
             "loopback", "--passphrase", "", "--trust-model", "always", "-r", GPG_ID,
             "--sign", "--encrypt", "-o", str(out_dir / f"{index}.gpg"), str(source)],
            check=True, capture_output=True,
        )  # fmt: skip
    return time.perf_counter() - start


async def bare_post(url: str, path: Path) -> float:
    """Post one envelope file as a plain body to the bare server."""
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def body() -> Any:
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    yield chunk

        async with session.post(url + "/v1/envelopes", data=body()) as answer:
            await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"bare server answered {answer.status}")
    return time.perf_counter() - start


async def deliver(node: Node, keyring: Any) -> tuple[float, int]:
    start = time.perf_counter()
    async with PeerClient(node.settings, keyring) as client:
        report = await deliver_once(NodeContext(node, keyring), client, now_fn=utc_now)
    if report.remaining or report.refused or report.retry_later:
        raise RuntimeError(f"delivery incomplete: {report}")
    return time.perf_counter() - start, len(report.delivered)


def queue(node: Node, keyring: Any, count: int, attachments: list[Path]) -> list[Path]:
    case = case_of_about_4k()
    sent = [
        send_case(NodeContext(node, keyring), OFFICER, "exam-fraud", case, attachments,
                  public=False, reply_to=None, now=utc_now())
        for _ in range(count)
    ]  # fmt: skip
    return [envelope_path(node.settings.blob_dir, s.envelope_sha256) for s in sent]


def line(label: str, ours: float, unit: str, base: str, floor: float) -> None:
    print(
        f"{label:<30} {ours:>9.1f} {unit:<10} {base:<16} {floor:>9.1f} {unit:<10} "
        f"ratio {ours / floor:7.3f}",
        flush=True,
    )


def run(
    engine: str, count: int, mib: int, reps: int, gpg_count: int, *, spool_direct_io: bool = False
) -> None:
    from tests.conftest import create_pg_database, drop_pg_database  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="ssw-sync-bench-") as tmp:
        root = Path(tmp)
        urls: dict[str, str] = {}
        if engine == "postgresql":
            urls = {"jp": create_pg_database(), "pk": create_pg_database()}
        homes = init_pair(root, db_urls=urls or None)
        settings = load_settings(homes["jp"].home, environ=homes["jp"].env())
        node = Node.open(settings)
        with node.db.transaction() as session:
            keyring = unlock_keyring(settings, homes["jp"].passphrase.encode(), session)
        floor_port = free_port()
        floor = subprocess.Popen([sys.executable, __file__, "--floor-server", str(floor_port)],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        receiver = homes["pk"].serve(
            **({"GATEWAY_SERVER_SPOOL_DIRECT_IO": "true"} if spool_direct_io else {})
        )
        gpg_home = root / "gnupg"
        case_file = root / "case.json"
        case_file.write_text(json.dumps(case_of_about_4k()))
        gpg_out = root / "gpg-out"
        gpg_out.mkdir()
        try:
            assert floor.stdout is not None
            floor.stdout.readline()
            wait_ready(receiver)
            gpg_setup(gpg_home)
            ours_rates, floor_rates, gpg_rates = [], [], []
            for rep in range(reps):
                print(f"[{engine}] repetition {rep + 1}/{reps}: queueing {count} ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                paths = queue(node, keyring, count, [])
                floor_rates.append(count / seal_open_floor(
                    homes["jp"].env(), homes["pk"].env(), homes, paths, root))  # fmt: skip
                seconds, delivered = asyncio.run(deliver(node, keyring))
                assert delivered == count
                ours_rates.append(count / seconds)
                gpg_rates.append(gpg_count / gpg_files(gpg_home, case_file, gpg_count, gpg_out))
            ours = statistics.median(ours_rates)
            print(f"\nengine {engine}: {count} bundles of about 4 KiB, {reps} repetitions, medians")
            line("sync, small bundles", ours, "bundles/s", "seal+open floor",
                 statistics.median(floor_rates))  # fmt: skip
            line("sync, small bundles", ours, "bundles/s", "gpg per file",
                 statistics.median(gpg_rates))  # fmt: skip

            big_file = root / "attachment.bin"
            with big_file.open("wb") as out:
                block = os.urandom(1 << 20)
                for _ in range(mib):
                    out.write(block)
            big_ours, big_floor = [], []
            for rep in range(reps):
                print(f"[{engine}] repetition {rep + 1}/{reps}: sealing {mib} MiB ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                [big_path] = queue(node, keyring, 1, [big_file])
                megabytes = big_path.stat().st_size / 1e6
                big_floor.append(megabytes / asyncio.run(
                    bare_post(f"http://127.0.0.1:{floor_port}", big_path)))  # fmt: skip
                seconds, delivered = asyncio.run(deliver(node, keyring))
                assert delivered == 1
                big_ours.append(megabytes / seconds)
            line(f"one {mib} MiB attachment", statistics.median(big_ours), "MB/s", "bare POST",
                 statistics.median(big_floor))  # fmt: skip
        finally:
            stop(receiver)
            floor.terminate()
            floor.wait(timeout=30)
            node.close()
            shutil.rmtree(gpg_home, ignore_errors=True)
            for url in urls.values():
                drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="small bundles per repetition")
    parser.add_argument("--mib", type=int, default=64, help="size of the large attachment")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (medians)")
    parser.add_argument("--gpg", type=int, default=40, help="gpg runs per repetition")
    parser.add_argument("--engine", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--spool-direct-io",
        action="store_true",
        help="the receiver writes large envelopes past the page cache ([server] spool_direct_io)",
    )
    parser.add_argument("--quick", action="store_true", help="300 bundles, 3 repetitions")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        bare_server(args.floor_server)
        return
    if args.worker:
        mode, home, argument = args.worker
        crypto_worker(mode, Path(home), argument)
        return
    if args.quick:
        args.count, args.reps, args.gpg = min(args.count, 300), 3, 15
    engines = ("sqlite", "postgresql") if args.engine == "both" else (args.engine,)
    for engine in engines:
        run(engine, args.count, args.mib, args.reps, args.gpg, spool_direct_io=args.spool_direct_io)


if __name__ == "__main__":
    main()
