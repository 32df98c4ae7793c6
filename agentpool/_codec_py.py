"""Pure-Python twin of the compiled codec helpers (``_codec.pxi``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

__all__ = ["HeadersEventEncoder", "LazyField", "LazyValues", "ResponseFactory"]

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


# The fields from_map gives a meaning to (their positions come from the keys it is given).
_WIRE_NAMES: Final = (
    "version",
    "decision",
    "request_headers",
    "response_headers",
    "routing_metadata",
    "audit",
    "needs_more",
    "request_body_mutation",
    "response_body_mutation",
    "websocket_decision",
)
_AUDIT_NAMES: Final = ("tags", "rule_ids", "confidence", "reason_codes", "custom")


def _str_map(m: dict[Any, Any]) -> bool:
    """Whether every key and value of the exact dict ``m`` is an exact str."""
    for k, x in m.items():
        if k.__class__ is not str or x.__class__ is not str:
            return False
    return True


def _str_list(v: object) -> bool:
    """Whether ``v`` is an exact list of exact str."""
    if v.__class__ is not list:
        return False
    for x in v:  # type: ignore[attr-defined]
        if x.__class__ is not str:
            return False
    return True


def _ops_keys(ops: object) -> int:
    """Key count of header ops in their canonical shape; -1 for anything else (the codec's
    ``_header_ops_count``)."""
    if ops.__class__ is not list:
        return -1
    nk = 0
    for item in ops:  # type: ignore[attr-defined]
        if item.__class__ is not dict or len(item) != 1:
            return -1
        ((tag, inner),) = item.items()
        if inner.__class__ is not dict:
            return -1
        name = inner.get("name")
        if name.__class__ is not str or tag.__class__ is not str:
            return -1
        if tag == "remove":
            if len(inner) != 1:
                return -1
            nk += 2
        elif tag == "set" or tag == "add":
            value = inner.get("value")
            if len(inner) != 2 or value.__class__ is not str:
                return -1
            nk += 3
        else:
            return -1
    return nk


class LazyField:
    """A field of a decoded AgentResponse built on first read: reads return the slot; an
    empty slot makes ``values(lazy)`` (``lazy`` taken out of the ``_lazy`` slot) a dict of
    the lazy fields, which fill the lazy slots still empty, and is read again. Assignment
    and deletion go to the slot. ``members``: the lazy fields' slot descriptors by name."""

    __slots__ = ("_lazy_member", "_member", "_members", "_name", "_values")

    def __init__(
        self,
        cls: type,
        name: str,
        members: dict[str, Any],
        lazy_member: Any,
        values: Callable[[Any], dict[str, Any]],
    ) -> None:
        if not 0 < len(members) <= 16:
            raise TypeError("LazyField: 1 to 16 lazy fields")
        for n, m in (*members.items(), ("_lazy", lazy_member)):
            if getattr(m, "__objclass__", None) not in cls.__mro__ or m.__name__ != n:
                raise TypeError(f"{cls.__name__}.{n} is not a slot")
        self._name = name
        self._member = members[name]
        self._members = members
        self._lazy_member = lazy_member
        self._values = values

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return self._member.__get__(obj, objtype)
        except AttributeError:
            pass
        try:
            lazy = self._lazy_member.__get__(obj)
        except AttributeError:
            raise AttributeError(
                f"'{type(obj).__name__}' object has no attribute '{self._name}'"
            ) from None
        self._lazy_member.__delete__(obj)
        values = self._values(lazy)
        if values.__class__ is not dict:
            raise TypeError("LazyField: values() must return a dict")
        for name, member in self._members.items():
            if name in values:
                try:
                    member.__get__(obj)
                except AttributeError:
                    member.__set__(obj, values[name])
        return self._member.__get__(obj, objtype)

    def __set__(self, obj: Any, value: Any) -> None:
        self._member.__set__(obj, value)

    def __delete__(self, obj: Any) -> None:
        self._member.__delete__(obj)


class LazyValues:
    """``values(lazy)`` for :class:`LazyField`: the lazy fields of a canonical Allow built
    from its correlation id (a str), else ``lazy[0](lazy)`` (the decoder's builder)."""

    __slots__ = ("_audit_cls",)

    def __init__(self, audit_cls: type) -> None:
        for name in ("tags", "rule_ids", "confidence", "reason_codes", "custom"):
            if name not in getattr(audit_cls, "__slots__", ()):
                raise TypeError(f"{audit_cls.__name__}.{name} is not a slot")
        self._audit_cls = audit_cls

    def __call__(self, lazy: Any) -> dict[str, Any]:
        if lazy.__class__ is not str:
            return lazy[0](lazy)  # type: ignore[no-any-return]
        a: Any = _new(self._audit_cls)
        a.tags = []
        a.rule_ids = []
        a.confidence = None
        a.reason_codes = []
        a.custom = {"correlation_id": lazy}
        return {
            "request_headers": [],
            "response_headers": [],
            "routing_metadata": {},
            "audit": a,
            "request_body_mutation": None,
            "response_body_mutation": None,
            "websocket_decision": None,
        }


