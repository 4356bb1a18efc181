"""Ports for the demo's and the tests' serving nodes come from below the ephemeral range.

A port chosen now and bound later (by a ``gateway serve`` started afterwards, and
again after each restart) must not be one the kernel may meanwhile hand to an
outgoing connection as its local end.
"""

from __future__ import annotations

import socket

from gateway.demo.harness import _ephemeral_low, free_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound() -> None:
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < low for port in ports)
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
