"""docs/api/openapi.yaml documents exactly the routes the local API registers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from gateway.api.app import PROBE_ROUTES, ROUTES_KEY, create_api_app
from gateway.console import is_console_path
from gateway.node.context import NodeContext
from tests.integration.test_api import ApiNode, make_node, no_keyring

SPEC = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture
def registered(
    tmp_path: Path, clean_environ: dict[str, str]
) -> Iterator[dict[tuple[str, str], Any]]:
    """(METHOD, path) -> action of every route the real app registers."""
    made: ApiNode = make_node(tmp_path, f"sqlite:///{tmp_path / 'o.sqlite3'}", clean_environ)
    try:
        app = create_api_app(NodeContext(made.node, no_keyring))
        on_router = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and not is_console_path(route.resource.canonical)
        }  # the web console (/console/) is pages, not API: docs/compliance.md
        actions = {(r.method, r.path): r.action for r in app[ROUTES_KEY]}
        probes = dict.fromkeys(PROBE_ROUTES)
        assert on_router == set(actions) | set(probes)
        yield actions | probes
    finally:
        made.node.close()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def test_document_is_openapi_3_1_with_bearer_scheme(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"bearerAuth": []}]


def test_document_validates_against_the_openapi_3_1_schema(document: dict[str, Any]) -> None:
    validate(document)


def test_documented_operations_equal_registered_routes(
    document: dict[str, Any], registered: dict[tuple[str, str], Any]
) -> None:
    documented = {(method, path) for method, path, _op in operations(document)}
    assert documented == set(registered)
    assert len(documented) >= 5


# The probes answer without a token; /metrics with a token or from loopback without one.
PROBE_SECURITY = {
    ("GET", "/livez"): [],
    ("GET", "/readyz"): [],
    ("GET", "/metrics"): [{}, {"bearerAuth": []}],
}


def test_every_operation_declares_bearer_security_and_its_action(
    document: dict[str, Any], registered: dict[tuple[str, str], Any]
) -> None:
    checked = 0
    assert set(PROBE_SECURITY) == set(PROBE_ROUTES)
    for method, path, op in operations(document):
        if (method, path) in PROBE_SECURITY:
            assert op.get("security") == PROBE_SECURITY[(method, path)], (method, path)
            assert op["x-action"] is None, (method, path)
            checked += 1
            continue
        assert path.startswith("/api/v1/"), (method, path)
        assert op.get("security") == [{"bearerAuth": []}], (method, path)
        assert "x-action" in op, (method, path)
        assert op["x-action"] == registered[(method, path)], (method, path)
        assert "401" in op["responses"], (method, path)
        if op["x-action"] is not None:
            assert "403" in op["responses"], (method, path)
        checked += 1
    assert checked == len(registered)


def test_operation_ids_are_unique_and_path_parameters_declared(document: dict[str, Any]) -> None:
    ids = [op["operationId"] for _m, _p, op in operations(document)]
    assert len(ids) == len(set(ids))
    for path, item in document["paths"].items():
        in_path = set(re.findall(r"{([^}]+)}", path))
        declared = set()
        for param in [*item.get("parameters", [])] + [
            p for method in METHODS if method in item for p in item[method].get("parameters", [])
        ]:
            resolved = resolve(document, param)
            if resolved["in"] == "path":
                declared.add(resolved["name"])
        assert declared == in_path, path


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = document
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    assert isinstance(target, dict)
    return target


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("$ref"), str):
                refs.append(value["$ref"])
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    walk(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/"), ref
        resolve(document, {"$ref": ref})
