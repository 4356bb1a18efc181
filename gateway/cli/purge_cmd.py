"""``gateway purge [--dry-run]``: the retention periods of the policy, enforced now.

A host operation (SPEC §8): it runs beside the node with the home and the
keystore passphrase, like ``sync``. Thin: unlocks the keys (the proof of
host authority, and what applying waiting consent bundles needs), applies
them so none is held back, calls :func:`gateway.node.retention.purge`, and
prints. ``serve`` runs the same purge on a timer.
"""

from __future__ import annotations

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.node.consent import receive as consent_receive
from gateway.node.policy import load_policy
from gateway.node.retention import PurgeReport, purge
from gateway.node.runtime import utc_now

__all__ = ["purge_command", "report_text"]


def _day(value: object) -> str:
    return value.strftime("%Y-%m-%d") if hasattr(value, "strftime") else "-"


def report_text(report: PurgeReport) -> str:
    """The human form of a purge report: one line per bundle and file, then a summary."""
    verb = "would purge" if report.dry_run else "purged"
    lines = []
    for decision in report.purged:
        held = decision.bundle
        lines.append(
            f"{verb:<11} {held.direction.value:<8} {held.bundle_id}  {held.case_type:<22} "
            f"kept since {_day(held.kept_since)} ({decision.explain()})"
        )
    for decision in report.held:
        held = decision.bundle
        lines.append(
            f"{'kept':<11} {held.direction.value:<8} {held.bundle_id}  {held.case_type:<22} "
            f"{decision.explain()}"
        )
    for bundle_id in report.completed:
        lines.append(f"{'finished':<11} {bundle_id}: envelope file of an interrupted purge")
    for output in report.outputs:
        what = "would delete" if report.dry_run else output.outcome
        lines.append(f"{what:<11} {output.path} (written {_day(output.written_at)})")
    lines.append(report.summary())
    return "\n".join(lines)


@click.command(name="purge", cls=GatewayCommand)
@click.option("--dry-run", is_flag=True, help="List what is due; change nothing.")
@pass_app
def purge_command(app: AppContext, dry_run: bool) -> None:
    """Destroy envelope bodies and decrypted outputs older than the policy's retention.

    \b
    Each purged bundle keeps its inbox or outbox row and gets a bundle-purged
    ledger entry; sent bundles the peer has not receipted are never purged.
    See docs/operations.md, "Retention".

    Host operation: needs the keystore passphrase.
    """
    node = app.node()
    ctx = app.node_context()
    policy = load_policy(app.settings())
    now = utc_now()
    if not dry_run:
        consent_receive.apply_pending(ctx, now=now)
    report = purge(node, policy.retention, now=now, dry_run=dry_run, progress=app.progress)
    app.emit(report.to_dict(), lambda: report_text(report))
