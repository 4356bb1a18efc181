"""What one ``gateway`` command costs a user, beside GnuPG and a bare interpreter.

Two real nodes (``gateway serve`` for jp and pk, paired on loopback, as the
demo and the tests set them up) run throughout. In one run, interleaved, each
repetition times:

(a) ``gateway send exam-fraud case.json`` of a 4 KiB case, run as a user runs
    it (the installed ``gateway`` command, ``GATEWAY_HOME`` and an officer's
    ``GATEWAY_TOKEN``), beside ``gpg --batch --sign --encrypt`` of the same file
    (a throw-away GnuPG home with a generated key pair, no passphrase);
(b) ``gateway inbox --json`` and ``gateway --version`` beside ``python -c pass``
    (the interpreter's start);

and prints the median time per file, the ratio and files per second. The
target once user commands are clients of the running node: ``send`` at most
5x gpg's time per file.

(c) Memory: the peak RSS of ``gateway send --attach`` of a large file and of
``gateway show --out`` of it on the peer (``wait4`` of the child), and how much
each serving node's peak (``VmHWM`` of ``/proc/<pid>/status``) grew meanwhile.
Targets: each command below 150 MiB, each node growing by less than 150 MiB.
``--mib 0`` leaves it out.

User commands are clients of the running node and get the token alone;
``--passphrase-env`` also puts ``GATEWAY_PASSPHRASE`` in the user's
environment (as commands needed before they became clients).

Run: ``.venv/bin/python benchmarks/cli.py [--passphrase-env] [--reps 7] [--files 3] [--mib 1024]``;
``--quick`` is a smoke run (2 repetitions, 1 file, 8 MiB).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.nodes import NodeHome, ServeProcess, init_pair, stop, wait_ready

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
MIB = 1024 * 1024


@dataclass
class Run:
    """One finished child process: exit code, output, wall time, peak RSS."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_bytes: int


