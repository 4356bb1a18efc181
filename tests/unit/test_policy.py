"""Policy: the shipped file is valid, bad files are refused naming file and key,
and a new node home gets its own copy."""

from __future__ import annotations

import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gateway.core.policy import Limits, Policy
from gateway.errors import ConfigError, PolicyRefused
from gateway.node.policy import (
    POLICY_FILE,
    install_policies,
    load_policy_file,
    shipped_policy_dir,
)

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / POLICY_FILE


def shipped_data() -> dict[str, Any]:
    return tomllib.loads(SHIPPED.read_text("utf-8"))


def test_shipped_policy_is_valid_and_names_every_internal_recipient() -> None:
    policy = load_policy_file(SHIPPED)
    assert policy.default_marking == "confidential"
    assert [r.name for r in policy.internal_recipients("jp")] == ["moj-isa", "mofa", "mhlw", "npa"]
    assert [r.name for r in policy.internal_recipients("pk")] == ["mophrd", "beoe"]


def test_the_package_ships_the_repository_policies_unchanged() -> None:
    """``gateway/policies`` (package data) is the repository's ``policies/``, file for file;
    the built wheel's copy is compared in tests/e2e/test_wheel_install.py."""
    shipped = shipped_policy_dir()
    assert shipped.parent.name == "gateway"
    assert shipped.resolve() == SHIPPED.parent
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == {
        p.name: p.read_bytes() for p in SHIPPED.parent.iterdir()
    }


def test_a_package_without_its_policy_files_names_the_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway  # noqa: PLC0415

    (tmp_path / "gateway").mkdir()
    monkeypatch.setattr(gateway, "__file__", str(tmp_path / "gateway" / "__init__.py"))
    with pytest.raises(ConfigError) as caught:
        shipped_policy_dir()
    message = str(caught.value)
    assert str(tmp_path / "gateway" / "policies") in message
    assert "--policy-dir" in message
    assert "GATEWAY_POLICY_DIR" in message


@pytest.mark.parametrize(
    ("node", "recipient", "internal"),
    [
        ("jp", "npa", True),
        ("jp", "moj-isa", True),
        ("pk", "beoe", True),
        ("pk", "npa", False),
        ("jp", "beoe", False),
        ("jp", "aichi-prefectural-police", False),
        ("xx", "npa", False),
        ("jp", "NPA", False),
    ],
)
def test_internal_recipient_rule(node: str, recipient: str, internal: bool) -> None:
    assert load_policy_file(SHIPPED).is_internal(node, recipient) is internal


def _edit(data: dict[str, Any], path: list[str], value: Any) -> None:
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    if value is _DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DROP = object()

BAD_POLICIES = [
    (["version"], _DROP, "version: required key is missing"),
    (["version"], "has space", "version:"),
    (["default_marking"], "secret", "default_marking:"),
    (["limits", "max_attachments"], -1, "limits.max_attachments:"),
    (["limits", "max_attachments"], "64", "limits.max_attachments:"),
    (["limits", "clock_skew_seconds"], 99999, "limits.clock_skew_seconds:"),
    (["limits", "max_attachment_bytes"], 8 * 1024**3, "limits: max_attachment_bytes exceeds"),
    (["limits", "surprise"], 1, "limits.surprise: unknown key"),
    (["recipients", "pk"], [], "recipients.pk: at least one"),
    (["recipients", "jp", 0, "name"], "MOJ ISA", "recipients.jp.0.name:"),
    (["recipients", "cn"], [{"name": "x", "display_name": "X"}], "recipients.cn"),
    (["consent", "max_validity_days"], 0, "consent.max_validity_days:"),
    (["retention", "ledger_days"], 10, "retention.ledger_days:"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_POLICIES)
def test_bad_policy_refused_naming_file_and_key(
    tmp_path: Path, path: list[str], value: Any, expected: str
) -> None:
    data = shipped_data()
    _edit(data, path, value)  # type: ignore[arg-type]
    target = tmp_path / POLICY_FILE
    target.write_text(tomli_w.dumps(data), "utf-8")
    with pytest.raises(ConfigError) as caught:
        load_policy_file(target)
    assert str(target) in caught.value.message
    assert expected in caught.value.message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"version = ", "not valid TOML"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * (300 * 1024), "larger than"),
    ],
)
def test_unreadable_policy_refused(tmp_path: Path, content: bytes, expected: str) -> None:
    target = tmp_path / POLICY_FILE
    target.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_policy_file(target)


