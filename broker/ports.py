"""TCP port helpers used before starting a listener."""

from __future__ import annotations

import errno
import socket


def _bind_probe(host: str, port: int) -> None:
    """Bind (without listening) every address ``host`` resolves to, as a server would."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, socktype, proto, _canon, sockaddr in infos:
        with socket.socket(family, socktype, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)


def port_is_free(host: str, port: int) -> bool:
    """Return True if a server could bind ``host:port`` right now.

    Binding uses ``SO_REUSEADDR`` like a server does, so sockets lingering in
    TIME_WAIT do not count as taken. Only "address in use" yields False; any
    other failure (unknown host, address not local, privileged port) is raised
    as ``OSError`` so it is not misreported as a busy port.
    """
    try:
        _bind_probe(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port on ``host`` that the kernel currently considers unused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
