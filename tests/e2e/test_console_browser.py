"""The console in a real browser, against two real ``gateway serve`` processes.

Chromium (Debian's, never a downloaded build) driven by Playwright walks the
whole consent story on both consoles: the blocked disclosure, the request,
the grant, the allowed disclosure, the revocation, the blocked retry, and
the use reported back on the originator's console. It is refused to an
officer and to a wrong token, a cookie replayed after sign-out opens
nothing, a form posted from another site is refused, and every page passes
axe-core with no serious or critical violation. Screenshots of the main
pages are written to ``$CONSOLE_SCREENSHOTS`` (default: the test's tmp
folder; docs/compliance/ holds the ones the guide shows).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nodes import NodeHome, ServeProcess, init_pair, stop, wait_ready
from tests.policies import set_approvals

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(1200)]

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "exam-fraud.json"
EMBASSY = "Embassy of Example"
PURPOSE = "visa screening"

playwright_api = pytest.importorskip("playwright.sync_api")
axe_api = pytest.importorskip("axe_playwright_python.sync_playwright")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


class Story:
    """Two served nodes and their users."""

    def __init__(self, homes: dict[str, NodeHome]) -> None:
        self.homes = homes
        self.tokens: dict[tuple[str, str], str] = {}
        for node_id, home in homes.items():
            for role in ("officer", "compliance"):
                made = home.run("users", "add", f"{role}-{node_id}", "--role", role)
                self.tokens[(node_id, role)] = made["token"]

    def run(self, node_id: str, *args: str, check: bool = True) -> Any:
        return self.homes[node_id].run(*args, token=self.tokens[(node_id, "officer")], check=check)

    def consents(self, node_id: str) -> dict[str, Any]:
        return dict(self.run(node_id, "consent", "list"))

    def url(self, node_id: str, path: str) -> str:
        return f"http://127.0.0.1:{self.homes[node_id].api_port}{path}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Story]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    homes = init_pair(tmp_path)
    for home in homes.values():
        # the console's story has one officer per side: Tokyo grants alone (k = 1)
        set_approvals(home.home / "policies", "consent-grant", 1)
    story = Story(homes)  # users are added before the nodes serve
    processes: list[ServeProcess] = []
    try:
        for home in homes.values():
            process = home.serve()
            processes.append(process)
            wait_ready(process)
        yield story
    finally:
        for process in processes:
            stop(process)


def disclose(story: Story, bundle: str, out: Path) -> int:
    from tests.nodes import run_gateway  # noqa: PLC0415

    home = story.homes["pk"]
    done = run_gateway(
        home.home, "disclose", bundle, "--recipient", EMBASSY, "--purpose", PURPOSE,
        "--out", str(out), env=home.env(token=story.tokens[("pk", "officer")]),
    )  # fmt: skip
    return done.returncode


def the_story(story: Story, tmp_path: Path) -> dict[str, str]:
    sent = story.run("jp", "send", "exam-fraud", str(EXAMPLE))
    bundle = sent["bundle_id"]
    wait_for("the case at pk", lambda: any(
        b["bundle_id"] == bundle for b in story.run("pk", "inbox")["bundles"]))  # fmt: skip
    assert disclose(story, bundle, tmp_path / "blocked") == 3
    asked = story.run(
        "pk", "consent", "request", bundle, "--recipient", EMBASSY, "--purpose", PURPOSE
    )
    request_id = asked["request_id"]
    wait_for("the request at jp", lambda: story.consents("jp")["requests"])
    granted = story.run("jp", "consent", "grant", request_id, "--max-uses", "3")
    consent_id = granted["consent_id"]
    wait_for("the grant at pk", lambda: story.consents("pk")["consents"])
    assert disclose(story, bundle, tmp_path / "allowed") == 0
    wait_for("the use back at jp", lambda: story.consents("jp")["consents"][0]["uses_spent"] == 1)
    story.run("jp", "consent", "revoke", consent_id, "--reason", "investigation reopened")
    wait_for("the revocation at pk",
             lambda: story.consents("pk")["consents"][0]["state"] == "revoked")  # fmt: skip
    assert disclose(story, bundle, tmp_path / "after") == 3
    return {"bundle": bundle, "request": request_id, "consent": consent_id}


def check_accessibility(page: Any, where: str) -> None:
    results = axe_api.Axe().run(page)
    bad = [
        (v["id"], v["impact"], v["help"])
        for v in results.response["violations"]
        if v.get("impact") in ("serious", "critical")
    ]
    assert bad == [], f"{where}: {bad}"


def test_compliance_walks_the_consent_story_on_both_consoles(served: Story, tmp_path: Path) -> None:
    ids = the_story(served, tmp_path)
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS", str(tmp_path / "screenshots")))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            for node_id in ("pk", "jp"):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(served.url(node_id, "/console/"))
                assert page.url.endswith("/console/signin")
                check_accessibility(page, f"{node_id} sign-in")
                page.get_by_label("User token").fill(served.tokens[(node_id, "compliance")])
                page.get_by_role("button", name="Sign in").click()
                assert page.url.endswith("/console/ledger")
                page.screenshot(path=str(shots / f"{node_id}-ledger.png"), full_page=True)
                check_accessibility(page, f"{node_id} ledger")

                if node_id == "pk":
                    # from the blocked disclosure to the consent that later allowed one
                    page.get_by_label("Kind").select_option("disclosure-blocked")
                    page.get_by_role("button", name="Filter").click()
                    rows = page.locator("tbody tr")
                    assert rows.count() == 2
                    rows.first.get_by_role("link").first.click()
                    assert "disclosure-blocked" in page.content()
                    page.screenshot(path=str(shots / "pk-entry.png"), full_page=True)
                    check_accessibility(page, "pk entry")
                page.get_by_role("link", name="Consent register").click()
                text = page.content()
                for wanted in (ids["request"], ids["consent"], "consent-granted",
                               "consent-revoked"):  # fmt: skip
                    assert wanted in text, wanted
                if node_id == "jp":
                    assert "consent-used" in text  # the use pk reported back
                page.screenshot(path=str(shots / f"{node_id}-consents.png"), full_page=True)
                check_accessibility(page, f"{node_id} consents")
                page.get_by_role("link", name="Disclosure accounting").click()
                assert ids["bundle"] in page.content()
                page.screenshot(path=str(shots / f"{node_id}-account.png"), full_page=True)
                check_accessibility(page, f"{node_id} account")
                page.get_by_role("link", name="Verification").click()
                page.get_by_role("button", name="Verify our ledger now").click()
                assert "intact" in page.content()
                page.get_by_role("button", name="Audit the peer").click()
                page.screenshot(path=str(shots / f"{node_id}-verify.png"), full_page=True)
                check_accessibility(page, f"{node_id} verify")
                page.goto(served.url(node_id, "/console/report?from=2000-01-01&to=2999-12-31"))
                assert "consent-granted" in page.content()
                page.screenshot(path=str(shots / f"{node_id}-report.png"), full_page=True)
                check_accessibility(page, f"{node_id} report")
                page.get_by_label("Language").first.select_option("ja")
                page.get_by_role("button", name="Apply").click()
                assert "コンプライアンス報告書" in page.content() or "台帳" in page.content()
                check_accessibility(page, f"{node_id} report (ja)")

                # a stolen cookie is worthless after sign-out
                stolen = context.cookies()
                page.get_by_role("button", name="サインアウト").click()
                assert page.url.endswith("/console/signin")
                thief = browser.new_context()
                thief.add_cookies(stolen)
                replay = thief.new_page()
                replay.goto(served.url(node_id, "/console/ledger"))
                assert replay.url.endswith("/console/signin")
                thief.close()
                context.close()
        finally:
            browser.close()


def test_officer_wrong_token_and_cross_site_posts_are_refused(served: Story) -> None:
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            for token, status_text in (
                (served.tokens[("jp", "officer")], "compliance officers and administrators"),
                ("ssw_0123456789abcdef_" + "Q" * 43, "The token is not valid."),
            ):
                page.goto(served.url("jp", "/console/signin"))
                page.get_by_label("User token").fill(token)
                page.get_by_role("button", name="Sign in").click()
                assert status_text in page.content()
                assert not [c for c in context.cookies() if c["name"] == "ssw_console"]
            # signed in as compliance, a form on another site posts to the console
            page.goto(served.url("jp", "/console/signin"))
            page.get_by_label("User token").fill(served.tokens[("jp", "compliance")])
            page.get_by_role("button", name="Sign in").click()
            assert page.url.endswith("/console/ledger")
            attacker = context.new_page()
            attacker.set_content(
                f'<form method="post" action="{served.url("jp", "/console/verify/run")}">'
                '<input name="csrf" value="guess"><button>go</button></form>'
            )
            with attacker.expect_navigation():
                attacker.get_by_role("button", name="go").click()
            assert "refused" in attacker.content().lower()
            page.goto(served.url("jp", "/console/verify"))
            assert "not run since the node started" in page.content()
        finally:
            browser.close()
