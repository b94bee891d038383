"""Unused TCP ports on loopback, for process groups and daemons the tests start."""

from __future__ import annotations

from nemo_dcod.parallel.launch import free_port

__all__ = ["free_port", "free_ports"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct unused ports (``free_port`` may hand a just-closed port out again)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
