"""The one registry of HTTP statuses: every error class has one, reasons override few."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import gateway
from gateway.errors import (
    STATUS_BY_REASON,
    GatewayError,
    InvalidInput,
    PolicyRefused,
    StorageError,
    TransportError,
    VerificationError,
    http_status_for,
    message_for_client,
)


def _all_error_classes() -> list[type[GatewayError]]:
    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if ".migrations." in module.name or module.name.endswith(".__main__"):
            continue
        importlib.import_module(module.name)
    found: list[type[GatewayError]] = []
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_class_maps_to_one_http_error_status() -> None:
    classes = _all_error_classes()
    assert len(classes) > 20  # the whole tree was found, not just the root
    for cls in classes:
        status = cls.http_status
        assert isinstance(status, int), cls
        assert 400 <= status <= 599, cls


def test_registered_reasons_are_http_error_statuses() -> None:
    assert STATUS_BY_REASON
    for reason, status in STATUS_BY_REASON.items():
        assert 400 <= status <= 599, reason


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (VerificationError("x", check="signature"), 422),
        (InvalidInput("x", reason="request.framing"), 400),
        (PolicyRefused("x", reason="policy.case-size"), 413),
        (PolicyRefused("x", reason="policy.attachments"), 422),
        (RuntimeError("outside the tree"), 500),
    ],
)
def test_a_reason_of_the_registry_overrides_its_class(error: BaseException, status: int) -> None:
    assert http_status_for(error) == status


def test_only_the_nodes_own_faults_withhold_their_message_from_a_remote_user() -> None:
    """Every class of the tree: a 5xx that is not the peer's answers a fixed text
    naming its reason and the request id; every other error keeps its message."""
    detail = "driver text: server db.internal port 6543, /srv/gw/home/gateway.toml"
    withheld = []
    for cls in _all_error_classes():
        error = cls.__new__(cls)
        GatewayError.__init__(error, detail)
        shown = message_for_client(error, "req-1")
        if http_status_for(error) >= 500 and not isinstance(error, TransportError):
            assert detail not in shown, cls
            assert "req-1" in shown, cls
            assert error.reason in shown, cls
            withheld.append(cls.__name__)
        else:
            assert shown == detail, cls
    assert {"StorageError", "ConfigError", "GatewayError"} <= set(withheld)
    assert message_for_client(StorageError(detail), None).endswith("in the node's log")
