"""The node context: the current keyring, the policy as the operator left it, one clock.

Real opened nodes (SQLite) with their real unlocked keyrings and policy files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core.keys import NodeKeyring
from gateway.errors import ConfigError
from gateway.node.consent.queries import list_consents
from gateway.node.context import NodeContext
from gateway.node.policy import POLICY_FILE
from tests.exchange_pair import Pair, open_pair

T0 = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def sqlite_pair(tmp_path: Path, clean_environ: dict[str, str]) -> Iterator[Pair]:
    urls = {node: f"sqlite:///{tmp_path / f'{node}.sqlite3'}" for node in ("jp", "pk")}
    with open_pair(tmp_path, urls, clean_environ) as opened:
        yield opened


def _policy_file(ctx: NodeContext) -> Path:
    return ctx.node.settings.policy_dir / POLICY_FILE


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    stat = path.stat()
    path.write_text(text.replace(old, new), encoding="utf-8")
    # A later mtime than before, whatever the file system's timestamp granularity.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_a_context_without_keys_says_where_keys_are_held(sqlite_pair: Pair) -> None:
    ctx = NodeContext(sqlite_pair.jp.node)
    assert ctx.keyring_or_none() is None
    with pytest.raises(ConfigError) as raised:
        _ = ctx.keyring
    assert raised.value.reason == "keys.locked"
    assert "gateway serve" in raised.value.message
    # Read-only queries work without keys.
    assert list_consents(ctx, now=T0)["consents"] == []


def test_swapped_keys_reach_every_copy_of_the_context(sqlite_pair: Pair) -> None:
    jp, pk = sqlite_pair.jp, sqlite_pair.pk
    ctx = NodeContext(jp.node, jp.keyring)
    pinned = ctx.at(T0)
    assert ctx.keyring is jp.keyring
    assert pinned.keyring is jp.keyring
    # Any other keyring object stands for "the keys the key watch unlocked anew".
    ctx.replace_keyring(pk.keyring)
    assert ctx.keyring is pk.keyring
    assert pinned.keyring is pk.keyring


def test_a_keyring_given_as_a_function_is_asked_on_each_read(sqlite_pair: Pair) -> None:
    jp = sqlite_pair.jp
    asked: list[int] = []

    def unlock() -> NodeKeyring:
        asked.append(1)
        return jp.keyring

    ctx = NodeContext(jp.node, unlock)
    assert asked == []
    assert ctx.keyring is jp.keyring
    assert ctx.keyring_or_none() is jp.keyring
    assert len(asked) == 2


def test_the_policy_is_read_again_only_when_the_operator_changed_it(sqlite_pair: Pair) -> None:
    ctx = NodeContext(sqlite_pair.jp.node, sqlite_pair.jp.keyring)
    first = ctx.policy
    assert first.limits.max_attachments == 64
    assert ctx.policy is first  # unchanged file: the policy read last
    path = _policy_file(ctx)
    _rewrite(path, "max_attachments = 64 ", "max_attachments = 7  ")
    edited = ctx.policy
    assert edited.limits.max_attachments == 7
    assert ctx.at(T0).policy is edited  # copies share what was read

    _rewrite(path, "max_attachments = 7  ", "max_attachments = oops")
    with pytest.raises(ConfigError) as raised:
        _ = ctx.policy
    assert raised.value.reason == "config.policy"
    assert str(path) in raised.value.message

    _rewrite(path, "max_attachments = oops", "max_attachments = 64  ")
    assert ctx.policy.limits.max_attachments == 64


def test_a_pinned_context_keeps_its_moment_and_the_plain_one_reads_the_clock(
    sqlite_pair: Pair,
) -> None:
    ctx = NodeContext(sqlite_pair.jp.node, sqlite_pair.jp.keyring)
    assert ctx.at(T0).now() == T0
    assert ctx.now().tzinfo is not None
    ticks = iter([T0, T0.replace(hour=10)])
    stepped = NodeContext(sqlite_pair.jp.node, clock=lambda: next(ticks))
    assert [stepped.now(), stepped.now()] == [T0, T0.replace(hour=10)]
