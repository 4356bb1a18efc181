"""Case schemas: every example validates, bad data is refused naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core.cases import CASE_TYPES, InvalidCase, case_type_for, validate_case
from gateway.errors import InvalidInput

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text("utf-8"))
    return data


def test_every_case_type_has_an_example_and_every_example_a_type() -> None:
    files = {path.stem for path in EXAMPLES.glob("*.json")}
    assert files == set(CASE_TYPES)


@pytest.mark.parametrize("name", sorted(CASE_TYPES))
def test_example_validates_and_round_trips(name: str) -> None:
    data = example(name)
    case = validate_case(name, data)
    assert type(case) is CASE_TYPES[name].model
    again = validate_case(name, case.model_dump(mode="json"))
    assert again == case


def _drop(data: dict[str, Any], path: list[str | int]) -> None:
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]


def _set(data: dict[str, Any], path: list[str | int], value: Any) -> None:
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


# (type, edit, expected field path, expected words in the reason)
BAD_CASES: list[tuple[str, str, list[str | int], Any, str, str]] = [
    (
        "broker-misconduct",
        "drop",
        ["broker", "licence_number"],
        None,
        "broker.licence_number",
        "field required",
    ),
    ("broker-misconduct", "set", ["acts"], ["f"], "acts[0]", "input should be"),
    ("broker-misconduct", "set", ["acts"], [], "acts", "at least 1"),
    ("broker-misconduct", "set", ["acts"], ["a", "a"], "", "more than once"),
    ("broker-misconduct", "set", ["broker", "kind"], "partnership", "broker", "tag"),
    ("broker-misconduct", "set", ["broker", "country"], "Pakistan", "broker.country", "pattern"),
    (
        "broker-misconduct",
        "set",
        ["affected", 1, "status"],
        "visitor",
        "affected[1].status",
        "input should be",
    ),
    (
        "broker-misconduct",
        "drop",
        ["affected", 0, "date_of_birth"],
        None,
        "affected[0].date_of_birth",
        "field required",
    ),
    (
        "broker-misconduct",
        "set",
        ["affected", 0, "date_of_birth"],
        "12/04/1998",
        "affected[0].date_of_birth",
        "date",
    ),
    (
        "broker-misconduct",
        "set",
        ["affected", 0, "passport_number"],
        "ab 12",
        "affected[0].passport_number",
        "pattern",
    ),
    ("broker-misconduct", "set", ["period", "end"], "2026-01-01", "period", "before"),
    ("broker-misconduct", "set", ["surprise"], 1, "surprise", "unknown field"),
    ("broker-misconduct", "set", ["summary"], "", "summary", "at least 1"),
    ("exam-fraud", "set", ["fraud"], "cheating", "fraud", "input should be"),
    ("exam-fraud", "set", ["persons"], [], "persons", "at least 1"),
    ("exam-fraud", "drop", ["exam", "held_on"], None, "exam.held_on", "field required"),
    ("consultation", "set", ["agenda", 0, "topic"], "g", "agenda[0].topic", "input should be"),
    ("consultation", "drop", ["agenda"], None, "agenda", "field required"),
    ("acceptance-suspension", "set", ["sector"], "mining", "sector", "input should be"),
    ("acceptance-suspension", "set", ["until"], "2026-06-01", "", "before"),
    ("acceptance-suspension", "drop", ["from_date"], None, "from_date", "field required"),
    ("return-assistance", "set", ["persons", 0, "ssw_category"], "i", "", "ssw (ii)"),
    (
        "return-assistance",
        "set",
        ["persons", 1, "principal_passport_number"],
        "ZZ0000000",
        "",
        "names no worker",
    ),
    (
        "return-assistance",
        "drop",
        ["persons", 2, "principal_passport_number"],
        None,
        "persons[2]",
        "principal_passport_number",
    ),
    (
        "return-assistance",
        "set",
        ["persons", 0, "temporary_passport_requested"],
        "yes",
        "persons[0].temporary_passport_requested",
        "boolean",
    ),
    ("information-request", "set", ["questions"], [], "questions", "at least 1"),
    ("information-request", "set", ["broker", "kind"], None, "broker", ""),
    (
        "information-reply",
        "set",
        ["request_bundle_id"],
        "not-a-uuid",
        "request_bundle_id",
        "pattern",
    ),
    ("information-reply", "set", ["answers", 0, "question"], "0", "answers[0].question", "integer"),
    ("consent-request", "drop", ["third_party"], None, "third_party", "field required"),
    ("consent-grant", "set", ["valid_until"], "2027-03-31T23:59:59", "valid_until", "timezone"),
    ("consent-grant", "set", ["max_uses"], 0, "max_uses", "greater than or equal to 1"),
    ("consent-grant", "drop", ["granting_officer"], None, "granting_officer", "field required"),
    ("consent-denial", "drop", ["reason"], None, "reason", "field required"),
    ("consent-revocation", "set", ["consent_id"], 7, "consent_id", "string"),
]


@pytest.mark.parametrize(
    ("case_type", "edit", "path", "value", "field", "words"),
    BAD_CASES,
    ids=[f"{c[0]}:{c[4] or 'model'}:{c[5] or c[1]}" for c in BAD_CASES],
)
def test_bad_case_data_refused_naming_the_field(
    case_type: str, edit: str, path: list[str | int], value: Any, field: str, words: str
) -> None:
    data = copy.deepcopy(example(case_type))
    if edit == "drop":
        _drop(data, path)
    else:
        _set(data, path, value)
    with pytest.raises(InvalidCase) as caught:
        validate_case(case_type, data)
    error = caught.value
    assert error.field == field
    assert isinstance(error, InvalidInput)
    if field:
        assert f": {field}: " in error.message
    assert words.lower() in error.message.lower()


def test_bad_case_message_never_echoes_values() -> None:
    data = example("broker-misconduct")
    data["affected"][0]["passport_number"] = "secret passport"
    with pytest.raises(InvalidCase) as caught:
        validate_case("broker-misconduct", data)
    assert "secret passport" not in str(caught.value)


def test_every_problem_is_listed() -> None:
    data = example("consent-grant")
    del data["items"]
    del data["purpose"]
    with pytest.raises(InvalidCase) as caught:
        validate_case("consent-grant", data)
    assert {path for path, _ in caught.value.errors} == {"items", "purpose"}
    assert "(and 1 more)" in caught.value.message


@pytest.mark.parametrize(
    ("name", "version", "field"),
    [("no-such-type", None, "type"), ("exam-fraud", "2", "schema_version")],
)
def test_unknown_type_or_version_refused(name: str, version: str | None, field: str) -> None:
    with pytest.raises(InvalidCase) as caught:
        case_type_for(name, version)
    assert caught.value.field == field


@pytest.mark.parametrize("data", [[], "text", None, 3])
def test_case_data_must_be_an_object(data: Any) -> None:
    with pytest.raises(InvalidCase, match="must be a JSON object"):
        validate_case("consultation", data)


def test_oversized_case_refused() -> None:
    data = example("consultation")
    data["minutes"] = "x" * 5000
    with pytest.raises(InvalidCase, match="exceeds the limit"):
        validate_case("consultation", data, max_bytes=4096)


def test_broker_acts_are_exactly_a_to_e() -> None:
    from gateway.core.cases import BROKER_ACTS, CONSULTATION_TOPICS  # noqa: PLC0415

    assert list(BROKER_ACTS) == ["a", "b", "c", "d", "e"]
    assert list(CONSULTATION_TOPICS) == ["a", "b", "c", "d", "e", "f"]
    for act in "abcde":
        data = example("broker-misconduct")
        data["acts"] = [act]
        validate_case("broker-misconduct", data)


def test_every_type_has_a_schema_version() -> None:
    for name, entry in CASE_TYPES.items():
        assert entry.name == name
        assert entry.version == "1"
        assert entry.model.case_type == name
