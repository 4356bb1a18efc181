"""The peer transport: signed HTTP requests between the two nodes.

:mod:`gateway.peer.server` is the aiohttp application a node serves to its
peer, :mod:`gateway.peer.client` the client the sender worker uses, and
:mod:`gateway.tls` builds the TLS contexts both sides share. The signing
rule itself is pure and lives in :mod:`gateway.core.peer_auth`.
"""
