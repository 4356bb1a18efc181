"""The object every command receives: home, output mode, and the opened node.

Commands never read the environment or open databases themselves; they ask
this context, which does it once per process and closes what it opened when
the command ends.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import click

from gateway import log
from gateway.node.runtime import Node
from gateway.settings import Settings, load_settings, resolve_home

__all__ = ["AppContext", "pass_app", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for ``--json`` output (times as RFC 3339, paths as text)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


@dataclass
class AppContext:
    """Per-invocation state shared by the root group and its commands."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    home_option: Path | None = None
    as_json: bool = False
    debug: bool = False
    verbose: bool = False
    token_file: Path | None = None
    _settings: Settings | None = None
    _node: Node | None = None

    def home(self) -> Path:
        return resolve_home(self.home_option, self.environ)

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.home(), environ=self.environ)
            log.configure(
                node=self._settings.node_id,
                level="debug" if self.verbose else "warning",
                fmt=self._settings.log.format,
            )
        return self._settings

    def node(self, *, upgrade: bool = False) -> Node:
        """The opened node (database checked); closed when the command ends."""
        if self._node is None:
            self._node = Node.open(self.settings(), upgrade=upgrade)
            click.get_current_context().call_on_close(self.close)
        return self._node

    def close(self) -> None:
        if self._node is not None:
            self._node.close()
            self._node = None

    def emit(self, data: Any, human: str | Callable[[], str] | None = None) -> None:
        """Print a command's result: ``data`` as JSON with --json, else ``human``."""
        if self.as_json:
            click.echo(json.dumps(to_jsonable(data), sort_keys=True, ensure_ascii=False))
            return
        text = human() if callable(human) else human
        if text is None:
            text = json.dumps(to_jsonable(data), sort_keys=True, indent=2, ensure_ascii=False)
        click.echo(text)

    def progress(self, message: str) -> None:
        """A progress line for long work: on stderr, never mixed into --json output."""
        click.echo(message, err=True)

    @staticmethod
    def stderr_is_tty() -> bool:
        return sys.stderr.isatty()


pass_app = click.make_pass_decorator(AppContext, ensure=True)
