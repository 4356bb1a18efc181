"""The compliance and administration web console (SPEC §8a), served under ``/console/``."""

from gateway.console.app import CONSOLE_PREFIX, add_console, is_console_path

__all__ = ["CONSOLE_PREFIX", "add_console", "is_console_path"]
