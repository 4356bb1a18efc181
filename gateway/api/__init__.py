"""The local API for users (officers, administrators, compliance officers)."""

from __future__ import annotations

from gateway.api.app import all_routes, create_api_app

__all__ = ["all_routes", "create_api_app"]
