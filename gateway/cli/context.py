"""The object every command receives: home, output mode, and the opened node.

Commands never read the environment or open databases themselves; they ask
this context, which does it once per process and closes what it opened when
the command ends. The node, its settings and its keys are imported when a
command first asks for them, so a command that needs none of them (``--help``,
a client of the running node) never loads the database or crypto layers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from gateway.cli.outcome import echo
from gateway.core.jsonable import to_jsonable
from gateway.errors import AccessDenied

if TYPE_CHECKING:
    from gateway.client.transport import ApiClient
    from gateway.core.keys import NodeKeyring
    from gateway.core.roles import Actor
    from gateway.node.context import NodeContext
    from gateway.node.runtime import Node
    from gateway.settings import Settings

__all__ = ["AppContext", "pass_app", "read_token_file", "to_jsonable"]


class AppContext:
    """Per-invocation state shared by the root group and its commands.

    A plain class, not a dataclass: ``dataclasses`` imports ``inspect`` (and
    with it ``ast``, ``dis`` and ``tokenize``), a tenth of a client command's
    start-up (docs/performance.md). The options (``environ`` ... ``api_url``)
    are keywords of the constructor and attributes the root group sets.
    """

    OPTIONS = (
        "environ",
        "home_option",
        "as_json",
        "debug",
        "verbose",
        "token_file",
        "passphrase_file",
        "api_url",
    )
    """The attributes the command line sets (the constructor's keywords)."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        home_option: Path | None = None,
        as_json: bool = False,
        debug: bool = False,
        verbose: bool = False,
        token_file: Path | None = None,
        passphrase_file: Path | None = None,
        api_url: str | None = None,
    ) -> None:
        self.environ: Mapping[str, str] = dict(os.environ) if environ is None else environ
        self.home_option = home_option
        self.as_json = as_json
        self.debug = debug
        self.verbose = verbose
        self.token_file = token_file
        self.passphrase_file = passphrase_file
        self.api_url = api_url
        self._settings: Settings | None = None
        self._node: Node | None = None
        self._actor: Actor | None = None
        self._keyring: NodeKeyring | None = None
        self._node_context: NodeContext | None = None
        self._passphrase: bytes | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.OPTIONS if name != "environ"
        )
        return f"AppContext({shown})"

    def home(self) -> Path:
        from gateway.settings import resolve_home  # noqa: PLC0415 - user commands need no settings

        return resolve_home(self.home_option, self.environ)

    def client(self, action: str) -> ApiClient:
        """The acting user's connection to the running node's local API, for ``action``.

        ``action`` (of :data:`gateway.core.roles.ACTIONS`) is what the node
        authorizes the command's requests as; the node checks the token and
        the role, the command does not. User commands reach the node through
        it with the user's token only:
        the node's socket in the home by default, ``--api-url`` /
        ``GATEWAY_API_URL`` for TCP. They never read the passphrase, the key
        files or the database.
        """
        from gateway.client.transport import ApiClient, resolve_target  # noqa: PLC0415

        home = None
        if self.home_option is not None:
            home = self.home_option.expanduser().resolve()
        target = resolve_target(self.environ, home=home, api_url=self.api_url)
        token = self.token()
        if not token:
            raise AccessDenied(
                "no user token: pass --token-file FILE or set GATEWAY_TOKEN",
                reason="access.no-token",
            )
        return ApiClient(target, token, action=action)

    def settings(self) -> Settings:
        from gateway import log  # noqa: PLC0415
        from gateway.settings import load_settings  # noqa: PLC0415

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
        from gateway.node.runtime import Node  # noqa: PLC0415

        if self._node is None:
            import click  # noqa: PLC0415 - host operations run through click

            self._node = Node.open(self.settings(), upgrade=upgrade)
            click.get_current_context().call_on_close(self.close)
        return self._node

    def token(self) -> str | None:
        """The acting user's token: ``--token-file`` first, else ``GATEWAY_TOKEN``."""
        if self.token_file is not None:
            return read_token_file(self.token_file)
        return self.environ.get("GATEWAY_TOKEN") or None

    def actor(self, action: str) -> Actor:
        """Authenticate the acting user and check its role may perform ``action``."""
        from gateway.core.roles import authorize_role  # noqa: PLC0415
        from gateway.node.users import authorize  # noqa: PLC0415

        if self._actor is None:
            node = self.node()
            token = self.token()
            with node.db.transaction() as session:
                self._actor = authorize(session, token, action)
            return self._actor
        assert self._actor.role is not None
        authorize_role(self._actor.role, action)
        return self._actor

    def passphrase(self, new: bool = False) -> bytes:
        """The keystore passphrase: ``--passphrase-file``, ``GATEWAY_PASSPHRASE`` or a prompt."""
        from gateway.node.keystore import read_passphrase  # noqa: PLC0415

        return read_passphrase(self.environ, self.passphrase_file, prompt=True, new=new)

    def keyring(self, *, reload: bool = False) -> NodeKeyring:
        """This node's unlocked operational keys (unlocked once per process).

        ``reload`` unlocks again against the node's current manifest (after a
        rotation), with the passphrase this process was given.
        """
        from gateway.node.own_keys import unlock_keyring  # noqa: PLC0415

        if self._keyring is None or reload:
            node = self.node()
            if self._passphrase is None:
                self._passphrase = self.passphrase()
            with node.db.transaction() as session:
                self._keyring = unlock_keyring(node.settings, self._passphrase, session)
        return self._keyring

    def node_context(self, *, keys: bool = True) -> NodeContext:
        """The one :class:`~gateway.node.context.NodeContext` of this host operation.

        Built once per process around :meth:`node`; with ``keys`` its keyring
        is this process's unlocked keyring (:meth:`keyring`, asked for the
        passphrase on first use, and again after :meth:`keyring` ``reload``).
        ``keys=False`` builds a context without keys for read-only work; a later
        call with ``keys`` gives it the keyring.
        """
        from gateway.node.context import NodeContext  # noqa: PLC0415 - user commands need no node

        if self._node_context is None:
            self._node_context = NodeContext(self.node())
        if keys:
            self.keyring()
            self._node_context.replace_keyring(self.keyring)
        return self._node_context

    def close(self) -> None:
        self._node_context = None
        if self._node is not None:
            self._node.close()
            self._node = None

    def emit(self, data: Any, human: str | Callable[[], str] | None = None) -> None:
        """Print a command's result: ``data`` as JSON with --json, else ``human``."""
        if self.as_json:
            echo(json.dumps(to_jsonable(data), sort_keys=True, ensure_ascii=False))
            return
        text = human() if callable(human) else human
        if text is None:
            text = json.dumps(to_jsonable(data), sort_keys=True, indent=2, ensure_ascii=False)
        echo(text)

    def progress(self, message: str) -> None:
        """A progress line for long work: on stderr, never mixed into --json output."""
        echo(message, err=True)

    @staticmethod
    def stderr_is_tty() -> bool:
        return sys.stderr.isatty()


def read_token_file(path: Path) -> str:
    """Read a token file; refuse one that others than its owner may read."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise AccessDenied(
                f"{path} may be read by other users: restrict it with 'chmod 600 {path}'",
                reason="access.token-file",
            )
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise AccessDenied(
            f"token file {path} does not exist", reason="access.token-file"
        ) from None
    except (OSError, UnicodeDecodeError):
        raise AccessDenied(
            f"token file {path} cannot be read", reason="access.token-file"
        ) from None
    return text


_P = ParamSpec("_P")
_R = TypeVar("_R")


def pass_app(function: Callable[Concatenate[AppContext, _P], _R]) -> Callable[_P, _R]:
    """Decorate a click command's callback to receive the invocation's :class:`AppContext`.

    click's ``make_pass_decorator(AppContext, ensure=True)``, built when a
    command module is imported (those import click anyway), so that this
    module imports no click for the fast path of :mod:`gateway.cli.fast`.
    """
    import click  # noqa: PLC0415

    return click.make_pass_decorator(AppContext, ensure=True)(function)
