"""The one object a node's operations run in: node, keyring, policy and clock.

A :class:`NodeContext` is built once by a host (the composition root of
``gateway serve``, a host operation of the CLI, a test) and handed to every
part that acts for the node: the local API, the peer server, the console, the
workers and the puller. It replaces passing ``node, keyring`` (plus a policy
read and a clock) separately.

Semantics kept from the parts it replaces:

- **Keyring.** :attr:`NodeContext.keyring` reads the *current* keyring from a
  holder shared by every copy of the context (:meth:`NodeContext.at`). The
  serving node swaps it with :meth:`NodeContext.replace_keyring` after its key
  watch saw a newer own manifest, so a part that reads ``ctx.keyring`` per
  operation uses the new keys. The holder may also be given a function that
  unlocks on first use (tests, a lazily unlocked host). A host without keys
  (read-only queries, a probe of a node that has not unlocked) builds the
  context with ``keyring=None``: :attr:`NodeContext.keyring` then raises
  :class:`~gateway.errors.ConfigError` ``keys.locked`` naming the next step,
  and :meth:`NodeContext.keyring_or_none` answers ``None`` for the parts that
  work without keys.
- **Policy.** :attr:`NodeContext.policy` re-reads ``<policy dir>/policy.toml``
  when its modification time or size changed (an operator's edit takes effect
  at the next operation, without a restart) and otherwise returns the policy
  read last. A file made invalid is a ``ConfigError`` at that next operation,
  as a fresh read was before.
- **Clock.** :meth:`NodeContext.now` is the clock (``utc_now`` unless given);
  :meth:`NodeContext.at` gives a copy pinned to one moment, sharing keyring
  holder and policy cache, for tests and for a pass that must use one time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from gateway.core.keys import NodeKeyring
from gateway.core.policy import Policy
from gateway.errors import ConfigError
from gateway.node.policy import POLICY_FILE, load_policy_file
from gateway.node.runtime import Node, utc_now

__all__ = ["KeyringHolder", "NodeContext", "PolicyCache"]

KeyringLike = NodeKeyring | Callable[[], NodeKeyring] | None


class KeyringHolder:
    """The node's current keyring, swapped whole when the node's keys change.

    ``source`` is the unlocked keyring, a function giving it (called on every
    read, so it may unlock on first use or follow a holder of its own), or
    ``None`` for a host that holds no keys.
    """

    def __init__(self, source: KeyringLike) -> None:
        self._source = source

    def replace(self, source: KeyringLike) -> None:
        """Put new keys in place; every later read sees them (one reference swap)."""
        self._source = source

    def get(self) -> NodeKeyring | None:
        source = self._source
        if source is None or isinstance(source, NodeKeyring):
            return source
        return source()


class PolicyCache:
    """``policy.toml`` of one folder, read again when its mtime or size changed."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / POLICY_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._policy: Policy | None = None

    def get(self) -> Policy:
        """The policy in force; raises ``ConfigError`` ``config.policy`` like a fresh read."""
        try:
            stat = self.path.stat()
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None  # load_policy_file names the cause
        with self._lock:
            if stamp is None or stamp != self._stamp or self._policy is None:
                self._policy = load_policy_file(self.path)
                self._stamp = stamp
            return self._policy


class NodeContext:
    """An opened node with its keyring, policy and clock (see the module notes).

    The caller owns ``node`` and closes it; the context closes nothing.
    """

    def __init__(
        self,
        node: Node,
        keyring: KeyringLike = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        _holder: KeyringHolder | None = None,
        _policy: PolicyCache | None = None,
    ) -> None:
        self.node = node
        self.clock = clock
        self._holder = _holder if _holder is not None else KeyringHolder(keyring)
        self._policy = _policy if _policy is not None else PolicyCache(node.settings.policy_dir)

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def keyring(self) -> NodeKeyring:
        """The node's current unlocked keyring.

        Raises :class:`~gateway.errors.ConfigError` ``keys.locked`` when this
        host holds no keys.
        """
        keyring = self._holder.get()
        if keyring is None:
            raise ConfigError(
                f"this needs the unlocked keys of node {self.node.node_id}, which this "
                "process does not hold: run it on the serving node (gateway serve) "
                "or as a host operation with the keystore passphrase",
                reason="keys.locked",
            )
        return keyring

    def keyring_or_none(self) -> NodeKeyring | None:
        """The current keyring, or ``None`` on a host without keys."""
        return self._holder.get()

    def keyring_source(self) -> Callable[[], NodeKeyring]:
        """A function reading :attr:`keyring` each time it is called."""
        return lambda: self.keyring

    def replace_keyring(self, keyring: KeyringLike) -> None:
        """Swap in new keys (the key watch, after a rotation); every copy sees them."""
        self._holder.replace(keyring)

    @property
    def policy(self) -> Policy:
        """The node's policy, re-read when ``policy.toml`` changed (``ConfigError`` if bad)."""
        return self._policy.get()

    def now(self) -> datetime:
        """The current time of this context's clock (timezone-aware UTC)."""
        return self.clock()

    def at(self, now: datetime) -> NodeContext:
        """A copy whose clock stays at ``now``; keyring holder and policy are shared."""
        return NodeContext(self.node, clock=lambda: now, _holder=self._holder, _policy=self._policy)
