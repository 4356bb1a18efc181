"""The command line starts light: a command loads only what it uses.

``gateway --version``, ``gateway --help``, a group's ``--help`` and every
command in :data:`LIGHT_COMMANDS` must run without importing the database,
migrations, the web server, libsodium, pydantic or the case schemas
(docs/performance.md, "Command start-up"). The check runs in a fresh
interpreter, as a user's shell would start one. The command table of
``gateway/cli/main.py`` is checked against the commands it names.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

import gateway.cli
from gateway.cli.base import LazyCommand, LazyGroup, LazySubgroup, summary_of
from gateway.cli.main import COMMANDS, cli

REPO = Path(__file__).resolve().parents[2]

HEAVY = (
    "sqlalchemy",
    "alembic",
    "aiohttp",
    "nacl",
    "pydantic",
    "prometheus_client",
    "gateway.core.cases",
    "gateway.store",
)
"""Modules a light command must not import (a name or any submodule of it)."""

LIGHT_COMMANDS: list[tuple[list[str], int]] = [
    (["--version"], 0),
    (["--help"], 0),
    (["-h"], 0),
    (["consent", "--help"], 0),
    (["db", "--help"], 0),
    (["keys", "--help"], 0),
    (["ledger", "--help"], 0),
    (["peer", "--help"], 0),
    (["users", "--help"], 0),
    (["no-such-command"], 2),
    # Client commands of the running node: no node listens here, so each exits 1
    # after reaching for the socket, having imported only the standard library.
    (["send", "exam-fraud", "case.json"], 1),
    (["inbox", "--json"], 1),
    (["outbox"], 1),
    (["show", "B"], 1),
    (["consent", "list"], 1),
    (["approvals", "list"], 1),
    (["approvals", "propose", "keys-rotate", "--reason", "r"], 1),
    (["approvals", "approve", "00000000-0000-4000-8000-000000000000", "--yes"], 1),
    (["approvals", "show", "00000000-0000-4000-8000-000000000000"], 1),
    (["approvals", "reject", "00000000-0000-4000-8000-000000000000", "--reason", "r"], 1),
    (["approvals", "approve", "P"], 2),
    (["approvals", "--help"], 0),
    (["disclose", "B", "--recipient", "R", "--purpose", "P", "--out", "o"], 1),
    (["ledger", "list"], 1),
    (["ledger", "verify"], 1),
    (["ledger", "account"], 1),
    (["users", "list"], 1),
    (["peer", "show"], 1),
    (["keys", "show"], 1),
]
"""(arguments, exit code) of the commands that must stay light. A command that
becomes a client of the running node (``inbox --json``, ``consent list``, ...)
joins this table: it runs here with an empty home and no node listening, so it
fails to connect, and that path must be light too. (An unknown subcommand of a
group looks in the group's module before saying so, and is not light.)"""

_PROBE = """
import json, sys
from gateway.cli.main import cli

heavy, runs, report = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
results = []
for argv, _expected in runs:
    try:
        cli.main(args=argv, prog_name="gateway", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    loaded = sorted(
        name for name in sys.modules
        if any(name == h or name.startswith(h + ".") for h in heavy)
    )
    results.append({"argv": argv, "code": code, "heavy": loaded})
with open(report, "w", encoding="utf-8") as out:
    json.dump(results, out)
"""


def _light_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_HOME"] = str(home)
    env["GATEWAY_TOKEN"] = "ssw_0123456789abcdef_" + "Q" * 43
    env["PYTHONPATH"] = str(REPO)
    return env


def test_light_commands_import_no_heavy_module(tmp_path: Path) -> None:
    """One fresh interpreter runs every light command in turn; after each, none of
    HEAVY is loaded (the first command to load one is the one named)."""
    home = tmp_path / "no-node-here"
    home.mkdir()
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(LIGHT_COMMANDS), str(report)],
        env=_light_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(report.read_text(encoding="utf-8"))
    assert [r["argv"] for r in results] == [argv for argv, _ in LIGHT_COMMANDS]
    for result, (argv, expected) in zip(results, LIGHT_COMMANDS, strict=True):
        heavy = sorted({name.split(".")[0] for name in result["heavy"]})
        assert not heavy, f"gateway {' '.join(argv)} imported {heavy}"
        assert result["code"] == expected, f"gateway {' '.join(argv)} exited {result['code']}"
    assert "gateway, version" in done.stdout
    assert "Commands:" in done.stdout


@pytest.mark.slow
def test_a_command_that_runs_loads_what_it_needs(tmp_path: Path) -> None:
    """The probe can fail: ``db status`` on an empty home loads the settings models
    and the database layer before refusing (no gateway.toml)."""
    home = tmp_path / "no-node-here"
    home.mkdir()
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROBE,
            json.dumps(HEAVY),
            json.dumps([[["db", "status"], 1]]),
            str(report),
        ],
        env=_light_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(report.read_text(encoding="utf-8"))
    assert result["code"] == 1
    assert "sqlalchemy" in result["heavy"]
    assert "run 'gateway init' first" in done.stderr


