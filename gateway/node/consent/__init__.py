"""The consent protocol and disclosure, joining the consent core to storage, exchange and ledger.

* :mod:`~gateway.node.consent.protocol`: this node's own steps (request, grant, deny, revoke);
* :mod:`~gateway.node.consent.receive`: applying received consent documents and refusals;
* :mod:`~gateway.node.consent.queries`: the consent state of bundles, the list of consents;
* :mod:`~gateway.node.consent.disclosure`: onward disclosure under the consent rule;
* :mod:`~gateway.node.consent.records` and :mod:`~gateway.node.consent.common`: shared by them.
"""
