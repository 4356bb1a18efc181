"""A progress bar on the terminal for long transfers (never with --json, never off a TTY)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["MIN_BYTES_FOR_BAR", "transfer_progress"]

MIN_BYTES_FOR_BAR = 8 * 1024 * 1024
"""Transfers smaller than this show no bar: they end before one would help."""


@contextmanager
def transfer_progress(
    description: str,
    total: int | None,
    *,
    enabled: bool,
    unit: str = "B",
    minimum: int = MIN_BYTES_FOR_BAR,
) -> Iterator[Callable[[int], None] | None]:
    """Yield a callback taking counts done since the last call, drawing a bar on stderr, or ``None``.

    The bar is shown only when ``enabled`` (not --json), stderr is a terminal,
    and ``total`` is unknown or at least ``minimum``. ``unit`` is ``"B"`` for
    bytes (scaled by 1024) or a word for things counted (``"entries"``).
    """
    if not enabled or not sys.stderr.isatty() or (total is not None and total < minimum):
        yield None
        return
    from tqdm import tqdm  # noqa: PLC0415 - only a long transfer on a terminal needs it

    with tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=False,
    ) as bar:

        def advance(count: int) -> None:
            bar.update(count)

        yield advance
