"""``gateway demo``: two real nodes on loopback, the whole story, in one command."""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import click

from gateway.cli.base import GatewayCommand, LazyGroup
from gateway.cli.context import AppContext, pass_app
from gateway.demo.story import (
    THIRD_PARTY,
    DemoInterrupted,
    DemoStory,
    Runner,
    StepOutcome,
    exec_runner,
)
from gateway.errors import EXIT_ERROR, ConfigError

__all__ = ["demo"]

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _command_exists(root: click.Command, path: str) -> bool:
    """True when ``gateway <path>`` (e.g. ``"consent grant"``) is a command of this build."""
    command: click.Command | None = root
    for part in path.split():
        if not isinstance(command, click.Group):
            return False
        command = command.commands.get(part)
        if command is None:
            return False
    return True


def _fork_runner(root_command: click.Command) -> Runner:
    """Run each command in a forked child: its own process, environment and exit
    code, with the command line already imported, so a command costs
    milliseconds instead of a fresh interpreter's start."""

    def run(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> tuple[int, str, str]:
        sys.stdout.flush()
        sys.stderr.flush()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # No signal handler may run inside fork(): the interpreter's at-fork
        # hooks would swallow the exception a Ctrl-C raises. Blocked signals
        # wait and are handled right after, in ordinary code.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:
            _child(root_command, argv, env, (out_r, out_w, err_r, err_w), mask)
        os.close(out_w)
        os.close(err_w)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            out, err = _collect(out_r, err_r, timeout, argv)
        except BaseException:
            _reap(pid, kill=True)
            raise
        finally:
            os.close(out_r)
            os.close(err_r)
        code = _reap(pid, kill=False)
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    return run


def _child(
    root_command: click.Command,
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: tuple[int, int, int, int],
    mask: set[int | signal.Signals],
) -> None:
    """The forked child: wire stdin/stdout/stderr, set the environment, run, exit."""
    code = 1
    try:
        out_r, out_w, err_r, err_w = fds
        os.close(out_r)
        os.close(err_r)
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (null, out_w, err_w):
            os.close(fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the process's own descriptors
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        try:
            root_command.main(args=list(argv), prog_name="gateway", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - a child never returns into the demo's stack
        with contextlib.suppress(Exception):
            sys.stderr.write(f"error: internal error ({type(exc).__name__})\n")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _collect(out_r: int, err_r: int, timeout: float, argv: Sequence[str]) -> tuple[bytes, bytes]:
    """Read the child's stdout and stderr to their end, within ``timeout``."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(out_r, selectors.EVENT_READ)
        selector.register(err_r, selectors.EVENT_READ)
        open_fds = 2
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(["gateway", *argv], timeout)
            for key, _events in selector.select(timeout=min(remaining, 1.0)):
                fd = int(key.fd)
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    selector.unregister(fd)
                    open_fds -= 1
    return b"".join(chunks[out_r]), b"".join(chunks[err_r])


def _reap(pid: int, *, kill: bool) -> int:
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _prepare_root(base: Path | None) -> tuple[Path, bool]:
    """The folder for the two homes, and whether the demo made it itself."""
    if base is None:
        return Path(tempfile.mkdtemp(prefix="ssw-gateway-demo-")), True
    base = base.expanduser().resolve()
    if base.exists():
        if not base.is_dir():
            raise ConfigError(f"--dir {base} exists and is not a directory")
        if any(base.iterdir()):
            raise ConfigError(
                f"--dir {base} is not empty: give a new or empty folder so no node is overwritten"
            )
        return base, False
    base.mkdir(parents=True, mode=0o700)
    return base, True


def _remove(root: Path, made_root: bool) -> None:
    if made_root:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@click.command(cls=GatewayCommand)
@click.option(
    "--dir",
    "base",
    type=click.Path(file_okay=False, path_type=Path),
    help="New or empty folder for the two node homes (default: a new temporary folder).",
)
@click.option("--keep", is_flag=True, help="Leave the homes (and their secrets) for exploring.")
@pass_app
@click.pass_context
def demo(ctx: click.Context, app: AppContext, base: Path | None, keep: bool) -> None:
    """Run Tokyo (jp) and Islamabad (pk) on loopback and walk the whole story.

    Two real `gateway serve` processes exchange a broker-misconduct case; a
    disclosure to a third party is blocked until Islamabad grants written
    consent, and blocked again after it revokes; compliance officers verify
    and export both ledgers; Islamabad rotates its keys. Every step runs the
    real `gateway` command line. Exit 0 when every step succeeded.

    \b
    Examples:
      gateway demo
      gateway demo --keep --dir ./demo-homes
      gateway demo --json

    Runs on this host in a scratch folder; it does not read any keystore passphrase.
    """
    root, made_root = _prepare_root(base)
    cli_root = ctx.find_root().command
    if isinstance(cli_root, LazyGroup):
        # Each step forks a child from this process: import every command once here.
        cli_root.load_all()
    human = not app.as_json

    def on_start(number: int, total: int, title: str) -> None:
        line = f"[{number:>2}/{total}] {title}"
        if human:
            click.echo(click.style(line, bold=True))
        else:
            app.progress(line)

    def on_command(line: str) -> None:
        if human:
            click.echo(click.style(f"        $ {line}", dim=True))

    def on_step(outcome: StepOutcome) -> None:
        if outcome.ok:
            mark = click.style("ok", fg="green", bold=True)
        elif not outcome.available:
            mark = click.style("n/a", fg="yellow", bold=True)
        else:
            mark = click.style("FAILED", fg="red", bold=True)
        text = f"        {mark}  {outcome.detail}"
        if human:
            click.echo(text)
        else:
            app.progress(click.unstyle(text))

    story = DemoStory(
        root,
        available=lambda path: _command_exists(cli_root, path),
        on_step=on_step,
        on_start=on_start,
        on_command=on_command,
        environ=app.environ,
        runner=_fork_runner(cli_root) if hasattr(os, "fork") else exec_runner,
    )
    if human:
        click.echo(
            "ssw-gateway demo: Tokyo (jp) and Islamabad (pk) exchange a broker-misconduct case;\n"
            f"the consent ledger guards its onward disclosure to {THIRD_PARTY}.\n"
            f"Every step runs the real gateway command line; paths are relative to {root}\n"
        )
    interrupted = False
    started = time.monotonic()
    kept: dict[str, Path] = {}
    try:
        try:
            outcomes = story.run()
        except DemoInterrupted:
            interrupted = True
            outcomes = story.outcomes
        if keep and story.nodes:
            kept = story.write_secret_files()
    finally:
        # Also when the story ends by surprise (a closed pipe, an internal error).
        if not keep:
            _remove(root, made_root)
    seconds = time.monotonic() - started
    passed = sum(1 for o in outcomes if o.ok)
    all_ok = not interrupted and len(outcomes) == story.total and passed == story.total
    data = {
        "ok": all_ok,
        "interrupted": interrupted,
        "passed": passed,
        "total": story.total,
        "seconds": round(seconds, 1),
        "steps": [o.as_json() for o in outcomes],
        "dir": root,
        "kept": keep,
        "homes": {k: n.home for k, n in story.nodes.items()},
        "files": story.files if keep else {},
        "secret_files": kept,
    }

    def summary() -> str:
        lines = [""]
        if interrupted:
            lines.append("Interrupted: both nodes were stopped.")
        unavailable = [o for o in outcomes if not o.available]
        failed = [o for o in outcomes if o.available and not o.ok]
        lines.append(f"Summary: {passed} of {story.total} steps succeeded in {seconds:.0f} s.")
        for o in failed:
            lines.append(f"  failed:        {o.number:>2}. {o.title}")
        for o in unavailable:
            lines.append(f"  not available: {o.number:>2}. {o.title}")
        if keep and story.nodes:
            lines.append(f"\nThe homes are kept in {root}:")
            for node in story.nodes.values():
                lines.append(f"  {node.city:<9} {node.home}")
            for name, path in story.files.items():
                lines.append(f"  {name:<16} {path}")
            jp = story.nodes.get("jp")
            if jp is not None:
                secrets_dir = jp.home / "demo-secrets"
                lines += [
                    "Explore Tokyo: start it as its host operator (the passphrase), e.g.:",
                    f'  GATEWAY_PASSPHRASE="$(cat {secrets_dir}/passphrase)" gateway '
                    f"--home {jp.home} serve &",
                    "then act as its officer, with the token only:",
                    f"  gateway --home {jp.home} --token-file {secrets_dir}/officer.token inbox",
                ]
        else:
            lines.append(f"The homes in {root} were removed (use --keep to explore them).")
        return "\n".join(lines)

    app.emit(data, summary)
    if not all_ok:
        ctx.exit(130 if interrupted else EXIT_ERROR)
