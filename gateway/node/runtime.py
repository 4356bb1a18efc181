"""An opened node: its settings and database, checked to belong together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.engine import make_url

from gateway.errors import ConfigError, StorageError
from gateway.metrics import NodeMetrics
from gateway.settings import Settings
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord

__all__ = ["Node", "next_whole_second", "utc_now"]


def utc_now() -> datetime:
    """The shells' clock; the core never reads one and takes ``now`` instead."""
    return datetime.now(UTC)


def next_whole_second() -> datetime:
    """Wait for the next whole second of :func:`utc_now` and return it (no fraction).

    For a moment written to whole seconds that must lie strictly after
    everything stored so far: a key revocation's ``revoked_at`` (the manifest
    writes whole seconds). Taken as the current second truncated, a checkpoint
    or bundle stored earlier in that same second would count as stored after
    the revocation. Waits less than a second.
    """
    now = utc_now()
    target = now.replace(microsecond=0) + timedelta(seconds=1)
    time.sleep(max(0.0, (target - now).total_seconds()))
    while (now := utc_now()) < target:  # a sleep may end a hair early
        time.sleep(0.001)
    return now.replace(microsecond=0)


@dataclass
class Node:
    """A node opened for work. Close it with :meth:`close` (or use ``with``).

    ``metrics`` are this node's Prometheus instruments, in a registry of their
    own (see :mod:`gateway.metrics`).
    """

    settings: Settings
    db: Database
    metrics: NodeMetrics = field(default_factory=NodeMetrics, repr=False, compare=False)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, upgrade: bool = False) -> Node:
        """Open the node's database, apply or require migrations, check identity."""
        db = open_database(settings.database_url)
        try:
            if upgrade:
                db.upgrade()
            elif db.pending_revisions():
                raise StorageError(
                    "the database schema is older than this software: run 'gateway db upgrade'",
                    reason="storage.schema",
                )
            with db.transaction() as session:
                rows = session.scalars(select(NodeRecord)).all()
            owners = {row.node_id for row in rows}
            if owners != {settings.node_id}:
                raise ConfigError(
                    f"the database at {_safe_url(settings.database_url)} belongs to "
                    f"{', '.join(sorted(owners)) or 'no node'}, not to node {settings.node_id!r}",
                    reason="config.database",
                )
        except BaseException:
            db.dispose()
            raise
        return cls(settings=settings, db=db)

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    def close(self) -> None:
        if not self._closed:
            self.db.dispose()
            self._closed = True

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _safe_url(url: str) -> str:
    """A database URL with any password removed, for messages and logs."""

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse is shown as its scheme only
        return url.split(":", 1)[0] + ":..."
