"""Setting the two-person rule of a node's policy file in tests.

The shipped policy asks two officers for a consent grant (``[approvals.consent-grant]
k = 2``, the MOC deployment). A test about something else sets k = 1 with
:func:`set_approvals`, saying so; a test about approvals sets what it needs.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["set_approvals"]


def set_approvals(policy_dir: Path, action: str, k: int, *, hours: int = 72) -> None:
    """Make ``[approvals.<action>]`` of ``policy_dir/policy.toml`` ask ``k`` approvers
    (replacing the table when the file has it), everything else unchanged."""
    path = policy_dir / "policy.toml"
    text = path.read_text("utf-8")
    table = re.compile(
        rf"^\[approvals\.{re.escape(action)}\]\n(?:(?!\[)[^\n]*\n?)*", flags=re.MULTILINE
    )
    text = table.sub("", text)
    path.write_text(
        f"{text.rstrip()}\n\n[approvals.{action}]\nk = {k}\nlifetime_hours = {hours}\n", "utf-8"
    )
