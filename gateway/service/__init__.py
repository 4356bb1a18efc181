"""The running service: what ``gateway serve`` composes above node, peer and api.

:mod:`gateway.service.root` is the composition root (:class:`Service`);
:func:`serve` is the whole of ``gateway serve`` after its arguments are parsed.
"""

from __future__ import annotations

from gateway.service.root import DRAIN_SECONDS, Announce, ApiSite, Service
from gateway.service.serve import serve

__all__ = ["DRAIN_SECONDS", "Announce", "ApiSite", "Service", "serve"]
