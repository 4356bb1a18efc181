"""Large attachments are sealed and opened with memory that does not grow with them.

Each run happens in a fresh subprocess that reports its own peak resident set
(``ru_maxrss``, cross-checked with ``VmHWM`` from ``/proc/self/status``).

Linux carries the high-water mark of the memory a process had before ``exec``
into the new program's ``ru_maxrss``: a child started straight from a large
pytest process would report the parent's size. So the measured child is
started by a small launcher process, whose own small footprint is all it can
inherit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PEAK_RSS_LIMIT_KIB = 150 * 1024
MIB = 1024 * 1024

LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"

SCRIPT = r"""
import hashlib, json, resource, sys
from pathlib import Path
from tests.unit.test_envelope_support import JP, NOW, PK, POLICY, example
from gateway.node.bundles import open_to_dir, seal_to_file

work, size = Path(sys.argv[1]), int(sys.argv[2])
block = hashlib.shake_256(b"large attachment").digest(1 << 20)
source = work / "scan.bin"
digest_in = hashlib.sha256()
with source.open("wb") as handle:
    left = size
    while left:
        part = block[: min(len(block), left)]
        handle.write(part)
        digest_in.update(part)
        left -= len(part)
envelope = work / "bundle.env"
sealed = seal_to_file(
    envelope, case_type="broker-misconduct", case=example("broker-misconduct"),
    attachments=[source], keyring=JP.keyring, peer_manifest=PK.manifest,
    policy=POLICY, sequence=1, now=NOW,
)
source.unlink()
out = work / "out"
out.mkdir()
opened = open_to_dir(
    envelope, out, keyring=PK.keyring, peer_manifest=JP.manifest, policy=POLICY, now=NOW
)
written = opened.files[0]
digest_out = hashlib.sha256()
with written.path.open("rb") as handle:
    while chunk := handle.read(1 << 20):
        digest_out.update(chunk)
status = Path("/proc/self/status").read_text()
hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "vm_hwm_kib": hwm,
    "sha256_in": digest_in.hexdigest(),
    "sha256_out": digest_out.hexdigest(),
    "sha256_reported": written.sha256,
    "size_out": written.path.stat().st_size,
    "envelope_size": sealed.size,
    "envelope_on_disk": envelope.stat().st_size,
    "files_in_out": sorted(p.name for p in out.iterdir()),
}))
"""


def run_large(tmp_path: Path, size: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-c", SCRIPT, str(tmp_path), str(size)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def check_result(result: dict[str, Any], size: int) -> None:
    assert result["size_out"] == size
    assert result["sha256_out"] == result["sha256_in"] == result["sha256_reported"]
    assert result["envelope_on_disk"] == result["envelope_size"] > size
    assert result["files_in_out"] == ["scan.bin"]  # no temporary file left behind
    assert result["peak_rss_kib"] < PEAK_RSS_LIMIT_KIB
    assert result["vm_hwm_kib"] < PEAK_RSS_LIMIT_KIB


def test_64_mib_attachment_round_trips_in_bounded_memory(tmp_path: Path) -> None:
    size = 64 * MIB + 12345  # not a whole number of chunks
    check_result(run_large(tmp_path, size), size)


@pytest.mark.slow
def test_1_gib_attachment_round_trips_in_bounded_memory(tmp_path: Path) -> None:
    size = 1024 * MIB
    check_result(run_large(tmp_path, size), size)
