"""Command classes every ``gateway`` command is built from.

Each command takes ``--home`` and ``--json`` after its name as well as before
it; the root group maps the exception tree to the exit codes of SPEC §8 (0
done; 1 error; 2 usage; 3 refused by the consent ledger; 4 verification
failed) in one place.

A :class:`LazyGroup` names its commands in a table (name -> ``"module:attribute"``
and the command's summary) and imports a command's module only when that
command runs, so ``gateway --version``, ``gateway --help`` and the help of a
group cost the interpreter's start and click, not the whole node
(docs/performance.md, "Command start-up"). This module and
:mod:`gateway.cli.context` import nothing heavy at module level.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from gateway.cli.context import AppContext
from gateway.cli.outcome import failed

__all__ = ["GatewayCommand", "GatewayGroup", "LazyCommand", "LazyGroup", "LazySubgroup"]


def _set_home(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(AppContext).home_option = value


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(AppContext).as_json = True


def _common_options() -> list[click.Parameter]:
    return [
        click.Option(
            ["--home"],
            type=click.Path(file_okay=False, path_type=Path),
            expose_value=False,
            callback=_set_home,
            help="Node home directory (default: $GATEWAY_HOME).",
        ),
        click.Option(
            ["--json"],
            is_flag=True,
            expose_value=False,
            callback=_set_json,
            help="Print the result as JSON instead of text.",
        ),
    ]


class GatewayCommand(click.Command):
    """A command that also takes ``--home`` and ``--json`` after its name.

    ``runner`` (``"module:function"``), when given, names a function of a
    module that imports no click, taking the :class:`AppContext` and the
    command's parameters as keywords, that the command's callback calls and
    nothing more: :mod:`gateway.cli.fast` runs it without click for a command
    line it can parse exactly (docs/architecture.md, "The command line").
    """

    def __init__(self, *args: Any, runner: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.params.extend(_common_options())


class GatewayGroup(click.Group):
    """A group whose commands are :class:`GatewayCommand` and whose subgroups are alike."""

    command_class = GatewayCommand
    group_class = type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_common_options())

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:
            return super().invoke(ctx)
        app = ctx.ensure_object(AppContext)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - mapped to exit codes in one place
            ctx.exit(failed(app, exc))


def summary_of(text: str) -> str:
    """The first paragraph of a help text, as click shows it in a command list."""
    return inspect.cleandoc(text).split("\n\n", 1)[0]


@dataclass(frozen=True, slots=True)
class LazyCommand:
    """A command of a :class:`LazyGroup`'s table, imported only when it is run.

    ``target`` is ``"package.module:attribute"`` naming a :class:`click.Command`;
    ``summary`` is the first paragraph of its help (what ``--help`` lists),
    kept equal to the command's own by a test.
    """

    target: str
    summary: str

    def load(self, name: str) -> click.Command:
        """Import the module and return the command; TypeError if it is not one."""
        module_name, _, attribute = self.target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.target} (command {name!r}) is not a click command")
        return command


@dataclass(frozen=True, slots=True)
class LazySubgroup:
    """A command group listed from a table: its help and its commands' entries.

    ``gateway <group> --help`` is answered from ``help`` and ``commands`` alone;
    a command of the group is imported when it is run. ``target`` names the
    group itself (``"module:attribute"``): a command the table does not name is
    looked up there, so a command added to the module runs before the table
    lists it. ``help`` is the group's help text as click shows it (cleaned
    docstring), kept equal to the group's own by a test.
    """

    target: str
    help: str
    commands: Mapping[str, LazyCommand]

    @property
    def summary(self) -> str:
        return summary_of(self.help)

    def load(self, name: str) -> click.Command:
        return LazyGroup(name=name, help=self.help, table=self.commands, fallback=self.target)


class LazyGroup(GatewayGroup):
    """A :class:`GatewayGroup` whose commands come from ``table``, imported on use.

    ``list_commands`` and the help listing read the table only; ``get_command``
    imports the one module it needs. :meth:`load_all` imports every command
    (for a runner that forks children with the command line already imported).
    """

    def __init__(
        self,
        *args: Any,
        table: Mapping[str, LazyCommand | LazySubgroup] | None = None,
        fallback: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.table: dict[str, LazyCommand | LazySubgroup] = dict(table or {})
        self.fallback = fallback

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.table})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in self.table:
            command = self.table[cmd_name].load(cmd_name)
            self.add_command(command, cmd_name)
        elif command is None and self.fallback is not None:
            group = LazyCommand(self.fallback, "").load(self.name or "")
            if isinstance(group, click.Group):
                command = group.get_command(ctx, cmd_name)
            if command is not None:
                self.add_command(command, cmd_name)
        return command

    def load_all(self) -> None:
        """Import every command of the table, and of its subgroups, now."""
        ctx = click.Context(self)
        if self.fallback is not None:
            group = LazyCommand(self.fallback, "").load(self.name or "")
            if isinstance(group, click.Group):
                for name, found in group.commands.items():
                    self.commands.setdefault(name, found)
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if isinstance(command, LazyGroup):
                command.load_all()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands as click does, from the table for those not imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows: list[tuple[str, str]] = []
        for name in names:
            loaded = self.commands.get(name)
            if loaded is not None:
                if loaded.hidden:
                    continue
                rows.append((name, loaded.get_short_help_str(limit)))
            else:
                # A bare command with the summary as help shortens it as click does.
                summary = click.Command(name, help=self.table[name].summary)
                rows.append((name, summary.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
