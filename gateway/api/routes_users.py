"""Local API routes for the acting user and for user management (administrators)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.routes_common import (
    ApiRoute,
    Call,
    json_response,
    refuse_unknown_fields,
    require_str,
)
from gateway.errors import InvalidInput
from gateway.node import approvals
from gateway.node.runtime import utc_now
from gateway.node.users import (
    disable_user,
    list_users,
    reissue_token,
    rotate_own_token,
    set_approver,
)

__all__ = ["ROUTES"]


async def whoami(call: Call) -> web.StreamResponse:
    role = call.actor.role.value if call.actor.role is not None else None
    return json_response({"name": call.actor.name, "role": role, "node": call.node.node_id})


async def users_list(call: Call) -> web.StreamResponse:
    rows = await call.in_transaction(list_users)
    return json_response([r.to_dict() for r in rows])


async def users_add(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"name", "role", "approver"})
    name = require_str(body, "name", max_length=64)
    role = require_str(body, "role", max_length=16)
    approver = _optional_bool(body, "approver")
    created = await call.run(
        lambda: approvals.add_user_or_propose(
            call.node, call.actor, name, role, now=utc_now(), approver=approver
        )
    )
    # 201: added, its token in the answer; 202: an administrator waits for approvals.
    return json_response(created, status=201 if created["state"] == "executed" else 202)


def _optional_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be true or false, not {type(value).__name__}")
    return value


async def users_approver(call: Call) -> web.StreamResponse:
    name = call.path("name")
    body = await call.json_body()
    refuse_unknown_fields(body, {"approver"})
    if "approver" not in body:
        raise InvalidInput('missing field "approver": send {"approver": true} or false')
    on = _optional_bool(body, "approver")
    changed = await call.in_transaction(
        lambda session: set_approver(session, name, on, now=utc_now(), by=call.actor)
    )
    return json_response({"name": name, "approver": on, "changed": changed})


async def users_disable(call: Call) -> web.StreamResponse:
    name = call.path("name")
    await call.json_body()
    await call.in_transaction(
        lambda session: disable_user(session, name, now=utc_now(), by=call.actor)
    )
    return json_response({"name": name, "disabled": True})


async def users_new_token(call: Call) -> web.StreamResponse:
    name = call.path("name")
    await call.json_body()
    token = await call.in_transaction(
        lambda session: reissue_token(session, name, now=utc_now(), by=call.actor)
    )
    return json_response({"name": name, "token": token.text, "issued_by": call.actor.name})


async def me_rotate_token(call: Call) -> web.StreamResponse:
    await call.json_body()
    token = await call.in_transaction(
        lambda session: rotate_own_token(session, call.actor, now=utc_now())
    )
    return json_response(
        {"name": call.actor.name, "token": token.text, "issued_by": call.actor.name}
    )


ROUTES = (
    ApiRoute("GET", "/api/v1/whoami", None, whoami, "The acting user, its role and the node"),
    ApiRoute(
        "POST",
        "/api/v1/me/token",
        "users.rotate-token",
        me_rotate_token,
        "Replace your own token; the old one stops working (your approvals count again)",
    ),
    ApiRoute("GET", "/api/v1/users", "users.list", users_list, "List users (never tokens)"),
    ApiRoute(
        "POST", "/api/v1/users", "users.add", users_add, "Add a user; its token is shown once"
    ),
    ApiRoute(
        "POST",
        "/api/v1/users/{name}/disable",
        "users.disable",
        users_disable,
        "Disable a user: its token is refused from now on",
    ),
    ApiRoute(
        "POST",
        "/api/v1/users/{name}/approver",
        "users.approver",
        users_approver,
        "Give or take an officer's approver capability (consent grants, two-person rule)",
    ),
    ApiRoute(
        "POST",
        "/api/v1/users/{name}/token",
        "users.add",
        users_new_token,
        "Replace a user's token; the old one stops working (issued by you: the user's "
        "approvals under k > 1 count again only after they rotate it)",
    ),
)
