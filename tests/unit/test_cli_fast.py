"""The fast path of ``gateway`` parses exactly what click parses, or leaves it to click.

The table it parses from is generated from the click definitions and must be
the committed one; a table of command lines, valid and invalid, runs through
the fast entry point and through the click command line in fresh
interpreters, and both must give the same exit code, stdout and stderr; the
fast path must take the valid lines (else it would prove nothing) and leave
the others to click; and a command it runs imports no click.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from gateway.cli import fast, fast_spec
from gateway.cli.main import COMMANDS, cli

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ssw_0123456789abcdef_" + "Q" * 43
FAST_ENTRY = "from gateway.cli.fast import main; main()"
CLICK_ENTRY = "from gateway.cli.main import main; main()"


def test_committed_table_is_the_one_the_click_definitions_give() -> None:
    """Regenerate with ``python -m gateway.cli.fast_spec`` when this fails."""
    assert fast_spec.TABLE_PATH.read_text(encoding="utf-8") == fast_spec.render()


def test_hot_commands_have_runners() -> None:
    assert {"send", "inbox", "show"} <= set(fast.table()["commands"])


def test_unsupported_parameter_refused_by_the_generator() -> None:
    """A command growing a parameter the fast parser cannot reproduce fails generation."""
    from gateway.cli.base import GatewayCommand, LazyCommand  # noqa: PLC0415

    odd = GatewayCommand(
        "odd",
        runner="gateway.cli.exchange_client:inbox",
        params=[click.Option(["--count"], type=int)],
    )
    module = type(sys)("odd_module_for_test")
    module.odd = odd  # type: ignore[attr-defined]
    sys.modules["odd_module_for_test"] = module
    try:
        with pytest.raises(fast_spec.UnsupportedParameter, match="count"):
            fast_spec.build_table(cli, {"odd": LazyCommand("odd_module_for_test:odd", "")})
    finally:
        del sys.modules["odd_module_for_test"]


@pytest.fixture
def place(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home-without-node"
    home.mkdir()
    case = tmp_path / "case.json"
    case.write_text('{"summary": "x"}', encoding="utf-8")
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "b.bin").write_bytes(b"b")
    token = tmp_path / "token"
    token.write_text(TOKEN, encoding="ascii")
    token.chmod(0o600)
    loose = tmp_path / "loose-token"
    loose.write_text(TOKEN, encoding="ascii")
    loose.chmod(0o644)
    return {
        "HOME": str(home),
        "CASE": str(case),
        "A": str(tmp_path / "a.bin"),
        "B": str(tmp_path / "b.bin"),
        "DIR": str(tmp_path),
        "TOKEN": str(token),
        "LOOSE": str(loose),
        "MISSING": str(tmp_path / "missing.bin"),
    }


CASES: list[tuple[list[str], bool]] = [
    # (argv with {PLACEHOLDERS}, taken by the fast path)
    (["send", "exam-fraud", "{CASE}"], True),
    (["--json", "send", "exam-fraud", "{CASE}"], True),
    (["send", "exam-fraud", "{CASE}", "--json", "--public", "--reply-to", "B1"], True),
    (["send", "--reply-to=B1", "exam-fraud", "{CASE}"], True),
    (["send", "--reply-to=", "exam-fraud", "{CASE}"], True),
    (["send", "exam-fraud", "{CASE}", "--attach", "{A}", "--attach={B}"], True),
    (["send", "exam-fraud", "-"], True),
    (["send", "exam-fraud", "{MISSING}"], True),
    (["--home", "{HOME}", "send", "exam-fraud", "{CASE}", "--home", "{DIR}"], True),
    (["--token-file", "{TOKEN}", "-v", "inbox"], True),
    (["--token-file", "{LOOSE}", "inbox"], True),
    (["--api-url", "ftp://x", "inbox"], True),
    (["inbox", "--gaps", "--type", "exam-fraud", "--suspect", "--json"], True),
    (["outbox", "--state", "queued"], True),
    (["show", "B1", "--accept-suspect", "--json"], True),
    (["show", "B1", "--out", "{DIR}/new-folder"], True),
    # usage errors, help and everything else stays click's
    (["send", "exam-fraud"], False),
    (["send", "exam-fraud", "a", "b"], False),
    (["send", "--nope", "exam-fraud", "{CASE}"], False),
    (["send", "exam-fraud", "{CASE}", "--attach", "{MISSING}"], False),
    (["send", "exam-fraud", "{CASE}", "--attach", "{DIR}"], False),
    (["send", "--public=yes", "exam-fraud", "{CASE}"], False),
    (["send", "exam-fraud", "{CASE}", "--reply-to"], False),
    (["send", "exam-fraud", "{CASE}", "--debug"], False),
    (["send", "--help"], False),
    (["send", "-h"], False),
    (["--version"], False),
    (["-h"], False),
    ([], False),
    (["--json"], False),
    (["nosuch"], False),
    (["-x", "inbox"], False),
    (["-vv", "inbox"], False),
    (["inbox", "--", "x"], False),
    (["inbox", "extra"], False),
    (["outbox", "--state", "bogus"], False),
    (["show", "B1", "--out", "{CASE}"], False),
    (["--token-file", "{DIR}", "inbox"], False),
    (["--home", "{CASE}", "inbox"], False),
    (["consent", "list"], False),
]


def _fill(argv: list[str], place: dict[str, str]) -> list[str]:
    return [word.format(**place) for word in argv]


def _run(entry: str, argv: list[str], place: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_HOME=place["HOME"], GATEWAY_TOKEN=TOKEN, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", entry, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=place["DIR"],
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize(("argv", "taken"), CASES, ids=[" ".join(a) or "<none>" for a, _ in CASES])
def test_same_outcome_through_both_paths(
    argv: list[str], taken: bool, place: dict[str, str]
) -> None:
    line = _fill(argv, place)
    assert (fast.parse(line) is not None) == taken
    quick, slow = _run(FAST_ENTRY, line, place), _run(CLICK_ENTRY, line, place)
    assert (quick.returncode, quick.stdout, quick.stderr) == (
        slow.returncode,
        slow.stdout,
        slow.stderr,
    )


def test_parse_gives_the_runner_its_keywords(place: dict[str, str]) -> None:
    line = _fill(
        ["--debug", "--home", "{HOME}", "send", "t", "{CASE}", "--attach", "{A}", "--public"],
        place,
    )
    parsed = fast.parse(line)
    assert parsed is not None
    assert parsed.runner == "gateway.cli.exchange_client:send"
    assert parsed.kwargs == {
        "case_type": "t",
        "case_json": place["CASE"],
        "attachments": (Path(place["A"]),),
        "public": True,
        "reply_to": None,
    }
    assert parsed.app == {"debug": True, "home_option": Path(place["HOME"])}


_NO_CLICK = """
import sys
from gateway.cli import fast
codes = [fast.run(argv) for argv in ([\"send\", \"exam-fraud\", \"-\"], [\"inbox\", \"--json\"], [\"show\", \"B\"])]
avoided = ("click", "http.client", "ssl", "email", "orjson")
loaded = sorted(m for m in sys.modules if any(m == a or m.startswith(a + ".") for a in avoided))
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_a_fast_command_imports_no_click_nor_http_client(place: dict[str, str]) -> None:
    """click, ``http.client`` (with ``ssl`` and the e-mail parser) and ``orjson`` are
    most of what a client command would import; the fast path over the socket loads
    none of them."""
    done = _run("import json\n" + _NO_CLICK, [], place)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [1, 1, 1], "loaded": []}


def test_every_runner_is_named_by_the_command_table() -> None:
    for name in fast.table()["commands"]:
        assert name in COMMANDS
