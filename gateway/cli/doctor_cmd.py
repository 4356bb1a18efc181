"""``gateway doctor``: check a node home offline (a host operation: no token, no passphrase)."""

from __future__ import annotations

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.node.doctor import DoctorReport, examine_home
from gateway.node.runtime import utc_now

__all__ = ["doctor"]

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def doctor_text(report: DoctorReport) -> str:
    """One line per check, then the verdict."""
    width = max((len(check.name) for check in report.checks), default=8)
    lines = [f"doctor {report.home}"]
    lines += [
        f"  {_MARK[check.status]} {check.name:<{width}}  {check.detail}" for check in report.checks
    ]
    failed = [check.name for check in report.checks if check.status == "fail"]
    warned = sum(1 for check in report.checks if check.status == "warn")
    if failed:
        lines.append(f"FAILED: {', '.join(failed)}")
    else:
        lines.append("home ok" + (f" ({warned} warning(s))" if warned else ""))
    return "\n".join(lines)


@click.command(cls=GatewayCommand)
@pass_app
def doctor(app: AppContext) -> None:
    """Check this node's home offline: settings, file modes, TLS certificates,
    database, keys and policy. Exit 0 when nothing failed (warnings included), 1 otherwise.

    Nothing is sent to the peer ('gateway peer ping' tests the link) and no key
    is unlocked.

    Host operation: run it on the node host with its home; it does not read the
    keystore passphrase.
    """
    report = examine_home(app.home(), app.environ, now=utc_now())
    app.emit(report.to_dict(), lambda: doctor_text(report))
    if not report.ok:
        failed = ", ".join(c.name for c in report.checks if c.status == "fail")
        click.echo(f"error: doctor found problems: {failed}", err=True)
        raise click.exceptions.Exit(1)
