"""The progress helper on a real terminal (a pseudo-terminal): counts of entries and bytes."""

from __future__ import annotations

import os
import sys
import termios
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.client.progress import transfer_progress


@contextmanager
def _terminal() -> Iterator[int]:
    """stderr on the follower side of a pseudo-terminal 100 columns wide; yield the leader.

    Entered in the test body: pytest sets its own capturing stderr after fixtures run.
    """
    leader, follower = os.openpty()
    termios.tcsetwinsize(follower, (30, 100))
    stream = os.fdopen(follower, "w", buffering=1, encoding="utf-8")
    captured = sys.stderr
    sys.stderr = stream
    try:
        yield leader
    finally:
        sys.stderr = captured
        stream.close()
        os.close(leader)


def _drawn(leader: int) -> str:
    os.set_blocking(leader, False)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_bar_counts_entries_on_a_terminal() -> None:
    with (
        _terminal() as terminal,
        transfer_progress(
            "verify", 1_000_000, enabled=True, unit="entries", minimum=100_000
        ) as advance,
    ):
        assert advance is not None
        advance(400_000)
        advance(600_000)
        drawn = _drawn(terminal)
    assert "verify" in drawn
    assert "/1000000" in drawn
    assert "entries/s" in drawn or "entries]" in drawn


def test_no_bar_below_the_minimum_nor_when_turned_off() -> None:
    with _terminal() as terminal:
        with transfer_progress(
            "verify", 99_999, enabled=True, unit="entries", minimum=100_000
        ) as a:
            assert a is None
        with transfer_progress("verify", 10**6, enabled=False, unit="entries", minimum=0) as b:
            assert b is None
        with transfer_progress("receive", 1024, enabled=True) as c:
            assert c is None  # bytes: under the default minimum of 8 MiB
        assert _drawn(terminal) == ""


def test_no_bar_off_a_terminal() -> None:
    # Under pytest, stderr is captured: not a terminal.
    with transfer_progress("verify", 10**6, enabled=True, unit="entries", minimum=0) as advance:
        assert advance is None
