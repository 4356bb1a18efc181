"""The thin client of user commands: the running node's local API, with a token.

Standard library only (``http.client`` over the home's Unix socket, or TCP /
HTTPS with ``--api-url``); nothing here opens a database, unlocks a key or
imports the web server. See :mod:`gateway.client.transport` (requests and
the mapping of answers to :mod:`gateway.errors`), :mod:`gateway.client.files`
and :mod:`gateway.client.framing` (decrypted files received as a stream),
:mod:`gateway.client.upload` (attachments sent as a stream).
"""

from __future__ import annotations

__all__: list[str] = []
