"""User tokens: format, entropy, constant-time check, and roles."""

from __future__ import annotations

import pytest

from gateway.core.roles import ACTIONS, Role, authorize_role
from gateway.core.tokens import issue_token, parse_token, token_matches
from gateway.errors import AccessDenied


def test_issued_tokens_are_unique_and_verify() -> None:
    tokens = [issue_token() for _ in range(50)]
    assert len({t.text for t in tokens}) == 50
    for token in tokens:
        token_id, secret = parse_token(token.text)
        assert token_id == token.token_id
        assert token_matches(token.digest, token_id, secret)


def test_a_changed_secret_does_not_match() -> None:
    token = issue_token()
    token_id, secret = parse_token(token.text)
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    assert not token_matches(token.digest, token_id, flipped)


def test_token_text_is_not_in_its_repr() -> None:
    token = issue_token()
    assert token.text not in repr(token)


def test_fixed_randomness_gives_fixed_tokens() -> None:
    token = issue_token(_random=lambda n: bytes(range(n)))
    assert token.text == "ssw_0001020304050607_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssw_",
        "ssw_00_x",
        "xyz_0001020304050607_" + "A" * 43,
        "ssw_0001020304050607_" + "A" * 42,
        "ssw_0001020304050607_" + "!" * 43,
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(AccessDenied, match="malformed"):
        parse_token(text)


@pytest.mark.parametrize(("action", "allowed"), sorted(ACTIONS.items()))
def test_every_action_allows_exactly_its_roles(action: str, allowed: frozenset[Role]) -> None:
    for role in Role:
        if role in allowed:
            authorize_role(role, action)
        else:
            with pytest.raises(AccessDenied, match="needs the"):
                authorize_role(role, action)


def test_unknown_actions_are_refused_for_everyone() -> None:
    for role in Role:
        with pytest.raises(AccessDenied, match="unknown action"):
            authorize_role(role, "format-disk")
