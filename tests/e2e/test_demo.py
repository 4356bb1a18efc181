"""``gateway demo`` end to end: two real nodes, the whole story, judged step by step.

The demo runs as a real process (``gateway demo --json``), which itself runs
two ``gateway serve`` processes and every command of the story as its own
process. The assertions read the machine-readable outcome of each step, never
the wording.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.demo.harness import GATEWAY

REPO = Path(__file__).resolve().parents[2]

STORY = [
    "init",
    "pin-refused",
    "keys-exchange",
    "start",
    "users",
    "send",
    "receive",
    "disclose-blocked",
    "consent-request",
    "consent-grant",
    "disclose-allowed",
    "consent-revoke",
    "disclose-revoked",
    "ledgers",
    "key-rotation",
    "stop",
]


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_demo(*args: str, timeout: float = 240) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [*GATEWAY, "demo", "--json", *args],
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"gateway demo --json printed no JSON (exit {done.returncode}):\n{done.stderr}")
    return done.returncode, data, done.stderr


def answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


# The acceptance test of `make demo`: it stays in the default run although it
# takes tens of seconds; its variants below are marked slow.
def test_demo_runs_every_step_of_the_story_and_keeps_the_homes(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    code, data, stderr = run_demo("--dir", str(root), "--keep")
    steps = {step["name"]: step for step in data["steps"]}
    assert [step["name"] for step in data["steps"]] == STORY
    failed = {name: step["detail"] for name, step in steps.items() if not step["ok"]}
    assert failed == {}, stderr
    assert all(step["available"] for step in data["steps"])
    assert data["ok"] is True
    assert data["interrupted"] is False
    assert data["passed"] == data["total"] == len(STORY)
    assert code == 0
    # What the story left behind: two homes, both ledgers exported, the
    # disclosed files only from the disclosure made under consent.
    for node in ("jp", "pk"):
        home = Path(data["homes"][node])
        assert (home / "gateway.toml").is_file()
        assert Path(data["files"][f"ledger-{node}-jsonl"]).stat().st_size > 0
        assert Path(data["files"][f"ledger-{node}-csv"]).stat().st_size > 0
        for secret in Path(data["secret_files"][f"{node}/passphrase"]).parent.iterdir():
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    kinds = {
        node: [
            json.loads(line)["kind"]
            for line in Path(data["files"][f"ledger-{node}-jsonl"]).read_text("utf-8").splitlines()
        ]
        for node in ("jp", "pk")
    }
    # Tokyo recorded both blocked attempts and the one disclosure made under
    # consent; Islamabad recorded granting and revoking it.
    assert kinds["jp"].count("disclosure-blocked") == 2
    assert kinds["jp"].count("disclosure-made") == 1
    assert kinds["jp"].index("consent-granted") < kinds["jp"].index("disclosure-made")
    assert kinds["jp"].index("disclosure-made") < kinds["jp"].index("consent-revoked")
    assert {"consent-granted", "consent-revoked"} <= set(kinds["pk"])
    assert any(p.is_file() for p in Path(data["files"]["disclosed"]).rglob("*"))
    assert not any((root / "disclosed-without-consent").rglob("*"))
    assert not any((root / "disclosed-after-revocation").rglob("*"))


@pytest.mark.slow
def test_demo_without_keep_removes_what_it_made(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    code, data, stderr = run_demo("--dir", str(root))
    assert code == 0, stderr
    assert data["ok"] is True
    assert not root.exists()


@pytest.mark.parametrize("at_step", ["start", "consent-request"])
def test_interrupting_the_demo_stops_both_nodes(tmp_path: Path, at_step: str) -> None:
    """SIGINT right after the nodes started, or in the middle of the story."""
    root = tmp_path / "demo"
    process = subprocess.Popen(
        [*GATEWAY, "demo", "--json", "--dir", str(root), "--keep"],
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stderr is not None
    trigger = f"[{STORY.index(at_step) + 1:>2}/{len(STORY)}]"
    started: list[str] = []
    deadline = time.monotonic() + 180
    for line in process.stderr:
        if line.lstrip().startswith("ok") and "healthy at" in line:
            started = [word.rstrip(",") for word in line.split() if word.startswith("http://")]
            assert len(started) == 2
            assert all(answers_health(url) for url in started)
            if at_step == "start":
                break
        if line.startswith(trigger) and at_step != "start":
            break
        assert time.monotonic() < deadline, "the story did not get that far"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    outcome = json.loads(out)
    done = [step["name"] for step in outcome["steps"]]
    assert outcome["interrupted"] is True, f"steps run: {done}\n{err}"
    assert process.returncode == 130
    assert len(done) < len(STORY)
    assert started
    assert not any(answers_health(url) for url in started)


@pytest.mark.parametrize("content", ["file", "folder"])
def test_demo_refuses_a_folder_that_is_not_empty(tmp_path: Path, content: str) -> None:
    root = tmp_path / "busy"
    root.mkdir()
    if content == "file":
        (root / "notes.txt").write_text("keep me", encoding="utf-8")
    else:
        (root / "jp").mkdir()
    before = sorted(p.name for p in root.iterdir())
    result = CliRunner().invoke(cli, ["demo", "--dir", str(root)], env={"GATEWAY_HOME": ""})
    assert result.exit_code == 1
    assert "not empty" in result.stderr
    assert sorted(p.name for p in root.iterdir()) == before
