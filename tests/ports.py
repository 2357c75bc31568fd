"""Free loopback ports for the servers tests start.

A port the kernel hands out for ``bind(0)`` is one of its ephemeral ports: between the
moment a test reads it and the moment the server binds it, any outgoing connection on the
machine (a client of Redis, PostgreSQL, ...) may take it as its own local port, and the
server fails to start ("Address already in use"). The ports handed out here are below
the ephemeral range, which outgoing connections never use, checked free with a bind, and
never handed out twice by one test process.
"""

from __future__ import annotations

import random
import socket

LOWEST = 20_000
"""Below this are the ports of the services a machine runs (5432, 6379, 8000, ...)."""

_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # the Linux default


def free_port() -> int:
    """A loopback TCP port that is free now and that no outgoing connection will take."""
    highest = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(LOWEST, highest) if highest > LOWEST else 0
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _given.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")