def run_measured(argv: list[str], env: dict[str, str], cwd: Path) -> Run:
    """Run ``argv`` to completion; its wall time and its own peak RSS (``wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in KiB on Linux.
        return Run(
            process.returncode,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            seconds,
            usage.ru_maxrss * 1024,
        )


def checked(run: Run, what: str) -> Run:
    if run.code != 0:
        raise SystemExit(f"{what} exited {run.code}:\n{run.stdout}\n{run.stderr}")
    return run


def vm_hwm_bytes(pid: int) -> int:
    """The peak resident set of a live process (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def gateway_program() -> str:
    """The installed ``gateway`` command beside this interpreter (what a user runs).

    Its package's bytecode is compiled first, as ``pip install`` of the package
    does: the development install is editable and may run with
    ``PYTHONDONTWRITEBYTECODE`` set, where every command would otherwise compile
    the modules it imports from source (some 40 ms of a client command here),
    which no installed copy does.
    """
    found = Path(sys.executable).parent / "gateway"
    if not found.exists():
        raise SystemExit(f"{found} is missing: install the package (make install) first")
    import gateway  # noqa: PLC0415

    package = Path(gateway.__file__).parent
    if not compileall.compile_dir(package, quiet=1, workers=1):
        raise SystemExit(f"could not compile the bytecode of {package}")
    return str(found)


def case_file(folder: Path) -> Path:
    """The example exam-fraud case grown to 4 KiB of JSON."""
    case = dict(json.loads((EXAMPLES / "exam-fraud.json").read_text()))
    rest = len(json.dumps({**case, "description": ""}, ensure_ascii=False))
    case["description"] = ("Observed at the test centre; statements on file. " * 100)[: 4096 - rest]
    path = folder / "case.json"
    path.write_text(json.dumps(case, ensure_ascii=False))
    return path


@dataclass
class User:
    """The environment a user's shell gives ``gateway``: home and token only,
    and the passphrase when the run was asked to pass it."""

    node: NodeHome
    token: str
    passphrase: bool

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.pop("PYTHONPATH", None)
        env["GATEWAY_HOME"] = str(self.node.home)
        env["GATEWAY_TOKEN"] = self.token
        if self.passphrase:
            env["GATEWAY_PASSPHRASE"] = self.node.passphrase
        return env


@dataclass
class Gpg:
    """A throw-away GnuPG home with one generated key pair (no passphrase)."""

    home: Path
    uid: str = "ssw-gateway benchmark <bench@example.invalid>"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home.mkdir(mode=0o700)
        self.env = {**os.environ, "GNUPGHOME": str(self.home)}
        quiet = ["--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
        done = subprocess.run(
            ["gpg", *quiet, "--quick-generate-key", self.uid, "future-default", "default", "never"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"gpg could not make a key pair:\n{done.stderr}")

    def argv(self, source: Path, target: Path) -> list[str]:
        return [
            "gpg",
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--sign",
            "--encrypt",
            "--recipient",
            self.uid,
            "--output",
            str(target),
            str(source),
        ]

    def close(self) -> None:
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"], env=self.env, capture_output=True, check=False
        )


def line(label: str, ours: list[float], base: list[float], base_label: str) -> None:
    mine, theirs = statistics.median(ours), statistics.median(base)
    print(
        f"{label:<28} {mine * 1000:9.1f} ms/file {1 / mine:7.2f} files/s   "
        f"{base_label:<22} {theirs * 1000:9.1f} ms/file {1 / theirs:7.2f} files/s   "
        f"ratio {mine / theirs:6.2f}x"
    )


def timings(args: argparse.Namespace, root: Path, jp: User, pk: User, gateway: str) -> None:
    """(a) and (b), interleaved: every repetition runs each pair once per file."""
    case = case_file(root)
    gpg = Gpg(root / "gnupg")
    sends: list[float] = []
    gpgs: list[float] = []
    inboxes: list[float] = []
    versions: list[float] = []
    bare: list[float] = []
    try:
        if not args.quick:
            # One untimed round warms the page cache and gpg-agent for both sides.
            warm = [gateway, "send", "exam-fraud", str(case)]
            checked(run_measured(warm, jp.env(), root), "send")
            checked(run_measured(gpg.argv(case, root / "warm.gpg"), gpg.env, root), "gpg")
        for rep in range(args.reps):
            for number in range(args.files):
                send = [gateway, "--json", "send", "exam-fraud", str(case)]
                sends.append(checked(run_measured(send, jp.env(), root), "send").seconds)
                target = root / f"out-{rep}-{number}.gpg"
                gpgs.append(
                    checked(run_measured(gpg.argv(case, target), gpg.env, root), "gpg").seconds
                )
            inbox = checked(run_measured([gateway, "inbox", "--json"], pk.env(), root), "inbox")
            json.loads(inbox.stdout)
            inboxes.append(inbox.seconds)
            version = run_measured([gateway, "--version"], pk.env(), root)
            versions.append(checked(version, "--version").seconds)
            bare.append(
                checked(
                    run_measured([sys.executable, "-c", "pass"], pk.env(), root), "python"
                ).seconds
            )
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        gpg.close()
    print(
        f"{case.stat().st_size} byte case, {args.reps} repetitions x {args.files} files, medians:"
    )
    line("gateway send (per file)", sends, gpgs, "gpg --sign --encrypt")
    line("gateway inbox --json", inboxes, bare, "python -c pass")
    line("gateway --version", versions, bare, "python -c pass")
    print(
        f"target: gateway send <= 5x gpg per file; now {statistics.median(sends) / statistics.median(gpgs):.2f}x"
    )


def memory(
    args: argparse.Namespace,
    root: Path,
    jp: User,
    pk: User,
    gateway: str,
    serves: dict[str, ServeProcess],
) -> None:
    """(c): peak RSS of ``send --attach`` and ``show --out`` of one large file."""
    big = root / "attachment.bin"
    block = bytes(range(256)) * 4096
    with big.open("wb") as out:
        for _ in range(args.mib):
            out.write(block)
    case = case_file(root)
    jp_pid, pk_pid = serves["jp"].process.pid, serves["pk"].process.pid
    before = {"jp": vm_hwm_bytes(jp_pid), "pk": vm_hwm_bytes(pk_pid)}
    send = checked(
        run_measured(
            [gateway, "--json", "send", "exam-fraud", str(case), "--attach", str(big)],
            jp.env(),
            root,
        ),
        "send --attach",
    )
    bundle_id = json.loads(send.stdout)["bundle_id"]
    deadline = time.monotonic() + max(120.0, args.mib * 0.5)
    while True:
        inbox = checked(run_measured([gateway, "inbox", "--json"], pk.env(), root), "inbox")
        if bundle_id in inbox.stdout:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"bundle {bundle_id} did not reach pk in time")
        time.sleep(1.0)
    out_dir = root / "shown"
    show = checked(
        run_measured([gateway, "--json", "show", bundle_id, "--out", str(out_dir)], pk.env(), root),
        "show --out",
    )
    after = {"jp": vm_hwm_bytes(jp_pid), "pk": vm_hwm_bytes(pk_pid)}
    written = [
        p for p in out_dir.rglob("*") if p.is_file() and p.stat().st_size == big.stat().st_size
    ]
    if not written:
        raise SystemExit("show --out wrote no file of the attachment's size")
    print(
        f"memory, one {args.mib} MiB attachment (targets: command < 150 MiB, node growth < 150 MiB):"
    )
    print(
        f"  gateway send --attach   peak RSS {send.max_rss_bytes / MIB:8.1f} MiB   {send.seconds:7.2f} s"
    )
    print(
        f"  gateway show --out      peak RSS {show.max_rss_bytes / MIB:8.1f} MiB   {show.seconds:7.2f} s"
    )
    for node_id in ("jp", "pk"):
        grew = (after[node_id] - before[node_id]) / MIB
        print(
            f"  {node_id} serve VmHWM       {before[node_id] / MIB:8.1f} -> {after[node_id] / MIB:8.1f} MiB"
            f"   (+{grew:.1f} MiB)"
        )


def officer(node: NodeHome, name: str, passphrase: bool) -> User:
    data: Any = node.run("users", "add", name, "--role", "officer")
    return User(node, str(data["token"]), passphrase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions (medians over them)")
    parser.add_argument("--files", type=int, default=3, help="files sent per repetition")
    parser.add_argument("--mib", type=int, default=1024, help="attachment size for (c); 0: skip")
    parser.add_argument(
        "--passphrase-env",
        action="store_true",
        help="give commands GATEWAY_PASSPHRASE too (commands that open the keystore need it)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 1 file, 8 MiB")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.files, args.mib = 2, 1, min(args.mib, 8)
    if shutil.which("gpg") is None:
        raise SystemExit("gpg is not installed: the baseline of (a) needs it")
    gateway = gateway_program()

    with tempfile.TemporaryDirectory(prefix="ssw-cli-bench-") as tmp:
        root = Path(tmp)
        homes = init_pair(root)
        serves = {node_id: homes[node_id].serve() for node_id in ("jp", "pk")}
        try:
            for serve in serves.values():
                wait_ready(serve)
            jp = officer(homes["jp"], "bench-jp", args.passphrase_env)
            pk = officer(homes["pk"], "bench-pk", args.passphrase_env)
            timings(args, root, jp, pk, gateway)
            if args.mib > 0:
                memory(args, root, jp, pk, gateway, serves)
        finally:
            for serve in serves.values():
                stop(serve)


if __name__ == "__main__":
    main()