def test_missing_policy_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy file missing"):
        load_policy_file(tmp_path / POLICY_FILE)


def test_limits_refuse_too_many_or_too_large_attachments() -> None:
    limits = Limits(max_attachments=2, max_attachment_bytes=10 * 1024, max_envelope_bytes=1 << 20)
    limits.check_attachments([1, 10 * 1024])
    with pytest.raises(PolicyRefused, match="3 attachments exceed"):
        limits.check_attachments([1, 1, 1])
    with pytest.raises(PolicyRefused, match="attachment 1 of 10241 bytes"):
        limits.check_attachments([1, 10 * 1024 + 1])


def test_install_copies_once_and_keeps_an_existing_policy(tmp_path: Path) -> None:
    target = tmp_path / "home" / "policies"
    written = install_policies(target)
    assert {p.name for p in written} == {"policy.toml", "README.md"}
    assert (target / POLICY_FILE).read_bytes() == SHIPPED.read_bytes()
    edited = shipped_data()
    edited["version"] = "local.7"
    (target / POLICY_FILE).write_text(tomli_w.dumps(edited), "utf-8")
    assert install_policies(target) == []
    assert load_policy_file(target / POLICY_FILE).version == "local.7"


def test_install_refuses_a_broken_source_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / POLICY_FILE).write_text('version = "1"\n', "utf-8")
    target = tmp_path / "home" / "policies"
    with pytest.raises(ConfigError, match="recipients"):
        install_policies(target, source=source)
    assert not target.exists()


def test_new_node_home_gets_its_own_policy(tmp_path: Path) -> None:
    import gateway.node.policy  # noqa: F401, PLC0415 - registers the init step
    from gateway.node.setup import init_node  # noqa: PLC0415

    home = tmp_path / "jp"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environ["GATEWAY_PASSPHRASE"] = "test passphrase, not a secret"
    environ["GATEWAY_KEYSTORE_STRENGTH"] = "min"
    result = init_node(home, "jp", now=datetime(2026, 11, 25, tzinfo=UTC), environ=environ)
    assert (home / "policies" / POLICY_FILE).read_bytes() == SHIPPED.read_bytes()
    assert result.facts["policy_version"] == load_policy_file(SHIPPED).version


def test_policy_model_is_immutable() -> None:
    policy = Policy.from_data(shipped_data())
    with pytest.raises(ValueError, match="frozen"):
        policy.version = "2"  # type: ignore[misc]


def test_the_shipped_policy_asks_two_officers_for_a_consent_grant_and_one_elsewhere() -> None:
    from gateway.core.policy import Policy  # noqa: PLC0415
    from gateway.node.policy import load_policy_file, shipped_policy_dir  # noqa: PLC0415

    shipped = load_policy_file(shipped_policy_dir() / "policy.toml")
    # the MOC deployment: written consent signed off by a second person (MOC item 3)
    assert shipped.approval_rule("consent-grant").k == 2
    assert shipped.approval_rule("keys-rotate").k == 1
    text = (shipped_policy_dir() / "policy.toml").read_text()
    assert "\n[approvals.consent-grant]\nk = 2\n" in text
    base = shipped.model_dump()
    assert Policy.from_data({**base, "approvals": {}}).approval_rule("consent-grant").k == 1
    two = Policy.from_data({**base, "approvals": {"consent-grant": {"k": 2, "lifetime_hours": 24}}})
    assert two.approval_rule("consent-grant").k == 2
    assert two.approval_rule("consent-grant").lifetime.total_seconds() == 24 * 3600
    # revoking defaults to one officer (it must stay fast) and may be raised
    assert shipped.approval_rule("consent-revoke").k == 1
    slower = Policy.from_data({**base, "approvals": {"consent-revoke": {"k": 2}}})
    assert slower.approval_rule("consent-revoke").k == 2
    with pytest.raises(ValueError, match="approvals"):
        Policy.from_data({**base, "approvals": {"consent-burn": {"k": 2}}})
    with pytest.raises(ValueError, match="less than or equal to 9"):
        Policy.from_data({**base, "approvals": {"keys-rotate": {"k": 10}}})
