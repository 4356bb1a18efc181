"""The ``gateway`` entry point: the hot client commands without click.

A client command's own work is one request to the running node, so its
start-up is most of what a user waits for, and click alone costs about as
much to import as the rest of it (docs/performance.md). :func:`main` parses
the command line itself, from the table of :mod:`gateway.cli._fast_commands`
(generated from the click definitions by :mod:`gateway.cli.fast_spec`, and
checked against them by a test), and runs the command's ``runner`` (the
click-free function its click callback calls). Whatever it does not parse
exactly as click would (``--help``, ``--version``, a usage error, an unknown
option, ``--``, a path click would refuse, any command without a runner) goes
to the click command line (:func:`gateway.cli.main.main`), so every message
and exit code stays click's own.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["Parsed", "main", "parse", "run", "table"]

_TABLE: dict[str, Any] | None = None


def table() -> dict[str, Any]:
    """The parsed table of :mod:`gateway.cli._fast_commands` (shape: :func:`gateway.cli.fast_spec.build_table`)."""
    global _TABLE  # noqa: PLW0603 - parsed once per process
    if _TABLE is None:
        from gateway.cli._fast_commands import TABLE_JSON  # noqa: PLC0415

        _TABLE = json.loads(TABLE_JSON)
    return _TABLE


class Parsed(NamedTuple):
    """A command line the fast path runs: the runner, its keywords, the context's settings.

    (A named tuple: ``dataclasses`` would import ``inspect`` for the whole path.)
    """

    command: str
    runner: str
    kwargs: dict[str, Any]
    app: dict[str, Any]


def _path_ok(value: str, checks: Mapping[str, bool]) -> bool:
    """Whether ``click.Path`` with ``checks`` accepts ``value`` (no allow_dash, no resolve)."""
    if not value:
        return False
    try:
        st = Path(value).stat()
    except OSError:
        return not checks["exists"]
    if not checks["file_okay"] and stat.S_ISREG(st.st_mode):
        return False
    if not checks["dir_okay"] and stat.S_ISDIR(st.st_mode):
        return False
    if checks["readable"] and not os.access(value, os.R_OK):
        return False
    if checks["writable"] and not os.access(value, os.W_OK):
        return False
    return not (checks["executable"] and not os.access(value, os.X_OK))


def _take_option(
    argv: Sequence[str], index: int, options: Mapping[str, Any], into: dict[str, Any]
) -> int | None:
    """Parse the option at ``argv[index]`` into ``into``; the next index, or None to leave it to click."""
    token = argv[index]
    name, has_inline, inline = token, False, ""
    if token.startswith("--") and "=" in token:
        name, _, inline = token.partition("=")
        has_inline = True
    spec = options.get(name)
    if spec is None:
        return None
    if spec["kind"] == "flag":
        if has_inline:
            return None
        into[spec["dest"]] = True
        return index + 1
    if has_inline:
        value, after = inline, index + 1
    else:
        if index + 1 >= len(argv) or argv[index + 1].startswith("-"):
            return None
        value, after = argv[index + 1], index + 2
    converted: Any = value
    if spec["kind"] == "path":
        if not _path_ok(value, spec["path"]):
            return None
        converted = Path(value)
    elif spec["kind"] == "choice" and value not in spec["choices"]:
        return None
    if spec["multiple"]:
        into.setdefault(spec["dest"], []).append(converted)
    else:
        into[spec["dest"]] = converted
    return after


def _defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in options.values():
        dest = spec["dest"]
        if dest.startswith("app."):
            continue
        out[dest] = [] if spec["multiple"] else (False if spec["kind"] == "flag" else None)
    return out


def parse(argv: Sequence[str], spec: Mapping[str, Any] | None = None) -> Parsed | None:
    """The command line ``argv`` (without the program name) as the fast path runs it.

    ``spec`` defaults to :func:`table`. None when click must handle it: no
    command, a command without a runner, help or an eager option, ``--``, an
    option unknown or without its value, a value click would refuse, or a
    wrong number of arguments.
    """
    spec = table() if spec is None else spec
    if "--" in argv:
        return None
    root = spec["root"]
    found: dict[str, Any] = {}
    index = 0
    while index < len(argv) and argv[index].startswith("-") and argv[index] != "-":
        if argv[index] in root["stop"]:
            return None
        after = _take_option(argv, index, root["options"], found)
        if after is None:
            return None
        index = after
    if index >= len(argv) or argv[index] not in spec["commands"]:
        return None
    name = argv[index]
    command = spec["commands"][name]
    index += 1
    positional: list[str] = []
    while index < len(argv):
        word = argv[index]
        if word in command["stop"]:
            return None
        if word.startswith("-") and word != "-":
            after = _take_option(argv, index, command["options"], found)
            if after is None:
                return None
            index = after
            continue
        positional.append(word)
        index += 1
    if len(positional) != len(command["arguments"]):
        return None
    kwargs = _defaults(command["options"])
    app: dict[str, Any] = {}
    for dest, value in found.items():
        if dest.startswith("app."):
            app[dest.removeprefix("app.")] = value
        else:
            kwargs[dest] = tuple(value) if isinstance(value, list) else value
    kwargs.update(zip(command["arguments"], positional, strict=True))
    for dest, value in kwargs.items():
        if isinstance(value, list):
            kwargs[dest] = tuple(value)
    return Parsed(name, command["runner"], kwargs, app)


def _runner(target: str) -> Callable[..., None]:
    module_name, _, attribute = target.partition(":")
    function: Callable[..., None] = getattr(importlib.import_module(module_name), attribute)
    return function


def run(argv: Sequence[str], *, environ: Mapping[str, str] | None = None) -> int | None:
    """Run ``argv`` without click if :func:`parse` takes it: the exit code, else None.

    As the click group does: the root options set the invocation's
    :class:`~gateway.cli.context.AppContext`, the log is configured, the
    runner runs, and a failure is reported and mapped to its exit code by
    :func:`gateway.cli.outcome.failed` (SPEC §8).
    """
    parsed = parse(argv)
    if parsed is None:
        return None
    from gateway import log  # noqa: PLC0415
    from gateway.cli.context import AppContext  # noqa: PLC0415
    from gateway.cli.outcome import failed  # noqa: PLC0415

    app = AppContext() if environ is None else AppContext(environ=dict(environ))
    for attribute, value in parsed.app.items():
        setattr(app, attribute, value)
    log.configure(level="debug" if app.verbose else "warning")
    try:
        _runner(parsed.runner)(app, **parsed.kwargs)
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - mapped to exit codes in one place
        return failed(app, exc)
    return 0


def main() -> None:
    """``gateway``: the fast path when it takes the command line, else the click command line."""
    code = run(sys.argv[1:])
    if code is None:
        from gateway.cli.main import main as click_main  # noqa: PLC0415

        click_main()
        return
    sys.exit(code)
