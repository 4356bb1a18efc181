"""The web console over real sockets: sign-in, sessions, CSRF, CSP, roles, pages.

Every page is fetched as a browser without JavaScript would: cookies kept,
forms posted with their hidden CSRF field. See gateway/console/app.py for
the rules each test holds the console to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.console.app import COOKIE, CSP, SIGNIN_COOKIE
from tests.console_client import Browser, serve_console
from tests.exchange_pair import Pair, Side, pair
from tests.integration.test_accounting import story

__all__ = ["pair"]

COMPLIANCE_PAGES = ("/console/ledger", "/console/consents", "/console/account",
                    "/console/verify", "/console/report")  # fmt: skip


def run(side: Side, scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serve_console(side) as base:
            await scenario(base)

    asyncio.run(main())


def admin_token(side: Side) -> str:
    from gateway.node.runtime import utc_now  # noqa: PLC0415
    from gateway.node.users import add_user  # noqa: PLC0415

    with side.node.db.transaction() as session:
        return add_user(session, "kato", "admin", created_by="admin", now=utc_now()).token.text


def test_compliance_signs_in_once_and_walks_every_page(pair: Pair, tmp_path: Path) -> None:
    case_id, consent_id = story(pair, tmp_path)

    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            first = await browser.get("/console/ledger")
            assert (first.status, first.headers["Location"]) == (303, "/console/signin")
            signed = await browser.sign_in(pair.jp.tokens["compliance"])
            assert signed.status == 303
            cookie_header = signed.headers.getall("Set-Cookie")
            session_cookie = next(c for c in cookie_header if c.startswith(f"{COOKIE}="))
            for flag in ("HttpOnly", "SameSite=Strict", "Path=/console/", "Max-Age="):
                assert flag in session_cookie, session_cookie
            assert "Secure" not in session_cookie  # plain HTTP on loopback: no TLS here
            home = await browser.get("/console/")
            assert home.headers["Location"] == "/console/ledger"
            for path in COMPLIANCE_PAGES:
                page = await browser.get(path)
                assert page.status == 200, (path, page.text[:500])
                assert page.headers["Content-Security-Policy"] == CSP
                assert page.headers["X-Frame-Options"] == "DENY"
                assert "<script" not in page.text
                assert " style=" not in page.text
            timeline = await browser.get(f"/console/ledger?bundle={case_id}")
            assert "disclosure-made" in timeline.text
            consents = await browser.get("/console/consents")
            assert consent_id in consents.text
            assert "consent-used" in consents.text  # the use reported back by pk
            account = await browser.get(f"/console/account?bundle={case_id}")
            assert consent_id in account.text
            entry = await browser.get("/console/ledger/1")
            assert entry.status == 200
            assert "Inclusion proof" in entry.text
            filtered = await browser.get("/console/ledger?kind=consent-used")
            assert "consent-used" in filtered.text
            assert "bundle-sent" not in filtered.text.split("<tbody>")[1]
            csv_export = await browser.get("/console/export?kind=consent-used&format=csv")
            assert csv_export.status == 200
            assert csv_export.headers["X-Entry-Count"] == "1"
            jsonl = await browser.get("/console/export?format=jsonl")
            assert int(jsonl.headers["X-Entry-Count"]) == len(jsonl.text.splitlines())
            report = await browser.get("/console/report?from=2000-01-01&to=2999-12-31")
            assert report.status == 200
            assert "consent-granted" in report.text
            ran = await browser.post(
                "/console/verify/run", {"csrf": home_csrf(await browser.get("/console/verify"))}
            )
            assert ran.status == 303
            verify = await browser.get("/console/verify")
            assert "intact" in verify.text
            admin = await browser.get("/console/admin")
            assert admin.status == 403

    run(pair.jp, scenario)


def home_csrf(page: object) -> str:
    return page.csrf()  # type: ignore[attr-defined,no-any-return]


def test_officer_and_wrong_tokens_open_no_session(pair: Pair) -> None:
    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            wrong = await browser.sign_in("ssw_0123456789abcdef_" + "Q" * 43)
            assert wrong.status == 401
            assert browser.cookie(COOKIE) is None
            officer = await browser.sign_in(pair.jp.tokens["officer"])
            assert officer.status == 403
            assert browser.cookie(COOKIE) is None
            still_out = await browser.get("/console/ledger")
            assert still_out.status == 303

    run(pair.jp, scenario)


def test_a_cookie_replayed_after_sign_out_is_refused(pair: Pair) -> None:
    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            await browser.sign_in(pair.jp.tokens["compliance"])
            stolen = browser.cookie(COOKIE)
            assert stolen
            page = await browser.get("/console/ledger")
            out = await browser.post("/console/signout", {"csrf": page.csrf()})
            assert out.status == 303
        async with Browser.open(base) as thief:
            replay = await thief.get("/console/ledger", headers={"Cookie": f"{COOKIE}={stolen}"})
            assert replay.status == 303
            assert replay.headers["Location"] == "/console/signin"
            export = await thief.get(
                "/console/export?format=csv", headers={"Cookie": f"{COOKIE}={stolen}"}
            )
            assert export.status == 303

    run(pair.jp, scenario)


def test_forms_without_the_session_token_or_from_another_site_are_refused(pair: Pair) -> None:
    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            await browser.sign_in(pair.jp.tokens["compliance"])
            page = await browser.get("/console/verify")
            token = page.csrf()
            missing = await browser.post("/console/verify/run", {})
            wrong = await browser.post("/console/verify/run", {"csrf": token[:-2] + "xx"})
            cross = await browser.post(
                "/console/verify/run", {"csrf": token}, headers={"Origin": "https://evil.example"}
            )
            fetch_site = await browser.post(
                "/console/verify/run", {"csrf": token}, headers={"Sec-Fetch-Site": "cross-site"}
            )
            for refused in (missing, wrong, cross, fetch_site):
                assert refused.status == 403, refused.text[:300]
            verify = await browser.get("/console/verify")
            assert "not run since the node started" in verify.text
            good = await browser.post("/console/verify/run", {"csrf": token})
            assert good.status == 303
            # the sign-in form too: a post without its own token opens nothing
            forged = await browser.post("/console/signin", {"token": pair.jp.tokens["compliance"]})
            assert forged.status == 403

    run(pair.jp, scenario)


def test_sign_in_cookie_is_strict_and_sign_in_sets_no_session_without_it(pair: Pair) -> None:
    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            form = await browser.get("/console/signin")
            pre = next(c for c in form.headers.getall("Set-Cookie") if c.startswith(SIGNIN_COOKIE))
            assert "SameSite=Strict" in pre
            assert "HttpOnly" in pre
            assert form.headers["Content-Security-Policy"] == CSP
            assert '<label for="token">' in form.text

    run(pair.jp, scenario)


def test_administrators_see_node_status_and_no_compliance_page(pair: Pair) -> None:
    token = admin_token(pair.jp)

    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            await browser.sign_in(token)
            home = await browser.get("/console/")
            assert home.headers["Location"] == "/console/admin"
            admin = await browser.get("/console/admin")
            assert admin.status == 200
            assert "Outbox" in admin.text
            assert "Pinned peer" in admin.text
            for path in COMPLIANCE_PAGES:
                assert (await browser.get(path)).status == 403, path

    run(pair.jp, scenario)


def test_japanese_and_the_viewers_zone(pair: Pair) -> None:
    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            await browser.sign_in(pair.jp.tokens["compliance"], lang="ja")
            page = await browser.get("/console/ledger")
            assert '<html lang="ja">' in page.text
            assert "台帳の時系列" in page.text
            chosen = await browser.post(
                "/console/settings",
                {
                    "csrf": page.csrf(),
                    "lang": "en",
                    "zone": "Asia/Tokyo",
                    "back": "/console/ledger",
                },
            )
            assert chosen.headers["Location"] == "/console/ledger"
            again = await browser.get("/console/ledger")
            assert "Ledger timeline" in again.text
            assert "UTC / " in again.text
            assert "JST" in again.text
            offsite = await browser.post(
                "/console/settings", {"csrf": page.csrf(), "back": "//evil.example/"}
            )
            assert offsite.headers["Location"] == "/console/"

    run(pair.jp, scenario)


def test_the_api_keeps_refusing_requests_without_a_bearer_token(pair: Pair) -> None:
    async def scenario(base: str) -> None:
        async with Browser.open(base) as browser:
            api = await browser.get("/api/v1/ledger")
            assert api.status == 401
            bare = await browser.get("/console")
            assert bare.status == 308
            static = await browser.get("/console/static/console.css")
            assert static.status == 200

    run(pair.jp, scenario)
