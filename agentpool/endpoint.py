"""Endpoint strings: which ones are valid, and what they name.

One table, :data:`SCHEMES`, says which ``scheme://`` (or ``unix:``) prefixes exist and whether
they name a socket path or a ``host:port``; a transport added later registers its scheme there.
Syntax errors raise :class:`~agentpool.errors.InvalidEndpoint` at once, so an endpoint that can
never work is refused when the agent is added rather than retried forever.
"""

from __future__ import annotations

import re

from .errors import InvalidEndpoint

__all__ = ["PATH", "SCHEMES", "parse_endpoint"]

PATH = "path"
HOST_PORT = "host:port"

#: scheme -> what follows it: a Unix socket ``path`` or a ``host:port``.
SCHEMES: dict[str, str] = {
    "unix": PATH,
    "tcp": HOST_PORT,
    "tls": HOST_PORT,
    "grpc": HOST_PORT,
    "grpcs": HOST_PORT,
}

# Linux sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)\Z", re.DOTALL)
_FORMS = "expected unix:/path, /path, name.sock, tcp://host:port or host:port"


def parse_endpoint(endpoint: str) -> tuple[str, str | None, int]:
    """Split an endpoint into ``(scheme, host_or_path, port)``; raise InvalidEndpoint if bad.

    ``unix:/p``, ``unix:///p``, ``/abs/path`` and ``x.sock`` are Unix sockets
    (``("unix", path, 0)``); ``tcp://host:port`` and ``host:port`` are TCP
    (``("tcp", host, port)``); other schemes of :data:`SCHEMES` keep their name
    (``("grpc", host, port)``). IPv6 hosts are written in brackets (``[::1]:50051``).
    """
    if not isinstance(endpoint, str):
        raise InvalidEndpoint(repr(endpoint), f"must be a string, not {type(endpoint).__name__}")
    ep = endpoint.strip()
    if not ep:
        raise InvalidEndpoint(endpoint, f"empty ({_FORMS})")
    scheme = ""
    rest = ep
    if "://" in ep:
        scheme, _, rest = ep.partition("://")
        if scheme.lower() == "unix":
            rest = "/" + rest.lstrip("/") if rest.startswith("/") else rest
    else:
        m = _SCHEME.match(ep)
        if m is not None and (m.group(1).lower() in SCHEMES or m.group(2).startswith("/")):
            scheme, rest = m.group(1), m.group(2)
            if rest.startswith("//"):
                rest = rest[2:]
    if scheme:
        scheme = scheme.lower()
        kind = SCHEMES.get(scheme)
        if kind is None:
            known = ", ".join(f"{s}:" for s in SCHEMES)
            raise InvalidEndpoint(endpoint, f"unknown scheme {scheme!r} (known: {known})")
        if kind == PATH:
            return scheme, _check_path(endpoint, rest), 0
        host, port = _host_port(endpoint, rest)
        return scheme, host, port
    if ep.startswith("/") or ep.endswith(".sock"):
        return "unix", _check_path(endpoint, ep), 0
    host, port = _host_port(endpoint, ep)
    return "tcp", host, port


def _check_path(endpoint: str, path: str) -> str:
    if not path:
        raise InvalidEndpoint(endpoint, "empty socket path")
    if "\0" in path:
        raise InvalidEndpoint(endpoint, "socket path contains a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) > _MAX_UNIX_PATH:
        raise InvalidEndpoint(
            endpoint, f"socket path longer than {_MAX_UNIX_PATH} bytes (the Unix socket limit)"
        )
    return path


def _host_port(endpoint: str, text: str) -> tuple[str, int]:
    host, sep, port_s = text.rpartition(":")
    if not sep:
        raise InvalidEndpoint(endpoint, f"no port ({_FORMS})")
    if not host:
        raise InvalidEndpoint(endpoint, f"no host ({_FORMS})")
    if not port_s:
        raise InvalidEndpoint(endpoint, "empty port")
    if not port_s.isdigit():
        raise InvalidEndpoint(endpoint, f"port {port_s!r} is not a number")
    port = int(port_s)
    if not 0 < port < 65536:
        raise InvalidEndpoint(endpoint, f"port {port} out of range 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise InvalidEndpoint(endpoint, "empty IPv6 address")
    elif "[" in host or "]" in host or "/" in host or any(c.isspace() for c in host):
        raise InvalidEndpoint(endpoint, f"bad host {host!r}")
    return host, port
