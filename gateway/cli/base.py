"""Command classes every ``gateway`` command is built from.

Each command takes ``--home`` and ``--json`` after its name as well as before
it; the root group maps the exception tree to the exit codes of SPEC §8 (0
done; 1 error; 2 usage; 3 refused by the consent ledger; 4 verification
failed) in one place.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from gateway import log
from gateway.cli.context import AppContext
from gateway.errors import EXIT_ERROR, GatewayError

__all__ = ["GatewayCommand", "GatewayGroup"]


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
    """A command that also takes ``--home`` and ``--json`` after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        except GatewayError as exc:
            _report(app, exc, exc.exit_code, exc.reason, exc.diagnostics())
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            if log.is_service() and log.is_json():
                log.get_logger("cli").warning("interrupted", exit_code=130)
            else:
                click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a trace
            log.get_logger("cli").error("internal_error", error_type=type(exc).__name__)
            _report(
                app,
                exc,
                EXIT_ERROR,
                "internal",
                f"internal error ({type(exc).__name__}); run with --debug for the traceback",
            )
            ctx.exit(EXIT_ERROR)


def _report(app: AppContext, exc: BaseException, code: int, reason: str, message: str) -> None:
    if app.debug:
        traceback.print_exception(exc, file=sys.stderr)
    if app.as_json:
        click.echo(json.dumps({"error": {"reason": reason, "message": message, "exit_code": code}}))
    if log.is_service() and log.is_json():
        # A service's stderr is its log: the failure is one more JSON line of it.
        log.get_logger("cli").error("failed", reason=reason, message=message, exit_code=code)
        return
    click.echo(f"error: {message}", err=True)
