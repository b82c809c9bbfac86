"""Free local TCP ports, for what mars-serve, its benchmark and its tests
start on this machine (Ray's head, Serve's HTTP port, Redis)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before
    it is bound again: good enough for a local server started right away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
