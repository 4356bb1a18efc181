"""The compliance and administration web console, under ``/console/`` of the local API.

Server-rendered pages (Jinja2 through aiohttp-jinja2), no JavaScript. The
security rules, each checked by ``tests/integration/test_console.py``:

* **Sign-in** with the user's token once (a form); then a session cookie
  (``HttpOnly``, ``SameSite=Strict``, ``Path=/console/``, ``Secure`` when the
  listener is TLS, a lifetime). Only the ``compliance`` and ``admin`` roles
  have pages; an officer's token opens no session. Sign-out ends the
  session on the server (:mod:`gateway.console.sessions`): a copied cookie
  opens nothing afterwards.
* **CSRF**: every form carries a token tied to the session (the sign-in form:
  to a short-lived cookie of its own), compared in constant time; a POST
  with a foreign ``Origin`` or ``Sec-Fetch-Site: cross-site`` is refused
  before anything else.
* **Headers**: a strict Content-Security-Policy (``default-src 'none'``,
  styles from our own stylesheet only, no script at all, forms to ourselves,
  no framing), ``X-Frame-Options: DENY``, ``Referrer-Policy: same-origin``,
  ``Cache-Control: no-store``.
* **Roles**: compliance pages need ``console.compliance``, administration
  pages ``console.admin`` (:data:`gateway.core.roles.ACTIONS`); compliance
  sees metadata only, never case content (no page opens an envelope).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.console import data
from gateway.console.i18n import ZONES, format_when, languages, pick_language, translations
from gateway.console.sessions import ConsoleSession, SessionStore, csrf_matches
from gateway.core.keys import NodeKeyring
from gateway.core.ledger import EntryKind
from gateway.core.roles import Actor, Role, authorize_role
from gateway.core.times import DateMeans, parse_user_time
from gateway.errors import AccessDenied, GatewayError, http_status_for
from gateway.log import get_logger
from gateway.node import accounting
from gateway.node.context import NodeContext
from gateway.node.ledger import witness as ledger_witness
from gateway.node.own_keys import verify_ledger_with_keys
from gateway.node.peer_trust import peer_node_of, pinned_peer_manifest
from gateway.node.runtime import Node, utc_now
from gateway.node.users import authenticate
from gateway.peer.client import PeerClient
from gateway.peer.ledger_client import fetch_consistency
from gateway.request_context import refusal_message
from gateway.store.models_users import UserRecord

__all__ = [
    "CONSOLE_PREFIX",
    "COOKIE",
    "CSP",
    "PAGES",
    "SIGNIN_COOKIE",
    "add_console",
    "is_console_path",
]

CONSOLE_PREFIX = "/console"
COOKIE = "ssw_console"
SIGNIN_COOKIE = "ssw_console_signin"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_MAX_FORM = 16 * 1024
_log = get_logger("console")

T = TypeVar("T")

NODE = web.AppKey("console_node", Node)
KEYRING: web.AppKey[Callable[[], NodeKeyring]] = web.AppKey("console_keyring")
EXECUTOR: web.AppKey[Callable[[], Executor]] = web.AppKey("console_executor")
SESSIONS = web.AppKey("console_sessions", SessionStore)
STATUS: web.AppKey[dict[str, Any]] = web.AppKey("console_status")
SESSION = web.RequestKey("console_session", ConsoleSession)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Page:
    action: str | None
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _run(request: web.Request, work: Callable[[], T]) -> T:
    executor = request.app[EXECUTOR]()
    return await asyncio.get_running_loop().run_in_executor(executor, work)


def _secure(request: web.Request) -> bool:
    return request.secure


def _set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str,
                max_age: int) -> None:  # fmt: skip
    response.set_cookie(
        name, value, max_age=max_age, path=f"{CONSOLE_PREFIX}/", httponly=True,
        samesite="Strict", secure=_secure(request),
    )  # fmt: skip


def _clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path=f"{CONSOLE_PREFIX}/")


def _context(request: web.Request, **extra: Any) -> dict[str, Any]:
    session = request.get(SESSION)
    lang = session.lang if session else pick_language(request.headers.get("Accept-Language"))
    zone = session.zone if session else "UTC"
    catalogue = translations(lang)
    return {
        "_": catalogue.gettext,
        "gettext": catalogue.gettext,
        "ngettext": catalogue.ngettext,
        "lang": lang,
        "zone": zone,
        "when": lambda value: format_when(value, zone),
        "session": session,
        "csrf": session.csrf if session else "",
        "languages": languages(),
        "zones": ZONES,
        "node": request.app[NODE].node_id,
        "path": request.path,
        **extra,
    }


def _render(
    request: web.Request, template: str, http_status: int = 200, **extra: Any
) -> web.Response:
    return aiohttp_jinja2.render_template(
        template, request, _context(request, **extra), status=http_status
    )


def _refusal_page(request: web.Request, status: int, message: str) -> web.Response:
    return _render(request, "refused.html", http_status=status, message=message)


# -- the middleware ---------------------------------------------------------------------------


def _same_origin(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.scheme}://{request.host}"


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Sessions, CSRF, cross-site refusal and the security headers, for every page."""
    try:
        session = request.app[SESSIONS].find(request.cookies.get(COOKIE), now=utc_now())
        if session is not None:
            node = request.app[NODE]

            def still_valid() -> bool:
                with node.db.transaction() as db:
                    user = db.query(UserRecord).filter(UserRecord.name == session.user).first()
                    return (
                        user is not None
                        and user.disabled_at is None
                        and user.token_id == session.token_id
                        and user.role == session.role.value
                    )

            if await _run(request, still_valid):
                request[SESSION] = session
            else:
                request.app[SESSIONS].end_user(session.user)
        if request.method == "POST":
            if not _same_origin(request):
                raise _Refused(403, "cross-site form posts are refused")
            if request.content_length is not None and request.content_length > _MAX_FORM:
                raise _Refused(413, "form too large")
        response = await handler(request)
    except _Refused as refused:
        response = _refusal_page(request, refused.status, refused.message)
    except GatewayError as exc:
        status = (
            403
            if isinstance(exc, AccessDenied)
            else 422
            if exc.reason.startswith(("input", "request"))
            else max(400, http_status_for(exc))
        )
        response = _refusal_page(
            request,
            status,
            refusal_message(exc, request, event="console_refused", component="console"),
        )
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.status != 405:
            response = _refusal_page(request, exc.status, exc.reason)
        else:
            raise
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = (
        "same-origin"  # "no-referrer" would make form posts say Origin: null
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _page(action: str | None, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
          ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:  # fmt: skip
    """A handler behind the session (redirect to sign-in) and the role's action."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        session = request.get(SESSION)
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/signin")
            raise _Refused(401, "sign in first")
        if action is not None:
            try:
                authorize_role(session.role, action)
            except AccessDenied as exc:
                raise _Refused(403, exc.message) from exc
        if request.method == "POST":
            form = await request.post()
            if not csrf_matches(session.csrf, _field(form, "csrf")):
                raise _Refused(403, "the form's CSRF token is missing or wrong: reload the page")
        return await handler(request)

    return guarded


def _see_other(location: str) -> web.Response:
    """303 See Other: after a form, the browser GETs ``location``."""
    return web.Response(status=303, headers={"Location": location})


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


# -- sign-in and sign-out ------------------------------------------------------------------------


async def signin_form(request: web.Request) -> web.StreamResponse:
    if request.get(SESSION) is not None:
        raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/")
    token = secrets.token_urlsafe(32)
    response = _render(request, "signin.html", signin_csrf=token, error=None)
    _set_cookie(response, request, SIGNIN_COOKIE, token, 600)
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not expected or not csrf_matches(expected, _field(form, "csrf")):
        raise _Refused(403, "the sign-in form expired or came from elsewhere: reload the page")
    token = (_field(form, "token") or "").strip()
    lang = _field(form, "lang") or "en"
    node = request.app[NODE]

    def check() -> tuple[str, Role, str]:

        with node.db.transaction() as db:
            actor = authenticate(db, token)
            user = db.query(UserRecord).filter(UserRecord.name == actor.name).one()
            assert actor.role is not None
            return actor.name, actor.role, user.token_id

    try:
        name, role, token_id = await _run(request, check)
    except AccessDenied:
        _log.info("console_signin_refused")
        fresh = secrets.token_urlsafe(32)
        response = _render(request, "signin.html", http_status=401, signin_csrf=fresh,
                           error="The token is not valid.")  # fmt: skip
        _set_cookie(response, request, SIGNIN_COOKIE, fresh, 600)
        return response
    if role not in (Role.COMPLIANCE, Role.ADMIN):
        _log.info("console_signin_role_refused", user=name, role=role.value)
        raise _Refused(403, "the console is for compliance officers and administrators")
    cookie, session = request.app[SESSIONS].create(
        user=name, role=role, token_id=token_id, now=utc_now(),
        lang=lang if lang in dict(languages()) else "en",
    )  # fmt: skip
    _log.info("console_signin", user=name, role=role.value)
    response = _see_other(f"{CONSOLE_PREFIX}/")
    _set_cookie(
        response,
        request,
        COOKIE,
        cookie,
        int((session.expires_at - session.created_at).total_seconds()),
    )
    _clear_cookie(response, SIGNIN_COOKIE)
    return response


async def signout(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].end(request.cookies.get(COOKIE))
    response = _see_other(f"{CONSOLE_PREFIX}/signin")
    _clear_cookie(response, COOKIE)
    return response


async def settings(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    session = request[SESSION]
    lang = _field(form, "lang")
    zone = _field(form, "zone")
    if lang in dict(languages()):
        session.lang = lang
    if zone in ZONES:
        session.zone = zone
    back = _field(form, "back") or f"{CONSOLE_PREFIX}/"
    if not back.startswith(f"{CONSOLE_PREFIX}/") or "//" in back or "\\" in back:
        back = f"{CONSOLE_PREFIX}/"
    return _see_other(back)


async def home(request: web.Request) -> web.StreamResponse:
    session = request[SESSION]
    target = "admin" if session.role == Role.ADMIN else "ledger"
    return _see_other(f"{CONSOLE_PREFIX}/{target}")


# -- compliance pages ----------------------------------------------------------------------------


async def ledger_page(request: web.Request) -> web.StreamResponse:
    chosen = data.LedgerFilter.from_query(request.query)
    page_text = request.query.get("page", "1")
    page = int(page_text) if page_text.isdigit() and len(page_text) < 9 else 0
    node = request.app[NODE]

    def read() -> dict[str, Any]:
        with node.db.transaction() as db:
            return data.ledger_page(db, chosen, page)

    found = await _run(request, read)

    query = chosen.query()
    return _render(
        request, "ledger.html", found=found, filter=chosen, kinds=[k.value for k in EntryKind],
        query=urlencode(query), page_link=lambda n: "?" + urlencode({**query, "page": n}),
        raw=request.query,
    )  # fmt: skip


async def entry_page(request: web.Request) -> web.StreamResponse:
    text = request.match_info["seq"]
    if not text.isdigit() or len(text) > 12:
        raise _Refused(404, "no such entry")
    node = request.app[NODE]

    def read() -> dict[str, Any]:
        with node.db.transaction() as db:
            return data.entry_detail(db, int(text))

    return _render(request, "entry.html", **(await _run(request, read)))


async def consents_page(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    listing = await _run(request, lambda: data.consent_register(node, utc_now()))
    return _render(request, "consents.html", listing=listing)


async def account_page(request: web.Request) -> web.StreamResponse:

    node = request.app[NODE]
    bundle = request.query.get("bundle") or None

    def read() -> dict[str, Any]:
        with node.db.transaction() as db:
            return accounting.account(db, node.node_id, bundle=bundle)

    return _render(request, "account.html", report=await _run(request, read), bundle=bundle)


async def verify_page(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]

    def read() -> dict[str, Any]:
        with node.db.transaction() as db:
            return data.verification_status(db, node.node_id)

    return _render(request, "verify.html", status=await _run(request, read),
                   last=request.app[STATUS])  # fmt: skip


async def verify_run(request: web.Request) -> web.StreamResponse:

    node = request.app[NODE]
    session = request[SESSION]

    def run() -> dict[str, Any]:
        with node.db.transaction(snapshot=True) as db:  # one moment: the node appends meanwhile
            return verify_ledger_with_keys(db, node_id=node.node_id).to_dict()

    request.app[STATUS]["verify"] = {
        "time": utc_now(),
        "by": session.user,
        "result": await _run(request, run),
    }
    _log.info("console_verify", user=session.user)
    return _see_other(f"{CONSOLE_PREFIX}/verify")


async def audit_run(request: web.Request) -> web.StreamResponse:

    node = request.app[NODE]
    session = request[SESSION]
    actor = Actor(name=session.user, role=session.role)
    keyring = request.app[KEYRING]
    loop = asyncio.get_running_loop()

    def pinned() -> Any:
        with node.db.transaction() as db:
            return pinned_peer_manifest(db)

    manifest = await _run(request, pinned)
    outcome: dict[str, Any]
    if manifest is None:
        outcome = {"consistent": False, "message": "no peer is pinned"}
    else:

        async def ask(first: int) -> ledger_witness.PeerAnswer:
            async with PeerClient(node.settings, keyring()) as client:
                return await fetch_consistency(client, first)

        def fetch(first: int) -> ledger_witness.PeerAnswer:
            return asyncio.run_coroutine_threadsafe(ask(first), loop).result(timeout=60)

        try:
            result = await _run(request, lambda: ledger_witness.audit_peer(
                node.db, manifest, peer_node=peer_node_of(node.node_id), fetch=fetch,
                now=utc_now, actor=actor,
            ))  # fmt: skip
            outcome = result.to_dict()
        except GatewayError as exc:
            outcome = {
                "consistent": False,
                "message": refusal_message(
                    exc, request, event="console_audit_failed", component="console"
                ),
                "reason": exc.reason,
            }
    request.app[STATUS]["audit"] = {"time": utc_now(), "by": session.user, "result": outcome}
    _log.info("console_audit_peer", user=session.user, consistent=outcome.get("consistent"))
    return _see_other(f"{CONSOLE_PREFIX}/verify")


async def export(request: web.Request) -> web.StreamResponse:
    chosen = data.LedgerFilter.from_query(request.query)
    fmt = request.query.get("format", "csv")
    node = request.app[NODE]

    def read() -> tuple[bytes, int]:
        with node.db.transaction() as db:
            return data.export_entries(db, chosen, fmt)

    body, count = await _run(request, read)
    kind = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return web.Response(
        body=body,
        headers={
            "Content-Type": f"{kind}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="ledger-{node.node_id}.{fmt}"',
            "X-Entry-Count": str(count),
        },
    )


async def report_page(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    since_text = request.query.get("from", "")
    until_text = request.query.get("to", "")
    if not since_text or not until_text:
        return _render(request, "report_form.html")
    since = parse_user_time(since_text, option="from", dates=DateMeans.START, zone_required=False)
    until = parse_user_time(until_text, option="to", dates=DateMeans.END, zone_required=False)

    def read() -> dict[str, Any]:
        with node.db.transaction() as db:
            return data.report(db, node.node_id, since, until)

    return _render(request, "report.html", report=await _run(request, read), generated=utc_now())


# -- administration ------------------------------------------------------------------------------


async def admin_page(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]

    def read() -> dict[str, Any]:
        with node.db.transaction() as db:
            return data.admin_status(db, utc_now())

    return _render(request, "admin.html", status=await _run(request, read))


_C = "console.compliance"
_A = "console.admin"
PAGES: tuple[
    tuple[str, str, str | None, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...
] = (
    ("GET", "/", None, home),
    ("POST", "/signout", None, signout),
    ("POST", "/settings", None, settings),
    ("GET", "/ledger", _C, ledger_page),
    ("GET", "/ledger/{seq}", _C, entry_page),
    ("GET", "/consents", _C, consents_page),
    ("GET", "/account", _C, account_page),
    ("GET", "/verify", _C, verify_page),
    ("POST", "/verify/run", _C, verify_run),
    ("POST", "/verify/audit-peer", _C, audit_run),
    ("GET", "/export", _C, export),
    ("GET", "/report", _C, report_page),
    ("GET", "/admin", _A, admin_page),
)
"""(method, path under /console, action, handler) of every page behind the session."""


def _console_app(ctx: NodeContext, executor: Callable[[], Executor]) -> web.Application:
    console = web.Application(middlewares=[_guard], client_max_size=_MAX_FORM)
    console[NODE] = ctx.node
    console[KEYRING] = ctx.keyring_source()
    console[EXECUTOR] = executor
    console[SESSIONS] = SessionStore()
    console[STATUS] = {}
    aiohttp_jinja2.setup(
        console,
        loader=jinja2.PackageLoader("gateway.console", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    console.router.add_get("/signin", signin_form)
    console.router.add_post("/signin", signin)
    for method, path, action, handler in PAGES:
        console.router.add_route(method, path, _page(action, handler))
    console.router.add_static("/static/", str(_static_dir()), follow_symlinks=False)
    return console


def _static_dir() -> Any:

    return resources.files("gateway.console") / "static"


def add_console(app: web.Application, ctx: NodeContext,
                executor: Callable[[], Executor]) -> None:  # fmt: skip
    """Mount the console under ``/console/`` of the local API app ``app``.

    The console acts for ``ctx.node`` and reads its current keyring from ``ctx``.
    """

    async def to_console(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(f"{CONSOLE_PREFIX}/")

    app.router.add_get(CONSOLE_PREFIX, to_console)
    app.add_subapp(f"{CONSOLE_PREFIX}/", _console_app(ctx, executor))


def is_console_path(path: str) -> bool:
    """Whether the console, not the API's bearer-token check, answers ``path``."""
    return path == CONSOLE_PREFIX or path.startswith(f"{CONSOLE_PREFIX}/")
