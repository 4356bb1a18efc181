"""Building the package as a deployment does: a wheel from a copy of the sources.

The copy holds what a build needs (``pyproject.toml``, ``README.md``,
``gateway/`` and the top-level ``policies/`` that ``gateway/policies`` links
to), so a build never writes ``build/`` or ``*.egg-info`` into the checkout
that other tests run from.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.nodes import REPO

__all__ = ["BUILD_INPUTS", "build_wheel", "copy_build_inputs", "wheel_files"]

BUILD_INPUTS = ("pyproject.toml", "README.md", "gateway", "policies")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def copy_build_inputs(dest: Path, *, names: tuple[str, ...] = BUILD_INPUTS) -> Path:
    """Copy the build inputs into ``dest`` (links kept as links, like ``docker build``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, symlinks=True, ignore=_IGNORED)
        else:
            shutil.copy2(source, dest / name)
    return dest


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel SOURCE --no-deps``; the path of the one wheel it made."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=source,
        check=False,
    )
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    [wheel] = out.glob("ssw_gateway-*.whl")
    return wheel


def wheel_files(wheel: Path, folder: str) -> dict[str, bytes]:
    """The files of the wheel under ``folder`` (e.g. ``gateway/policies/``), by name."""
    with zipfile.ZipFile(wheel) as archive:
        return {
            name.removeprefix(folder): archive.read(name)
            for name in archive.namelist()
            if name.startswith(folder) and not name.endswith("/")
        }
