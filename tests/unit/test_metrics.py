"""Metric labels stay few and carry codes only; each node's registry is its own."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MAX_LABEL_VALUES, OTHER, UNMATCHED_ROUTE, NodeMetrics, bounded_label


@pytest.mark.parametrize(
    ("given", "label"),
    [
        ("envelope.signature", "envelope.signature"),
        ("transport.unreachable", "transport.unreachable"),
        ("Auth.Unknown-Key", "auth.unknown-key"),
        ("limit.rate", "limit.rate"),
        (None, OTHER),
        ("", OTHER),
        ("has spaces", OTHER),
        ("<script>", OTHER),
        ("tanaka@example.jp", OTHER),
        ("x" * 81, OTHER),
        ("a/b", OTHER),
    ],
)
def test_bounded_label_keeps_reason_codes_and_nothing_else(given: str | None, label: str) -> None:
    assert bounded_label(given) == label


def _samples(metrics: NodeMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(metrics.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_a_label_takes_at_most_its_bound_of_values_then_other() -> None:
    metrics = NodeMetrics()
    for index in range(MAX_LABEL_VALUES + 10):
        metrics.envelope_refused(f"check-{index}")
    series = _samples(metrics, "ssw_gateway_envelopes_refused_total")
    assert len(series) == MAX_LABEL_VALUES + 1
    assert series[(("check", OTHER),)] == 10
    # A value seen before the bound is reached keeps its own series afterwards.
    metrics.envelope_refused("check-0")
    assert _samples(metrics, "ssw_gateway_envelopes_refused_total")[(("check", "check-0"),)] == 2


@pytest.mark.parametrize(
    ("route", "label"),
    [
        ("/api/v1/bundles/{bundle_id}", "/api/v1/bundles/{bundle_id}"),
        ("/v1/envelopes", "/v1/envelopes"),
        ("(no route)", UNMATCHED_ROUTE),
        ("/with space", UNMATCHED_ROUTE),
        ("relative", UNMATCHED_ROUTE),
    ],
)
def test_request_latency_is_labelled_by_route_template(route: str, label: str) -> None:
    metrics = NodeMetrics()
    metrics.observe_request("api", "GET", route, 0.01)
    metrics.observe_request("api", "BREW", route, 0.01)
    series = _samples(metrics, "ssw_gateway_http_request_duration_seconds_count")
    assert series == {
        (("listener", "api"), ("method", "GET"), ("route", label)): 1,
        (("listener", "api"), ("method", OTHER), ("route", label)): 1,
    }


def test_two_nodes_count_apart_and_the_global_registry_stays_empty() -> None:
    from prometheus_client import REGISTRY  # noqa: PLC0415

    first, second = NodeMetrics(), NodeMetrics()
    first.delivery_failed("transport", "transport.unreachable")
    first.tls_handshake_failed("peer", "unknown-ca")
    assert _samples(first, "ssw_gateway_delivery_failures_total") == {
        (("kind", "transport"), ("reason", "transport.unreachable")): 1
    }
    assert _samples(first, "ssw_gateway_tls_handshake_failures_total") == {
        (("listener", "peer"), ("reason", "unknown-ca")): 1
    }
    assert _samples(second, "ssw_gateway_delivery_failures_total") == {}
    assert b"ssw_gateway" not in generate_latest(REGISTRY)


def test_the_state_collector_is_registered_once() -> None:
    metrics = NodeMetrics()
    made: list[object] = []

    class Collector:
        def collect(self) -> list[object]:
            return []

        def describe(self) -> list[object]:
            return []

    def make() -> Collector:
        made.append(object())
        return Collector()

    metrics.add_state_collector(make)
    metrics.add_state_collector(make)
    assert len(made) == 1
