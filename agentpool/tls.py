"""TLS and mutual TLS for TCP agents: contexts, certificate reload, typed handshake failures.

:func:`client_context` (proxy side) and :func:`server_context` (agent side, reverse listener)
build a :class:`ReloadableContext`: an :class:`ssl.SSLContext` that every asyncio/uvloop API
accepts (``ssl=``), whose certificates can be re-read from disk with :meth:`~ReloadableContext.
reload`. A reload builds a fresh inner context; new connections use it, established
connections keep the session they negotiated, so nothing is dropped.

Handshake failures become :class:`TLSHandshakeFailed` (a :class:`~agentpool.errors.
ConnectionFailed`) whose ``tls_reason`` names the cause (:data:`REASONS`), and are counted
per reason in :func:`handshake_failures` (exported as
``agent_protocol_tls_handshake_failures_total`` by ``AgentPool.export_prometheus``).
See docs/deployment.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConnectionFailed, Timeout

__all__ = [
    "REASONS",
    "ReloadableContext",
    "TLSFailureCollector",
    "TLSHandshakeFailed",
    "TLSStream",
    "classify",
    "client_context",
    "default_client_context",
    "handshake_error",
    "handshake_failures",
    "peer_identity",
    "prometheus_text",
    "record_failure",
    "server_context",
    "socket_tls",
]

log = logging.getLogger("agentpool.tls")

#: Failure reasons, in the order they are exported.
REASONS = (
    "unknown_ca",
    "hostname_mismatch",
    "no_client_certificate",
    "expired",
    "not_yet_valid",
    "bad_certificate",
    "not_tls",
    "other",
)

_DESCRIPTIONS = {
    "unknown_ca": "certificate not signed by a trusted CA",
    "hostname_mismatch": "certificate does not match the host name",
    "no_client_certificate": "no client certificate presented",
    "expired": "certificate expired",
    "not_yet_valid": "certificate not yet valid",
    "bad_certificate": "certificate rejected",
    "not_tls": "peer does not speak TLS",
    "other": "handshake failed",
}

# OpenSSL X509_V_ERR_* codes seen on SSLCertVerificationError.verify_code
_VERIFY_CODES = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    62: "hostname_mismatch",
    64: "hostname_mismatch",  # IP address mismatch
}

# OpenSSL reason strings: alerts sent by the peer, or local failures.
_REASON_PATTERNS: tuple[tuple[str, str, bool], ...] = (
    ("ALERT_UNKNOWN_CA", "unknown_ca", True),
    ("CERTIFICATE_REQUIRED", "no_client_certificate", True),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_certificate", False),
    ("ALERT_CERTIFICATE_EXPIRED", "expired", True),
    ("ALERT_BAD_CERTIFICATE", "bad_certificate", True),
    ("ALERT_CERTIFICATE_UNKNOWN", "bad_certificate", True),
    ("WRONG_VERSION_NUMBER", "not_tls", False),
    ("UNEXPECTED_EOF_WHILE_READING", "other", True),
    ("HTTP_REQUEST", "not_tls", False),
)
_SSL_TAG = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")

_lock = threading.Lock()
_failures: dict[str, int] = dict.fromkeys(REASONS, 0)
_in_use = False


class TLSHandshakeFailed(ConnectionFailed):
    """A TLS handshake failed; ``tls_reason`` is one of :data:`REASONS`.

    ``by_peer`` is True when the peer rejected us (an alert), False when we rejected the peer.
    """

    def __init__(self, endpoint: str, tls_reason: str, detail: str, *, by_peer: bool) -> None:
        who = "peer rejected our certificate" if by_peer else "peer certificate rejected"
        super().__init__(
            f"TLS handshake with {endpoint} failed: {_DESCRIPTIONS[tls_reason]} "
            f"({tls_reason}; {who}: {detail})"
        )
        self.endpoint = endpoint
        self.tls_reason = tls_reason
        self.by_peer = by_peer
        self.detail = detail


def classify(error: BaseException | str) -> tuple[str, bool] | None:
    """``(reason, by_peer)`` for an SSL error (or its message), None if it is not one."""
    code = getattr(error, "verify_code", None)
    if isinstance(code, int) and isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(code, "bad_certificate"), False
    tag = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    if not isinstance(tag, str):
        m = _SSL_TAG.search(str(error))
        if m is None:
            if isinstance(error, ssl.SSLError):
                return "other", False
            return None
        tag = m.group(1)
    if tag == "CERTIFICATE_VERIFY_FAILED":
        text = str(error)
        for needle, reason in (
            ("expired", "expired"),
            ("not yet valid", "not_yet_valid"),
            ("Hostname mismatch", "hostname_mismatch"),
            ("IP address mismatch", "hostname_mismatch"),
        ):
            if needle in text:
                return reason, False
        return "unknown_ca", False
    for needle, reason, by_peer in _REASON_PATTERNS:
        if needle in tag:
            return reason, by_peer
    return "other", "ALERT" in tag


def handshake_error(
    endpoint: str, error: BaseException, *, count: bool = True
) -> TLSHandshakeFailed | None:
    """The typed error for ``error`` if it is a TLS failure (counted unless ``count`` is
    False), else None."""
    if isinstance(error, TLSHandshakeFailed):
        return error
    found = classify(error)
    if found is None:
        if not isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return None
        if count:
            record_failure("other")
        return TLSHandshakeFailed(
            endpoint, "other", "peer closed the connection (does it serve TLS?)", by_peer=True
        )
    reason, by_peer = found
    detail = getattr(error, "verify_message", None) or str(error)
    if count:
        record_failure(reason)
    return TLSHandshakeFailed(endpoint, reason, str(detail), by_peer=by_peer)


def record_failure(reason: str) -> None:
    """Count one failed handshake (unknown reasons count as ``other``)."""
    global _in_use
    with _lock:
        _in_use = True
        key = reason if reason in _failures else "other"
        _failures[key] += 1


def handshake_failures() -> dict[str, int]:
    """Failed TLS handshakes in this process, by reason (every reason present)."""
    with _lock:
        return dict(_failures)


def mark_in_use() -> None:
    """Note that this process uses TLS, so the failure counter is exported (even at zero)."""
    global _in_use
    _in_use = True


def prometheus_text(prefix: str = "agent_protocol") -> str:
    """The failure counter in Prometheus text format; empty while no TLS is in use."""
    if not _in_use:
        return ""
    name = f"{prefix}_tls_handshake_failures_total"
    lines = [
        f"# HELP {name} TLS handshakes that failed, by reason",
        f"# TYPE {name} counter",
    ]
    for reason, count in handshake_failures().items():
        lines.append(f'{name}{{reason="{reason}"}} {count}')
    return "\n".join(lines) + "\n"


class TLSFailureCollector:
    """prometheus_client collector for :func:`handshake_failures` (single-process registries;
    register it yourself next to ``AgentPoolCollector``)."""

    def __init__(self, prefix: str = "agent_protocol") -> None:
        self.prefix = prefix

    def describe(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        name = f"{self.prefix}_tls_handshake_failures"
        return [
            CounterMetricFamily(name, "TLS handshakes that failed, by reason", labels=["reason"])
        ]

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(
            f"{self.prefix}_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            labels=["reason"],
        )
        for reason, count in handshake_failures().items():
            fam.add_metric([reason], float(count))
        return [fam]


def peer_identity(peercert: Mapping[str, Any] | None) -> str | None:
    """The identity in a verified peer certificate: first SAN URI, else DNS name, else CN."""
    if not peercert:
        return None
    san = peercert.get("subjectAltName") or ()
    for kind in ("URI", "DNS"):
        for k, v in san:
            if k == kind and v:
                return str(v)
    for rdn in peercert.get("subject") or ():
        for k, v in rdn:
            if k == "commonName" and v:
                return str(v)
    return None


_Paths = tuple[str | None, ...]


class _AlertingSSLObject(ssl.SSLObject):
    """Server side: send the TLS alert before the connection closes.

    asyncio and uvloop abort the transport as soon as ``do_handshake`` raises, dropping the
    alert OpenSSL queued, so the client only sees the connection close and cannot tell why.
    The first failure is reported as "want read": the loop flushes the alert and waits; the
    client then closes (or the next call raises the stored error).
    """

    _failure: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            super().do_handshake()
        except ssl.SSLWantReadError:
            raise
        except ssl.SSLError as exc:
            self._failure = exc
            raise ssl.SSLWantReadError("handshake failed; alert queued") from exc


class ReloadableContext(ssl.SSLContext):
    """An :class:`ssl.SSLContext` whose connections use the newest of a series of contexts.

    It delegates :meth:`wrap_bio` / :meth:`wrap_socket` (what asyncio and uvloop call for
    each connection) to an inner context built by ``build``. :meth:`reload` builds a new
    inner context, so new connections present the new certificate and trust the new CAs,
    while established connections keep theirs. ``server_name`` overrides the name checked
    against (and sent in SNI to) the server's certificate. ``files`` are watched by
    :meth:`reload_if_changed`.

    Configure it through ``build`` (a function returning a configured context): settings
    made on this object itself (``load_cert_chain``, ``set_ciphers``...) are not used.
    """

    _inner: ssl.SSLContext

    def __new__(
        cls,
        build: Callable[[], ssl.SSLContext],
        *,
        server_side: bool = False,
        server_name: str | None = None,
        files: _Paths = (),
    ) -> ReloadableContext:
        proto = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
        return super().__new__(cls, proto)

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        *,
        server_side: bool = False,
        server_name: str | None = None,
        files: _Paths = (),
    ) -> None:
        self._build = build
        self.server_side = server_side
        self.server_name = server_name
        self._files = tuple(f for f in files if f)
        self._mtimes = self._stat()
        self.generation = 0
        self._inner = build()
        self.check_hostname = self._inner.check_hostname
        self.verify_mode = self._inner.verify_mode
        mark_in_use()

    @property
    def current(self) -> ssl.SSLContext:
        """The context new connections use."""
        return self._inner

    def _stat(self) -> tuple[float, ...]:
        out = []
        for f in self._files:
            try:
                out.append(os.stat(f).st_mtime_ns / 1e9)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def reload(self) -> None:
        """Re-read the certificate files into a fresh inner context (a failure keeps the old)."""
        mtimes = self._stat()
        self._inner = self._build()
        self._mtimes = mtimes
        self.generation += 1
        log.info("TLS context reloaded (generation %d)", self.generation)

    def reload_if_changed(self) -> bool:
        """:meth:`reload` when a certificate, key or CA file changed on disk; True if it did."""
        if self._stat() == self._mtimes:
            return False
        self.reload()
        return True

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if self.server_name is not None and not server_side:
            server_hostname = self.server_name
        return self._inner.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )

    def wrap_socket(  # type: ignore[override]
        self, sock: Any, server_side: bool = False, *args: Any, **kwargs: Any
    ) -> ssl.SSLSocket:
        if self.server_name is not None and not server_side:
            kwargs["server_hostname"] = self.server_name
        return self._inner.wrap_socket(sock, server_side, *args, **kwargs)


def client_context(
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    verify: bool = True,
    password: str | None = None,
) -> ReloadableContext:
    """A proxy-side context: trust ``ca`` (a PEM file; system CAs when None), present
    ``cert``/``key`` for mutual TLS, check the server against ``server_name`` (default: the
    endpoint's host). ``verify=False`` disables certificate and host name checks (tests only).
    """
    if key is not None and cert is None:
        raise ValueError("key given without cert")

    def build() -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(cert, key, password)
        return ctx

    return ReloadableContext(build, server_name=server_name, files=(ca, cert, key))


_default_client: ReloadableContext | None = None


def default_client_context() -> ReloadableContext:
    """The context for ``tls://`` endpoints given without ``ssl=``: system CAs, no client
    certificate. Built once (loading the system CAs takes tens of milliseconds)."""
    global _default_client
    if _default_client is None:
        _default_client = client_context()
    return _default_client


def server_context(
    *,
    cert: str,
    key: str | None = None,
    ca: str | None = None,
    require_client_cert: bool | None = None,
    password: str | None = None,
) -> ReloadableContext:
    """An agent-side (or reverse listener) context presenting ``cert``/``key``.

    With ``ca`` the peer's client certificate is verified against it and, unless
    ``require_client_cert=False``, required (mutual TLS).
    """
    required = ca is not None if require_client_cert is None else require_client_cert
    if required and ca is None:
        raise ValueError("require_client_cert needs a ca to verify client certificates")

    def build() -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
        ctx.sslobject_class = _AlertingSSLObject
        ctx.load_cert_chain(cert, key, password)
        if ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        return ctx

    return ReloadableContext(build, server_side=True, files=(ca, cert, key))


class _CapturingContext(ssl.SSLContext):
    """One accept's view of a server context: remembers the SSL object it hands out, so the
    reason of a failed handshake can be read even after the loop reported a plain reset."""

    sslobj: ssl.SSLObject | None = None

    def __new__(cls, target: ssl.SSLContext, server_side: bool) -> _CapturingContext:
        proto = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
        return super().__new__(cls, proto)

    def __init__(self, target: ssl.SSLContext, server_side: bool) -> None:
        self._target = target
        self.check_hostname = target.check_hostname
        self.verify_mode = target.verify_mode

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        self.sslobj = self._target.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        return self.sslobj

    def failure(self) -> BaseException | None:
        obj = self.sslobj
        return getattr(obj, "_failure", None) if obj is not None else None


class _Buffer(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = self.closed or ConnectionResetError("peer closed the connection")
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closed or exc or ConnectionResetError("connection closed")
        self._wake()


class TLSStream:
    """A TLS connection read frame by frame (registration) before its transport is handed
    to a protocol with :meth:`detach`. Behaves like a socket for the reverse handshake."""

    def __init__(self, transport: asyncio.Transport, buffer: _Buffer, peer: str) -> None:
        self.transport = transport
        self._buffer = buffer
        self.peer = peer

    @property
    def peercert(self) -> dict[str, Any] | None:
        cert = self.transport.get_extra_info("peercert")
        return cert if isinstance(cert, dict) else None

    @property
    def identity(self) -> str | None:
        """The verified peer certificate's identity (:func:`peer_identity`)."""
        return peer_identity(self.peercert)

    async def read_exactly(self, n: int) -> bytes:
        buf = self._buffer
        while len(buf.data) < n:
            if buf.closed is not None:
                if isinstance(buf.closed, OSError):
                    raise buf.closed
                raise ConnectionResetError("peer closed the connection")
            buf.waiter = asyncio.get_running_loop().create_future()
            try:
                await buf.waiter
            finally:
                buf.waiter = None
        out = bytes(buf.data[:n])
        del buf.data[:n]
        return out

    def write(self, data: bytes) -> None:
        if self._buffer.closed is not None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    def detach(self, protocol: asyncio.BaseProtocol) -> bytes:
        """Hand the transport to ``protocol`` (its connection_made is called); returns what
        was received beyond the frames read so far."""
        rest = bytes(self._buffer.data)
        self._buffer.data.clear()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        return rest

    def close(self) -> None:
        self.transport.abort()


async def socket_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    timeout: float,
    *,
    server_side: bool = True,
    server_hostname: str | None = None,
) -> TLSStream:
    """Run the TLS handshake on a connected socket within ``timeout`` (the reverse
    listener's accepted sockets, ``server_side``; an agent dialling in, client side).

    A failure raises :class:`TLSHandshakeFailed` (counted on the server side, the proxy's).
    """
    loop = asyncio.get_running_loop()
    try:
        peer = sock.getpeername()
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
    except OSError:
        where = "peer"
    capture = _CapturingContext(context, server_side)
    buffer = _Buffer()
    try:
        if server_side:
            transport, _ = await loop.connect_accepted_socket(
                lambda: buffer, sock, ssl=capture, ssl_handshake_timeout=timeout
            )
        else:
            transport, _ = await loop.create_connection(
                lambda: buffer,
                sock=sock,
                ssl=capture,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
    except (OSError, asyncio.TimeoutError) as exc:
        with contextlib.suppress(OSError):
            sock.close()
        error = capture.failure()
        if error is None and (isinstance(exc, asyncio.TimeoutError) or "longer" in str(exc)):
            raise Timeout(timeout) from exc
        error = error or exc
        tls_error = handshake_error(where, error, count=server_side)
        if tls_error is None:
            raise ConnectionFailed(f"TLS handshake with {where} failed: {exc!r}") from exc
        raise tls_error from exc
    return TLSStream(transport, buffer, where)