class ResponseFactory:
    """Builds fresh decoded AgentResponse objects for the proxy's decode hot path.

    ``make`` allocates the reply and assigns its eager slots directly (no dataclass
    ``__init__``), leaving the other fields to be built on first read from ``lazy``.
    ``match_json`` recognises the canonical JSON Allow reply (template head + correlation id +
    tail) and ``match_msgpack`` the MessagePack ones (head + fixstr id + tail) without parsing
    them: such a reply is the object plus its correlation id, nothing else.
    """

    __slots__ = (
        "_aix",
        "_allow",
        "_audit_keys",
        "_block",
        "_build",
        "_f32",
        "_head",
        "_hl",
        "_ix",
        "_keys",
        "_msgpack",
        "_resp_cls",
        "_tail",
        "_tl",
    )

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
        self._build: Any = None

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

    def set_map_decoding(
        self,
        keys: tuple[str, ...],
        audit_keys: tuple[str, ...],
        block_cls: Any,
        f32: Callable[[Any, str], float],
        build_lazy: Any,
    ) -> None:
        """Enable :meth:`from_map`: ``keys``/``audit_keys`` the wire keys in order, ``f32(v,
        path)`` the confidence converter, ``build_lazy`` what builds the lazy fields."""
        if len(keys) != 10 or len(audit_keys) != 5:
            raise TypeError("ResponseFactory: unexpected AgentResponse/AuditMetadata keys")
        self._keys = keys
        self._audit_keys = audit_keys
        self._block = block_cls
        self._f32 = f32
        self._build = build_lazy
        self._ix = tuple(keys.index(name) for name in _WIRE_NAMES)
        self._aix = tuple(audit_keys.index(name) for name in _AUDIT_NAMES)

    def from_map(self, d: object) -> tuple[str, Any, int] | None:
        """``(cid, reply, key count)`` for a decoded AgentResponse map in its canonical shape
        (upstream's keys in order, decision allow or a plain block, canonical header ops,
        string maps and lists, a flat audit, no mutations or WebSocket decision), else None:
        the codec's Python path then decodes it, and raises on errors."""
        if self._build is None or d.__class__ is not dict or len(d) != 10:  # type: ignore[arg-type]
            return None
        m: dict[Any, Any] = d  # type: ignore[assignment]
        if tuple(m) != self._keys:
            return None
        v = tuple(m.values())
        ix = self._ix
        nk = 10
        version = v[ix[0]]
        if version.__class__ is not int or not 0 <= version <= 0xFFFFFFFF:
            return None
        dec = v[ix[1]]
        if dec.__class__ is str:
            if dec != "allow":
                return None
            decision = self._allow
        elif dec.__class__ is dict and len(dec) == 1:
            inner = dec.get("block")
            if inner.__class__ is not dict or len(inner) != 3:
                return None
            status = inner.get("status")
            if status.__class__ is not int or not 0 <= status <= 0xFFFF:
                return None
            if "body" not in inner or "headers" not in inner:
                return None
            body = inner["body"]
            if body is not None and body.__class__ is not str:
                return None
            hdrs = inner["headers"]
            if hdrs is not None:
                if hdrs.__class__ is not dict or not _str_map(hdrs):
                    return None
                nk += len(hdrs)
            decision = self._block(status, body, hdrs)
            nk += 4
        else:
            return None
        rqh = v[ix[2]]
        rsh = v[ix[3]]
        n = _ops_keys(rqh)
        if n < 0:
            return None
        nk += n
        n = _ops_keys(rsh)
        if n < 0:
            return None
        nk += n
        rm = v[ix[4]]
        if rm.__class__ is not dict or not _str_map(rm):
            return None
        nk += len(rm)
        audit_v = v[ix[5]]
        if audit_v.__class__ is not dict or len(audit_v) != 5 or tuple(audit_v) != self._audit_keys:
            return None
        av = tuple(audit_v.values())
        aix = self._aix
        nk += 5
        tags, rule_ids, conf, reasons, custom = (av[i] for i in aix)
        if not (_str_list(tags) and _str_list(rule_ids) and _str_list(reasons)):
            return None
        if conf is not None:
            try:
                conf = self._f32(conf, "audit.confidence")
            except Exception:
                return None
        if custom.__class__ is not dict:
            return None
        cid = ""
        if custom:
            for x in custom.values():
                if x.__class__ is dict or x.__class__ is list:
                    return None
            nk += len(custom)
            cid = custom.get("correlation_id", "")
            if cid.__class__ is not str:
                return None
        needs_more = v[ix[6]]
        if needs_more is not True and needs_more is not False:
            return None
        if v[ix[7]] is not None or v[ix[8]] is not None or v[ix[9]] is not None:
            return None
        lazy = (
            self._build,
            rqh,
            rsh,
            rm,
            (tags, rule_ids, conf, reasons, custom),
            None,
            None,
            None,
        )
        return cid, self.make(version, decision, needs_more, lazy), nk

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
