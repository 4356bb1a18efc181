"""The command benchmark still runs: ``benchmarks/cli.py --quick`` end to end.

A smoke run only (two repetitions, one file, an 8 MiB attachment): it keeps the
script from rotting as the command line changes; its figures mean nothing here
and are not checked (timings are never asserted in tests).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(1200)  # about 20 gateway commands, each a whole node process today
@pytest.mark.skipif(shutil.which("gpg") is None, reason="the benchmark's baseline needs gpg")
def test_cli_benchmark_quick_run_prints_every_figure() -> None:
    gateway = Path(sys.executable).parent / "gateway"
    if not gateway.exists():
        pytest.skip(f"{gateway} is not installed")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cli.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=1100,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "gateway send (per file)" in out
    assert "gpg --sign --encrypt" in out
    assert "gateway inbox --json" in out
    assert "python -c pass" in out
    assert "gateway --version" in out
    assert out.count("ratio") == 3
    assert "gateway send --attach   peak RSS" in out
    assert "gateway show --out      peak RSS" in out
    assert "jp serve VmHWM" in out
    assert "pk serve VmHWM" in out
