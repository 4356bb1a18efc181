"""A plain install makes working nodes: the built wheel, a fresh virtual
environment, no source checkout anywhere on the path.

The wheel is built from a copy of the sources, installed (not editable) into
a new virtual environment without the system's site packages, and its
``gateway`` program creates two nodes in folders outside any checkout, serves
them on loopback and carries a bundle from Tokyo to Islamabad.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nodes import REPO, Program, ServeProcess, init_pair, stop, wait_ready
from tests.packaging import build_wheel, copy_build_inputs, wheel_files

# Building, installing the dependencies and two nodes take about a minute. The
# dependencies come from the package index over TLS, whose certificates a clock
# shifted years ahead finds expired: not part of the future-clock pass.
pytestmark = [pytest.mark.slow, pytest.mark.realclock]

EXAMPLE = REPO / "docs" / "examples" / "exam-fraud.json"
POLICY_FILES = {p.name: p.read_bytes() for p in (REPO / "policies").iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Program:
    """``gateway`` from the built wheel, installed into a fresh virtual environment."""
    work = tmp_path_factory.mktemp("plain-install")
    wheel = build_wheel(copy_build_inputs(work / "src"), work / "dist")
    assert wheel_files(wheel, "gateway/policies/") == POLICY_FILES
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"pip install of the wheel failed:\n{done.stderr}"
    outside = work / "elsewhere"
    outside.mkdir()
    return Program(argv=(str(venv / "bin" / "gateway"),), cwd=outside, source_on_path=False)


@pytest.fixture
def serving(
    installed: Program, tmp_path: Path
) -> Iterator[tuple[dict[str, Any], list[ServeProcess]]]:
    nodes = init_pair(tmp_path / "homes", program=installed)
    processes = [home.serve(GATEWAY_SERVER_SYNC_INTERVAL_SECONDS="0.3") for home in nodes.values()]
    try:
        for process in processes:
            wait_ready(process)
        yield nodes, processes
    finally:
        for process in processes:
            stop(process)


def test_the_installed_package_is_the_wheel_not_the_source_tree(installed: Program) -> None:
    python = Path(installed.argv[0]).with_name("python")
    probe = (
        "import gateway, json, sys; "
        "from gateway.node.policy import shipped_policy_dir; "
        "print(json.dumps([gateway.__file__, str(shipped_policy_dir()), sys.path]))"
    )
    done = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        cwd=installed.cwd,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
        check=True,
    )
    module, policies, path = json.loads(done.stdout)
    venv = python.parent.parent
    assert Path(module).is_relative_to(venv)
    assert Path(policies).is_relative_to(venv)
    assert not any(entry and Path(entry).resolve().is_relative_to(REPO) for entry in path)
    shipped = {p.name: p.read_bytes() for p in Path(policies).iterdir() if p.is_file()}
    assert shipped == POLICY_FILES


def test_nodes_made_by_a_plain_install_init_serve_and_deliver(
    serving: tuple[dict[str, Any], list[ServeProcess]],
) -> None:
    nodes, _processes = serving
    jp, pk = nodes["jp"], nodes["pk"]
    for home in (jp, pk):
        assert (home.home / "policies" / "policy.toml").read_bytes() == POLICY_FILES["policy.toml"]
    officers = {
        node_id: home.add_user(f"officer-{node_id}", "officer") for node_id, home in nodes.items()
    }
    sent = jp.run("send", "exam-fraud", str(EXAMPLE), token=officers["jp"])
    deadline = time.monotonic() + 120
    listed: list[str] = []
    while time.monotonic() < deadline:
        listed = [b["bundle_id"] for b in pk.run("inbox", token=officers["pk"])["bundles"]]
        if sent["bundle_id"] in listed:
            break
        time.sleep(0.5)
    assert sent["bundle_id"] in listed, "the bundle did not reach Islamabad"
    shown = pk.run("show", sent["bundle_id"], token=officers["pk"])
    case = {key: value for key, value in shown["case"].items() if value is not None}
    assert case == json.loads(EXAMPLE.read_text(encoding="utf-8"))
    [delivered] = jp.run("outbox", "--state", "delivered", token=officers["jp"])["bundles"]
    assert delivered["bundle_id"] == sent["bundle_id"]
    compliance = pk.add_user("auditor-pk", "compliance")
    report = pk.run("ledger", "verify", token=compliance)
    assert report["entries"] > 0