# --- the command table --------------------------------------------------------------


def _module_commands() -> set[int]:
    """ids of the top-level commands and groups the ``*_cmd`` modules define (a
    group's own subcommands excluded)."""
    found: dict[int, click.Command] = {}
    nested: set[int] = set()
    for info in pkgutil.iter_modules(gateway.cli.__path__):
        if not info.name.endswith("_cmd"):
            continue
        module = importlib.import_module(f"gateway.cli.{info.name}")
        for value in vars(module).values():
            if isinstance(value, click.Command) and value.callback is not None:
                if getattr(value.callback, "__module__", None) != module.__name__:
                    continue
                found[id(value)] = value
                if isinstance(value, click.Group):
                    nested.update(id(sub) for sub in value.commands.values())
    return {key for key in found if key not in nested}


def test_every_command_module_is_in_the_table() -> None:
    listed: set[int] = set()
    for name, entry in COMMANDS.items():
        target = entry.target
        listed.add(id(LazyCommand(target, "").load(name)))
    assert listed == _module_commands()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_table_entry_matches_its_command(name: str) -> None:
    entry = COMMANDS[name]
    command = LazyCommand(entry.target, "").load(name)
    assert command.name == name
    assert entry.summary == summary_of(command.help or ""), f"summary of {name} drifted"
    if isinstance(entry, LazySubgroup):
        assert isinstance(command, click.Group)
        assert entry.help == inspect.cleandoc(command.help or "")
        assert sorted(entry.commands) == sorted(command.commands)
        for sub_name, sub in entry.commands.items():
            assert sub.load(sub_name) is command.commands[sub_name]
            assert sub.summary == summary_of(command.commands[sub_name].help or "")


def _help(root: LazyGroup, path: tuple[str, ...]) -> str:
    ctx = click.Context(root, info_name="gateway", terminal_width=100)
    group: click.Command = root
    for name in path:
        assert isinstance(group, click.Group)
        sub = group.get_command(ctx, name)
        assert sub is not None
        ctx = click.Context(sub, parent=ctx, info_name=name)
        group = sub
    return group.get_help(ctx)


@pytest.mark.parametrize(
    "path", [(), *[(name,) for name, e in COMMANDS.items() if isinstance(e, LazySubgroup)]]
)
def test_help_from_the_table_equals_help_of_the_loaded_commands(path: tuple[str, ...]) -> None:
    lazy = LazyGroup(name="gateway", help=cli.help, table=COMMANDS)
    loaded = LazyGroup(name="gateway", help=cli.help, table=COMMANDS)
    loaded.load_all()
    assert _help(lazy, path) == _help(loaded, path)
    # Listing loaded nothing but the group's own stand-in, which loaded nothing.
    assert all(isinstance(c, LazyGroup) and not c.commands for c in lazy.commands.values())
    assert len(lazy.commands) == len(path)


def test_a_command_missing_from_a_group_table_is_found_in_its_module() -> None:
    entry = COMMANDS["users"]
    assert isinstance(entry, LazySubgroup)
    partial = {k: v for k, v in entry.commands.items() if k != "disable"}
    group = LazySubgroup(entry.target, entry.help, partial).load("users")
    assert isinstance(group, LazyGroup)
    ctx = click.Context(group)
    assert "disable" not in group.list_commands(ctx)
    found = group.get_command(ctx, "disable")
    assert found is not None
    assert found.callback is not None
    assert found.callback.__module__ == "gateway.cli.users_cmd"
    assert group.get_command(ctx, "no-such-command") is None
    group.load_all()
    assert "disable" in group.list_commands(ctx)


def test_a_table_entry_naming_no_command_is_refused() -> None:
    with pytest.raises(TypeError, match="not a click command"):
        LazyCommand("gateway.cli.main:COMMANDS", "").load("broken")


# --- init_node without the command line ----------------------------------------------


@pytest.mark.slow
def test_init_node_runs_every_stage_without_the_command_line(tmp_path: Path) -> None:
    """``init_node`` imports the modules that register its stages: a fresh process
    that never imports the command line still gets keys and policies."""
    home = tmp_path / "jp"
    script = (
        "import os, sys\n"
        "from datetime import datetime, UTC\n"
        "from pathlib import Path\n"
        "from gateway.node.setup import init_node\n"
        "result = init_node(Path(sys.argv[1]), 'jp', now=datetime.now(UTC),"
        " environ=dict(os.environ))\n"
        "assert 'gateway.cli.main' not in sys.modules\n"
        "print(*sorted(result.facts))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_PASSPHRASE": "test passphrase, not a secret",
        "GATEWAY_KEYSTORE_STRENGTH": "min",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (home / "keys" / "operational.key").is_file()
    assert (home / "policies").is_dir()
    assert "policy_version" in done.stdout.split()
