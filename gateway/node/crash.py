"""Crash points: hard process death at a named step, for recovery tests.

A test sets ``GATEWAY_CRASH_AT=<name>`` for a ``gateway`` process; when that
process reaches ``crash_point("<name>")`` it kills itself with SIGKILL: no
``finally`` blocks, no atexit handlers, no flushing, exactly like a power cut
or an out-of-memory kill. Without the variable (every real deployment) a crash
point costs one dictionary look-up.

Names in use: ``after-outbox-insert``, ``after-send``, ``before-receipt-store``,
``after-batch-verify``, ``after-batch-adopt``, ``after-inbox-commit`` (the exchange code decides where they sit; the host of
pull mode passes ``after-send`` and ``before-receipt-store`` when a puller's
receipts arrive); ``after-pull-answer``, ``after-pull-store`` (the puller);
``ledger-group-gathered``, ``ledger-group-before-commit``,
``ledger-group-after-commit``, ``ledger-group-after-ack`` (the ledger's group
commit); ``ledger-append-after-head``, ``ledger-append-after-write`` (every
ledger append, inside its transaction);
``after-purge-commit``, ``before-output-record`` (retention).
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "GATEWAY_CRASH_AT"


def crash_point(name: str) -> None:
    """Die at once with SIGKILL when ``GATEWAY_CRASH_AT`` equals ``name``."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
