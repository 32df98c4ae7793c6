"""Pure-Python twin of the compiled codec helpers (``_codec.pxi``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

__all__ = ["HeadersEventEncoder", "ResponseFactory"]

_EVENT_SLOTS: Final = ("metadata", "method", "uri", "headers")
_METADATA_SLOTS: Final = (
    "correlation_id",
    "request_id",
    "client_ip",
    "client_port",
    "server_name",
    "protocol",
    "tls_version",
    "tls_cipher",
    "route_id",
    "upstream_id",
    "timestamp",
    "traceparent",
)
_CID_SAFE: Final = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_new = object.__new__


class ResponseFactory:
    """Builds fresh decoded AgentResponse objects for the proxy's decode hot path.

    ``make`` allocates the reply and assigns its eager slots directly (no dataclass
    ``__init__``), leaving the other fields to be built on first read from ``lazy``.
    ``match_json`` recognises the canonical JSON Allow reply (template head + correlation id +
    tail) and ``match_msgpack`` the MessagePack ones (head + fixstr id + tail) without parsing
    them: such a reply is the object plus its correlation id, nothing else.
    """

    __slots__ = ("_allow", "_head", "_hl", "_msgpack", "_resp_cls", "_tail", "_tl")

    def __init__(
        self,
        response_cls: type,
        allow: object,
        json_template: tuple[bytes, bytes],
        msgpack_templates: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        for name in ("version", "decision", "needs_more", "fail_open", "_lazy"):
            if not any(name in getattr(c, "__slots__", ()) for c in response_cls.__mro__):
                raise TypeError(f"{response_cls.__name__}.{name} is not a slot")
        self._resp_cls = response_cls
        self._allow = allow
        head, tail = json_template
        self._head = bytes(head)
        self._tail = bytes(tail)
        self._hl = len(head)
        self._tl = len(tail)
        self._msgpack = tuple((bytes(h), bytes(t)) for h, t in msgpack_templates)

    def make(self, version: object, decision: object, needs_more: object, lazy: object) -> Any:
        """A fresh reply; ``lazy`` is its cid (a plain Allow) or ``(build, ...)`` whose
        ``build(lazy)`` returns the lazy fields in declaration order."""
        r: Any = _new(self._resp_cls)
        r.version = version
        r.decision = decision
        r.needs_more = needs_more
        r.fail_open = False
        r._lazy = lazy
        return r

    def allow(self, cid: str) -> Any:
        """A fresh plain Allow whose ``audit.custom`` routes it to ``cid``."""
        return self.make(2, self._allow, False, cid)

    def cid_of(self, response: Any) -> Any:
        """The correlation id of a reply made by :meth:`allow` (still unread)."""
        return response._lazy

    def match(self, payload: object, mode: int) -> Any:
        """The plain Allow reply of ``payload`` (mode 1 JSON, 2 MessagePack), else None."""
        if payload.__class__ is not bytes:
            return None
        data: bytes = payload  # type: ignore[assignment]
        if mode == 1:
            if not data.startswith(self._head) or not data.endswith(self._tail):
                return None
            n = len(data)
            hl = self._hl
            if n < hl + self._tl:
                return None
            raw = data[hl : n - self._tl]
            if not (raw.isalnum() or _CID_SAFE.fullmatch(raw)):
                return None
            return self.make(2, self._allow, False, raw.decode("ascii"))
        for head, tail in self._msgpack:
            if data.startswith(head) and data.endswith(tail):
                n = len(head)
                if len(data) <= n:
                    return None
                h = data[n]
                if h & 0xE0 != 0xA0 or len(data) != n + 1 + (h & 0x1F) + len(tail):
                    return None
                try:
                    cid = data[n + 1 : n + 1 + (h & 0x1F)].decode("utf-8")
                except UnicodeDecodeError:
                    return None
                return self.make(2, self._allow, False, cid)
        return None

    def match_json(self, payload: object) -> tuple[str, Any] | None:
        """``(cid, Allow)`` for the canonical JSON Allow with a plain-ASCII id, else None."""
        r = self.match(payload, 1)
        return None if r is None else (r._lazy, r)

    def match_msgpack(self, payload: object) -> tuple[str, Any] | None:
        """``(cid, Allow)`` for a canonical MessagePack Allow (id < 32 bytes), else None."""
        r = self.match(payload, 2)
        return None if r is None else (r._lazy, r)


_REQUIRED_STR = ("client_ip", "protocol", "request_id", "timestamp")
_OPTIONAL_STR = ("route_id", "server_name", "tls_cipher", "tls_version", "upstream_id")


def _typed(md: dict[str, Any], correlation_id: object, traceparent: object) -> bool:
    port = md["client_port"]
    return (
        correlation_id.__class__ is str
        and port.__class__ is int
        and 0 <= port <= 0xFFFF
        and all(md[k].__class__ is str for k in _REQUIRED_STR)
        and all(md[k] is None or md[k].__class__ is str for k in _OPTIONAL_STR)
        and (traceparent is None or traceparent.__class__ is str)
    )


def _headers_typed(headers: object) -> bool:
    if headers.__class__ is not dict:
        return False
    for name, values in headers.items():  # type: ignore[attr-defined]
        if name.__class__ is not str or values.__class__ is not list:
            return False
        for v in values:
            if v.__class__ is not str:
                return False
    return True


class HeadersEventEncoder:
    """Encodes a RequestHeadersEvent to upstream's JSON, byte-identical to ``dumps`` of the map
    with sorted keys at every level.

    ``encode`` checks every field against its declared type, builds the maps in sorted key
    order and serializes them with ``dumps(obj, None, option)``; it returns None for anything
    else (a wrong type, another class, an unset slot): the caller then validates and takes
    the generic path.
    """

    __slots__ = ("_dumps", "_event_cls", "_md_cls", "_option")

    def __init__(
        self, event_cls: type, metadata_cls: type, dumps: Callable[..., bytes], option: Any
    ) -> None:
        if (
            getattr(event_cls, "__slots__", None) != _EVENT_SLOTS
            or getattr(metadata_cls, "__slots__", None) != _METADATA_SLOTS
        ):
            raise TypeError(
                "HeadersEventEncoder: unexpected RequestHeadersEvent/RequestMetadata slots"
            )
        self._event_cls = event_cls
        self._md_cls = metadata_cls
        self._dumps = dumps
        self._option = option

    def check(self, event: object, correlation_id: object) -> bool:
        """True when every field of ``event`` has exactly its declared type; False sends the
        caller to the validator that names the bad field."""
        if event.__class__ is not self._event_cls:
            return False
        e: Any = event
        try:
            m: Any = e.metadata
            md_cls: type = m.__class__
            if md_cls is not self._md_cls:
                return False
            md = {
                "client_ip": m.client_ip,
                "client_port": m.client_port,
                "protocol": m.protocol,
                "request_id": m.request_id,
                "route_id": m.route_id,
                "server_name": m.server_name,
                "timestamp": m.timestamp,
                "tls_cipher": m.tls_cipher,
                "tls_version": m.tls_version,
                "upstream_id": m.upstream_id,
            }
            return (
                m.correlation_id.__class__ is str
                and _typed(md, correlation_id, m.traceparent)
                and e.method.__class__ is str
                and e.uri.__class__ is str
                and _headers_typed(e.headers)
            )
        except AttributeError:
            return False

    def encode(self, event: object, correlation_id: object) -> bytes | None:
        """The JSON payload of ``event`` routed to ``correlation_id``, or None (not handled)."""
        if event.__class__ is not self._event_cls:
            return None
        e: Any = event
        try:
            m: Any = e.metadata
            method, uri, headers = e.method, e.uri, e.headers
            md_cls: type = m.__class__
            if md_cls is not self._md_cls:
                return None
            m.correlation_id  # noqa: B018 - an unset slot is "not handled", as in the core
            md = {
                "client_ip": m.client_ip,
                "client_port": m.client_port,
                "correlation_id": correlation_id,
                "protocol": m.protocol,
                "request_id": m.request_id,
                "route_id": m.route_id,
                "server_name": m.server_name,
                "timestamp": m.timestamp,
                "tls_cipher": m.tls_cipher,
                "tls_version": m.tls_version,
                "upstream_id": m.upstream_id,
            }
            traceparent = m.traceparent
        except AttributeError:
            return None
        if not (
            _typed(md, correlation_id, traceparent)
            and method.__class__ is str
            and uri.__class__ is str
            and _headers_typed(headers)
        ):
            return None
        if traceparent is not None:
            md["traceparent"] = traceparent
        return self._dumps(
            {
                "correlation_id": correlation_id,
                "headers": headers,
                "metadata": md,
                "method": method,
                "uri": uri,
            },
            None,
            self._option,
        )
