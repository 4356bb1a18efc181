"""Random protocol runs between two simulated nodes against a plain oracle of SPEC §7.

Two nodes (jp, pk) exchange case bundles and the consent protocol's messages
(request, grant, denial, revocation) through a network that delivers pending
messages in any order. Each node keeps only what the pure core gives it:
verified grants as :class:`ConsentState`, revocations as they arrive, uses
as disclosures spend them. After every disclosure attempt the test compares
the core's decision with an oracle written from the specification's words
("a valid consent covers every item, that recipient and that purpose, is
unexpired, unrevoked and has uses left, or the item is not confidential, or
the recipient is internal, or the item is the node's own"), and checks that
the attempt left exactly one ledger entry of the right kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import nacl.signing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.core.consent import (
    ConsentGrant,
    ConsentSignatureInvalid,
    ConsentState,
    DisclosureItem,
    EntryKind,
    SignedGrant,
    decide_disclosure,
    sign_grant,
    verify_grant,
)

START = datetime(2026, 11, 1, tzinfo=UTC)
INTERNAL = {
    "jp": ("MOJ/ISA", "MOFA", "MHLW", "NPA"),
    "pk": ("MOP&HRD", "Bureau of Emigration and Overseas Employment"),
}
RECIPIENTS = ("MOFA", "mofa ", "MOP&HRD", "Embassy of Example", "embassy  of EXAMPLE", "Press")
THIRD_PARTIES = ("Embassy of Example", "embassy  of EXAMPLE", "Press")
PURPOSES = ("visa screening", "Visa  Screening", "press release")
OTHER = {"jp": "pk", "pk": "jp"}


def plain(text: str) -> str:
    """The oracle's own reading of "the same name": case and spacing do not count."""
    return " ".join(text.lower().split())


@dataclass
class OracleConsent:
    items: set[str]
    recipient: str
    purpose: str
    start: datetime
    end: datetime
    max_uses: int | None
    uses: int = 0
    revoked: bool = False


@dataclass
class SimNode:
    name: str
    key: nacl.signing.SigningKey
    items: dict[str, DisclosureItem] = field(default_factory=dict)
    incoming_requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued: dict[str, ConsentGrant] = field(default_factory=dict)
    issued_revoked: set[str] = field(default_factory=set)
    consents: dict[str, ConsentState] = field(default_factory=dict)
    revoked_ids: set[str] = field(default_factory=set)
    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    oracle: dict[str, OracleConsent] = field(default_factory=dict)


class ConsentProtocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.nodes = {
            "jp": SimNode("jp", nacl.signing.SigningKey(b"j" * 32)),
            "pk": SimNode("pk", nacl.signing.SigningKey(b"p" * 32)),
        }
        self.network: list[tuple[str, str, Any]] = []  # (to, kind, payload)
        self.counter = 0
        self.attempts = {"jp": 0, "pk": 0}

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def _post(self, to: str, kind: str, payload: Any, data: st.DataObject) -> None:
        """Send a message: delivered at once, or left in the network for ``receive``."""
        if data.draw(st.booleans(), label="delivered at once"):
            self._deliver(to, kind, payload)
        else:
            self.network.append((to, kind, payload))

    # -- the exchange -------------------------------------------------------

    @initialize()
    def both_sides_share_cases(self) -> None:
        for origin, marking in (("jp", "confidential"), ("jp", "confidential"), ("pk", None)):
            bundle_id = self._next(origin)
            item = DisclosureItem(bundle_id, origin, marking)
            self.nodes[origin].items[bundle_id] = item
            self._deliver(OTHER[origin], "case", item)

    @rule(origin=st.sampled_from(["jp", "pk"]), public=st.booleans(), data=st.data())
    def send_case(self, origin: str, public: bool, data: st.DataObject) -> None:
        bundle_id = self._next(origin)
        item = DisclosureItem(bundle_id, origin, "public" if public else "confidential")
        self.nodes[origin].items[bundle_id] = item
        self._post(OTHER[origin], "case", item, data)

    @precondition(lambda self: self.network)
    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        """The network delivers a pending message, not necessarily the oldest."""
        index = data.draw(st.integers(0, len(self.network) - 1), label="message")
        to, kind, payload = self.network.pop(index)
        self._deliver(to, kind, payload)

    def _deliver(self, to: str, kind: str, payload: Any) -> None:
        node = self.nodes[to]
        if kind == "case":
            node.items[payload.bundle_id] = payload
        elif kind == "request":
            node.incoming_requests[payload["request_id"]] = payload
        elif kind == "grant":
            self._receive_grant(node, payload)
        elif kind == "revocation":
            node.revoked_ids.add(payload)
            if payload in node.consents:
                node.consents[payload] = replace(node.consents[payload], revoked_at=self.now)
            if payload in node.oracle:
                node.oracle[payload].revoked = True
        # a denial changes nothing a disclosure depends on

    def _receive_grant(self, node: SimNode, signed: SignedGrant) -> None:
        peer = self.nodes[OTHER[node.name]]
        try:
            grant = verify_grant(
                signed,
                public_key=bytes(peer.key.verify_key),
                key_id=f"k-{peer.name}",
                granting_node=peer.name,
            )
        except ConsentSignatureInvalid:
            return  # refused: a forged grant never becomes a consent
        revoked = grant.consent_id in node.revoked_ids
        node.consents[grant.consent_id] = ConsentState(
            grant, revoked_at=self.now if revoked else None
        )
        node.oracle[grant.consent_id] = OracleConsent(
            items=set(grant.items),
            recipient=plain(grant.third_party),
            purpose=plain(grant.purpose),
            start=grant.valid_from,
            end=grant.valid_until,
            max_uses=grant.max_uses,
            revoked=revoked,
        )

    # -- the consent protocol ------------------------------------------------

    @rule(
        node=st.sampled_from(["jp", "pk"]),
        data=st.data(),
        recipient=st.sampled_from(THIRD_PARTIES),
        purpose=st.sampled_from(PURPOSES),
    )
    def request(self, node: str, data: st.DataObject, recipient: str, purpose: str) -> None:
        peer_items = sorted(b for b, i in self.nodes[node].items.items() if i.origin_node != node)
        if not peer_items:
            return
        chosen = data.draw(
            st.lists(st.sampled_from(peer_items), min_size=1, max_size=3, unique=True),
            label="items",
        )
        request = {
            "request_id": self._next("req"),
            "items": tuple(sorted(chosen)),
            "third_party": recipient,
            "purpose": purpose,
        }
        self._post(OTHER[node], "request", request, data)

    @rule(
        node=st.sampled_from(["jp", "pk"]),
        data=st.data(),
        days=st.integers(1, 40),
        max_uses=st.one_of(st.none(), st.integers(1, 3)),
    )
    def grant(self, node: str, data: st.DataObject, days: int, max_uses: int | None) -> None:
        origin = self.nodes[node]
        if not origin.incoming_requests:
            return
        request_id = data.draw(st.sampled_from(sorted(origin.incoming_requests)), label="req")
        request = origin.incoming_requests.pop(request_id)
        grant = ConsentGrant(
            consent_id=self._next(f"c{node}"),
            request_id=request_id,
            items=request["items"],
            third_party=request["third_party"],
            purpose=request["purpose"],
            valid_from=self.now,
            valid_until=self.now + timedelta(days=days),
            max_uses=max_uses,
            conditions="",
            granting_officer="officer",
            granting_node=node,
            key_id=f"k-{node}",
        )
        origin.issued[grant.consent_id] = grant
        signed = sign_grant(grant, lambda message: origin.key.sign(message).signature)
        self._post(OTHER[node], "grant", signed, data)

    @rule(node=st.sampled_from(["jp", "pk"]), data=st.data())
    def deny(self, node: str, data: st.DataObject) -> None:
        origin = self.nodes[node]
        if not origin.incoming_requests:
            return
        request_id = data.draw(st.sampled_from(sorted(origin.incoming_requests)), label="req")
        del origin.incoming_requests[request_id]
        self._post(OTHER[node], "denial", request_id, data)

    @rule(node=st.sampled_from(["jp", "pk"]), data=st.data())
    def revoke(self, node: str, data: st.DataObject) -> None:
        origin = self.nodes[node]
        open_ = sorted(set(origin.issued) - origin.issued_revoked)
        if not open_:
            return
        consent_id = data.draw(st.sampled_from(open_), label="consent")
        origin.issued_revoked.add(consent_id)
        self._post(OTHER[node], "revocation", consent_id, data)

    @rule(node=st.sampled_from(["jp", "pk"]), data=st.data())
    def forge_grant(self, node: str, data: st.DataObject) -> None:
        """Someone without the originator's key sends a grant for the peer's items."""
        receiver = self.nodes[node]
        peer_items = sorted(b for b, i in receiver.items.items() if i.origin_node != node)
        if not peer_items:
            return
        chosen = data.draw(st.sampled_from(peer_items), label="item")
        forged = ConsentGrant(
            consent_id=self._next("forged"),
            request_id="req-0",
            items=(chosen,),
            third_party="Press",
            purpose="press release",
            valid_from=self.now,
            valid_until=self.now + timedelta(days=400),
            max_uses=None,
            conditions="",
            granting_officer="nobody",
            granting_node=OTHER[node],
            key_id=f"k-{OTHER[node]}",
        )
        mallory = nacl.signing.SigningKey(b"m" * 32)
        signed = sign_grant(forged, lambda message: mallory.sign(message).signature)
        self._post(node, "grant", signed, data)

    @rule(hours=st.one_of(st.integers(1, 48), st.integers(1, 24 * 45)))
    def expire(self, hours: int) -> None:
        self.now += timedelta(hours=hours)

    # -- the disclosure ---------------------------------------------------------

    @rule(
        node=st.sampled_from(["jp", "pk"]),
        data=st.data(),
        recipient=st.sampled_from(RECIPIENTS),
        purpose=st.sampled_from(PURPOSES),
    )
    def disclose(self, node: str, data: st.DataObject, recipient: str, purpose: str) -> None:
        sim = self.nodes[node]
        if not sim.items:
            return
        chosen = data.draw(
            st.lists(st.sampled_from(sorted(sim.items)), min_size=1, max_size=4, unique=True),
            label="items",
        )
        if sim.consents and data.draw(
            st.sampled_from([True, True, False]), label="aim at a consent held"
        ):
            # Most random attempts miss every consent; aim half of them at one
            # held, keeping some of its items and maybe its recipient and purpose.
            target = sim.consents[data.draw(st.sampled_from(sorted(sim.consents)))].grant
            held = [b for b in target.items if b in sim.items]
            if held:
                chosen = data.draw(
                    st.lists(st.sampled_from(held), min_size=1, max_size=3, unique=True)
                )
                if data.draw(st.sampled_from([True, True, True, False]), label="its recipient"):
                    recipient = target.third_party
                if data.draw(st.sampled_from([True, True, True, False]), label="its purpose"):
                    purpose = target.purpose
        decision = decide_disclosure(
            [sim.items[b] for b in chosen],
            recipient,
            purpose,
            own_node=node,
            internal_recipients=INTERNAL[node],
            consents=list(sim.consents.values()),
            now=self.now,
        )
        expected_allowed, expected_consent = self._oracle(sim, chosen, recipient, purpose)
        assert decision.allowed == expected_allowed, decision.explain()
        assert decision.consent_id == expected_consent
        if not decision.allowed:
            assert decision.missing, "a refusal names at least one missing item"
            event(f"blocked: {decision.missing[0].missing}")
        else:
            event("allowed by consent" if expected_consent else "allowed without consent")
        # one attempt, one entry, of the kind the oracle expects
        before = len(sim.entries)
        sim.entries.append((decision.entry_kind.value, decision.to_record()))
        self.attempts[node] += 1
        assert len(sim.entries) == before + 1
        internal = plain(recipient) in {plain(r) for r in INTERNAL[node]}
        if not expected_allowed:
            assert decision.entry_kind is EntryKind.BLOCKED
        elif internal:
            assert decision.entry_kind is EntryKind.INTERNAL
        else:
            assert decision.entry_kind is EntryKind.MADE
        if expected_consent is not None:
            state = sim.consents[expected_consent]
            sim.consents[expected_consent] = replace(state, uses_spent=state.uses_spent + 1)
            sim.oracle[expected_consent].uses += 1

    def _oracle(
        self, sim: SimNode, chosen: list[str], recipient: str, purpose: str
    ) -> tuple[bool, str | None]:
        internal = plain(recipient) in {plain(r) for r in INTERNAL[sim.name]}
        needing = {
            b
            for b in chosen
            if sim.items[b].origin_node != sim.name
            and sim.items[b].marking != "public"
            and not internal
        }
        if not needing:
            return True, None
        usable = []
        for consent_id, c in sim.oracle.items():
            if (
                needing <= c.items
                and c.recipient == plain(recipient)
                and c.purpose == plain(purpose)
                and c.start <= self.now < c.end
                and not c.revoked
                and (c.max_uses is None or c.uses < c.max_uses)
            ):
                usable.append((c.end, consent_id))
        if not usable:
            return False, None
        return True, min(usable)[1]

    @invariant()
    def every_attempt_left_one_entry(self) -> None:
        for name, node in self.nodes.items():
            assert len(node.entries) == self.attempts[name]

    @invariant()
    def uses_never_exceed_the_maximum(self) -> None:
        for node in self.nodes.values():
            for state in node.consents.values():
                if state.grant.max_uses is not None:
                    assert state.uses_spent <= state.grant.max_uses

    @invariant()
    def forged_grants_never_become_consents(self) -> None:
        for node in self.nodes.values():
            assert not any(cid.startswith("forged") for cid in node.consents)


ConsentProtocol.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_disclosure_allowed_exactly_when_spec_says = ConsentProtocol.TestCase
