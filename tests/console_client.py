"""A small no-JavaScript browser for the console: real sockets, real cookies, real forms.

``serve_console(side)`` serves a node's local API (with the console) on
loopback; ``Browser`` keeps cookies like a browser (SameSite aside), reads
the hidden CSRF field of the page it is on and posts forms with it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.api.app import create_api_app
from gateway.node.context import NodeContext
from tests.exchange_pair import Side

__all__ = ["Browser", "Page", "serve_console"]

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


@dataclass
class Page:
    status: int
    url: str
    headers: Any
    text: str

    def csrf(self) -> str:
        found = _CSRF.search(self.text)
        assert found is not None, f"no CSRF field on {self.url}"
        return found.group(1)


@asynccontextmanager
async def serve_console(side: Side) -> AsyncIterator[str]:
    app = create_api_app(NodeContext(side.node, lambda: side.keyring))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Browser:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    @classmethod
    @asynccontextmanager
    async def open(cls, base: str) -> AsyncIterator[Browser]:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1, as a browser keeps them
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            yield cls(session, base)

    async def get(self, path: str, **kw: Any) -> Page:
        async with self.session.get(self.base + path, allow_redirects=False, **kw) as resp:
            return Page(resp.status, path, resp.headers, await resp.text())

    async def post(self, path: str, form: dict[str, str], **kw: Any) -> Page:
        async with self.session.post(
            self.base + path, data=form, allow_redirects=False, **kw
        ) as resp:
            return Page(resp.status, path, resp.headers, await resp.text())

    async def sign_in(self, token: str, lang: str = "en") -> Page:
        form = await self.get("/console/signin")
        return await self.post(
            "/console/signin", {"csrf": form.csrf(), "token": token, "lang": lang}
        )

    def cookie(self, name: str) -> str | None:
        for morsel in self.session.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None
