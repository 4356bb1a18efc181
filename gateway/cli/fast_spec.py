"""Build the table of :mod:`gateway.cli._fast_commands` from the click commands.

The fast path (:mod:`gateway.cli.fast`) parses a command line without click
from that table; this module derives it from the click definitions, so the
two cannot drift: ``tests/unit/test_cli_fast.py`` renders the table again and
fails when the committed module differs. After changing a command that has a
``runner``, or the root group's options, write the module again with::

    .venv/bin/python -m gateway.cli.fast_spec

Only what the fast parser reproduces exactly is accepted (single-valued text
and path parameters, flags, repeatable options, required string arguments,
the ``--home`` and ``--json`` callbacks); anything else raises
:class:`UnsupportedParameter` naming the parameter, so a command that grows a
feature the fast path does not know fails the test instead of parsing wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from gateway.cli.base import GatewayCommand, LazyCommand, LazySubgroup, _set_home, _set_json
from gateway.cli.context import AppContext

__all__ = ["TABLE_PATH", "UnsupportedParameter", "build_table", "render"]

TABLE_PATH = Path(__file__).with_name("_fast_commands.py")
"""Where the generated table lives in the source tree."""

_CALLBACK_TARGETS = {_set_home: "app.home_option", _set_json: "app.as_json"}
_PATH_CHECKS = (
    "exists",
    "file_okay",
    "dir_okay",
    "readable",
    "writable",
    "executable",
    "allow_dash",
    "resolve_path",
)


class UnsupportedParameter(ValueError):
    """A parameter the fast parser cannot reproduce exactly (its name in the message)."""


def _kind(param: click.Parameter) -> tuple[str, dict[str, bool] | None]:
    if isinstance(param, click.Option) and param.is_flag:
        if (
            param.secondary_opts
            or param.count
            or not isinstance(param.type, click.types.BoolParamType)
        ):
            raise UnsupportedParameter(f"{param.name}: only plain on-flags are supported")
        return "flag", None
    if isinstance(param.type, click.Path):
        if param.type.allow_dash or param.type.resolve_path:
            raise UnsupportedParameter(f"{param.name}: '-' and resolved paths are not supported")
        checks = {name: bool(getattr(param.type, name)) for name in _PATH_CHECKS[:6]}
        return "path", checks
    if type(param.type) is click.types.StringParamType:
        return "text", None
    if isinstance(param.type, click.Choice) and param.type.case_sensitive:
        if not all(isinstance(choice, str) for choice in param.type.choices):
            raise UnsupportedParameter(f"{param.name}: only text choices are supported")
        return "choice", None
    raise UnsupportedParameter(f"{param.name}: type {param.type.name} is not supported")


def _option(param: click.Parameter, dest: str) -> dict[str, Any]:
    if not isinstance(param, click.Option):
        raise UnsupportedParameter(f"{param.name}: not an option")
    if param.nargs != 1 or param.required or param.prompt or param.envvar or param.is_eager:
        raise UnsupportedParameter(f"{param.name}: nargs, required, prompt, envvar, eager")
    if param.default is not click.core.UNSET:  # type: ignore[attr-defined]
        raise UnsupportedParameter(f"{param.name}: a default is not supported")
    kind, checks = _kind(param)
    if param.multiple and kind == "flag":
        raise UnsupportedParameter(f"{param.name}: a repeatable flag is not supported")
    choices = list(param.type.choices) if isinstance(param.type, click.Choice) else None
    return {
        "dest": dest,
        "kind": kind,
        "multiple": bool(param.multiple),
        "path": checks,
        "choices": choices,
    }


def _dest(param: click.Parameter, *, root: bool) -> str:
    if param.callback is not None:
        target = _CALLBACK_TARGETS.get(param.callback)
        if target is None or param.expose_value:
            raise UnsupportedParameter(f"{param.name}: callback {param.callback!r}")
        return target
    if not param.expose_value or param.name is None:
        raise UnsupportedParameter(f"{param.name}: not passed to the command")
    if root:
        if param.name not in AppContext.OPTIONS:
            raise UnsupportedParameter(f"{param.name}: the root callback has no AppContext field")
        return f"app.{param.name}"
    return param.name


def _stop_tokens(command: click.Command, ctx: click.Context) -> set[str]:
    """Options the fast path leaves to click: help, and every eager option (--version)."""
    tokens = set(command.get_help_option_names(ctx))
    for param in command.params:
        if isinstance(param, click.Option) and param.is_eager:
            tokens.update(param.opts)
            tokens.update(param.secondary_opts)
    return tokens


def _options(
    command: click.Command, ctx: click.Context, *, root: bool
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    options: dict[str, dict[str, Any]] = {}
    arguments: list[str] = []
    help_names = set(command.get_help_option_names(ctx))
    for param in command.params:
        if isinstance(param, click.Option) and param.is_eager:
            continue  # left to click (_stop_tokens)
        if isinstance(param, click.Argument):
            if root or param.nargs != 1 or not param.required or param.name is None:
                raise UnsupportedParameter(f"{param.name}: only one required value per argument")
            if type(param.type) is not click.types.StringParamType or param.callback:
                raise UnsupportedParameter(f"{param.name}: only plain text arguments")
            arguments.append(param.name)
            continue
        spec = _option(param, _dest(param, root=root))
        for opt in [*param.opts, *param.secondary_opts]:
            if opt in help_names:
                raise UnsupportedParameter(f"{opt}: shadows the help option")
            options[opt] = spec
    return options, arguments


def build_table(root: click.Group, table: dict[str, LazyCommand | LazySubgroup]) -> dict[str, Any]:
    """The fast path's table: the root's options and every top-level command with a runner.

    Shape: ``{"root": {"options": ..., "stop": [...]}, "commands": {name:
    {"runner", "arguments", "options", "stop"}}}``; an option is ``{"dest",
    "kind" ("flag" | "text" | "path" | "choice"), "multiple", "path" (click.Path's
    checks or None), "choices" (or None)}``; ``dest`` ``app.X`` is an :class:`AppContext` attribute, any
    other a keyword of the runner. Raises :class:`UnsupportedParameter`.
    """
    ctx = click.Context(root, **root.context_settings)
    root_options, _ = _options(root, ctx, root=True)
    commands: dict[str, Any] = {}
    for name, entry in sorted(table.items()):
        if not isinstance(entry, LazyCommand):
            continue
        command = entry.load(name)
        runner = getattr(command, "runner", None)
        if not isinstance(command, GatewayCommand) or runner is None:
            continue
        sub = click.Context(command, parent=ctx, info_name=name, **command.context_settings)
        options, arguments = _options(command, sub, root=False)
        commands[name] = {
            "runner": runner,
            "arguments": arguments,
            "options": options,
            "stop": sorted(_stop_tokens(command, sub)),
        }
    return {
        "root": {"options": root_options, "stop": sorted(_stop_tokens(root, ctx))},
        "commands": commands,
    }


_HEADER = '''"""The command lines :mod:`gateway.cli.fast` parses without click: GENERATED, do not edit.

Written by ``python -m gateway.cli.fast_spec`` from the click commands (those
with a ``runner``) and the root group's options; ``tests/unit/test_cli_fast.py``
fails when this file differs from what the click definitions give. JSON in a
string: parsed once by the fast path, left alone by the formatter.
"""

__all__ = ["TABLE_JSON"]

TABLE_JSON = """\
'''


def render() -> str:
    """The source text of :mod:`gateway.cli._fast_commands` for today's commands."""
    from gateway.cli.main import COMMANDS, cli  # noqa: PLC0415 - main imports this module's users

    table = build_table(cli, COMMANDS)
    text = json.dumps(table, indent=1, sort_keys=True)
    if '"""' in text or "\\" in text:
        raise UnsupportedParameter("the table would not fit a plain string literal")
    return _HEADER + text + '\n"""\n'


if __name__ == "__main__":
    TABLE_PATH.write_text(render(), encoding="utf-8")
