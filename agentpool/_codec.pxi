# Compiled helpers of agentpool.codec: fresh decoded AgentResponse objects (lazy fields),
# and a direct JSON writer for RequestHeaders events (twin: agentpool/_codec_py.py).
# Long on purpose (over 800 lines): this is the part of the codec that is really C (slot
# offsets and descriptors for the lazy reply, a reply validator that walks orjson's objects
# without building any, a byte writer with its own growable buffer and SWAR string scan), and
# its pieces share inline helpers, which Cython can only inline within one module.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.object cimport PyObject, PyTypeObject
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.dict cimport PyDict_GetItem
from libc.stdint cimport uint64_t
from libc.math cimport isinf, isnan
from libc.stdio cimport snprintf
from libc.stdlib cimport strtod
from libc.stdint cimport uint32_t
from libc.string cimport memcmp, memcpy

import types as _cd_types

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
        int flags
    int T_OBJECT_EX
    int READONLY

cdef extern from *:
    uint64_t _cd_bswap64 "__builtin_bswap64"(uint64_t x) nogil

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    bint _cd_is_compact_ascii "PyUnicode_IS_COMPACT_ASCII"(PyObject* o)
    unsigned char* _cd_ascii_data "PyUnicode_1BYTE_DATA"(PyObject* o)
    Py_ssize_t _cd_ulen "PyUnicode_GET_LENGTH"(PyObject* o)
    bint _cd_str_exact "PyUnicode_CheckExact"(PyObject* o)
    bint _cd_int_exact "PyLong_CheckExact"(PyObject* o)
    bint _cd_list_exact "PyList_CheckExact"(PyObject* o)
    bint _cd_dict_exact "PyDict_CheckExact"(PyObject* o)
    long long _cd_as_ll "PyLong_AsLongLongAndOverflow"(PyObject* o, int* overflow) except? -1
    Py_ssize_t _cd_list_size "PyList_GET_SIZE"(PyObject* o)
    PyObject* _cd_list_item "PyList_GET_ITEM"(PyObject* o, Py_ssize_t i)
    int _cd_dict_next "PyDict_Next"(PyObject* d, Py_ssize_t* pos, PyObject** k, PyObject** v)
    Py_ssize_t _cd_dict_size "PyDict_GET_SIZE"(PyObject* d)
    object _cd_bytes_from "PyBytes_FromStringAndSize"(const char* s, Py_ssize_t n)

# The slots a decoded reply gets at once; its other fields are built on first read from the
# ``_lazy`` slot (see AgentResponse in messages.py, which declares the fields).
_cd_EAGER_SLOTS = ("version", "decision", "needs_more", "fail_open", "_lazy")

cdef tuple _cd_EMPTY = ()


cdef Py_ssize_t _cd_slot_offset(type cls, str name, object descr=None) except -1:
    """Byte offset of the writable object slot ``name`` of ``cls`` (or of its member
    descriptor ``descr``, when the class attribute has been replaced)."""
    if descr is None:
        for base in cls.__mro__:
            descr = base.__dict__.get(name)
            if descr is not None:
                break
    if type(descr) is not _cd_types.MemberDescriptorType or descr.__objclass__ not in cls.__mro__:
        raise TypeError(f"{cls.__name__}.{name} is not a slot")
    cdef PyMemberDef* m = (<PyMemberDescrObject*>descr).d_member
    if m.type != T_OBJECT_EX or (m.flags & READONLY) or m.offset < <Py_ssize_t>sizeof(PyObject) \
            or m.offset + <Py_ssize_t>sizeof(PyObject*) > (<PyTypeObject*>cls).tp_basicsize:
        raise TypeError(f"{cls.__name__}.{name} is not a writable object slot")
    return m.offset


cdef inline void _cd_put(object obj, Py_ssize_t off, object value):
    # Only for freshly allocated objects: the slot is still NULL, nothing to release.
    Py_INCREF(value)
    (<PyObject**>((<char*><PyObject*>obj) + off))[0] = <PyObject*>value


cdef inline PyObject* _cd_get(object obj, Py_ssize_t off):
    return (<PyObject**>((<char*><PyObject*>obj) + off))[0]


_cd_AUDIT_SLOTS = ("tags", "rule_ids", "confidence", "reason_codes", "custom")


@cython.final
cdef class LazyValues:
    """``values(lazy)`` for :class:`LazyField`: the lazy fields of a canonical Allow built
    from its correlation id (a str) in C, else ``lazy[0](lazy)`` (the decoder's builder)."""

    def __init__(self, type audit_cls):
        cdef Py_ssize_t i
        for i in range(5):
            self._a_off[i] = _cd_slot_offset(audit_cls, _cd_AUDIT_SLOTS[i])
        self._audit_cls = audit_cls

    cdef object _audit(self, str cid):
        cdef Py_ssize_t* o = self._a_off
        cdef object a = (<PyTypeObject*>self._audit_cls).tp_new(
            self._audit_cls, <PyObject*>_cd_EMPTY, NULL
        )
        _cd_put(a, o[0], [])
        _cd_put(a, o[1], [])
        _cd_put(a, o[2], None)
        _cd_put(a, o[3], [])
        _cd_put(a, o[4], {"correlation_id": cid})
        return a

    cdef int _kind(self, str name):
        """How lazy field ``name`` is built in a canonical Allow (see :meth:`_plain`)."""
        if name == "audit":
            return 3
        if name == "request_headers" or name == "response_headers":
            return 1
        if name == "routing_metadata":
            return 2
        return 0

    cdef object _plain(self, int kind, str cid):
        """The value of a lazy field of ``kind`` in the canonical Allow routed to ``cid``."""
        if kind == 3:
            return self._audit(cid)
        if kind == 1:
            return []
        if kind == 2:
            return {}
        return None

    def __call__(self, lazy):
        if type(lazy) is not str:
            return lazy[0](lazy)
        return {
            name: self._plain(self._kind(name), lazy)
            for name in ("request_headers", "response_headers", "routing_metadata", "audit",
                         "request_body_mutation", "response_body_mutation",
                         "websocket_decision")
        }


@cython.final
cdef class LazyField:
    """A field of a decoded AgentResponse built on first read: reads return the slot; an
    empty slot makes ``values(lazy)`` (``lazy`` taken out of the ``_lazy`` slot) a dict of
    the lazy fields, which fill the lazy slots still empty, and is read again. Assignment
    and deletion go to the slot. ``members``: the lazy fields' slot descriptors by name."""

    def __init__(self, type cls, str name, dict members, object lazy_member, object values):
        cdef Py_ssize_t i
        if not 0 < len(members) <= 16:
            raise TypeError("LazyField: 1 to 16 lazy fields")
        self._names = tuple(members)
        self._n = len(self._names)
        for i in range(self._n):
            self._offs[i] = _cd_slot_offset(cls, self._names[i], members[self._names[i]])
        self._off = self._offs[self._names.index(name)]
        self._lazy_off = _cd_slot_offset(cls, "_lazy", lazy_member)
        if type(values) is LazyValues:
            for i in range(self._n):
                self._kinds[i] = (<LazyValues>values)._kind(self._names[i])
        self._cls = cls
        self._name = name
        self._values = values

    cdef int _check(self, object obj) except -1:
        if not isinstance(obj, self._cls):
            raise TypeError(
                f"descriptor '{self._name}' for '{self._cls.__name__}' objects doesn't apply to "
                f"a '{type(obj).__name__}' object"
            )
        return 0

    cdef int _fill(self, object obj) except -1:
        cdef PyObject** ls = <PyObject**>((<char*><PyObject*>obj) + self._lazy_off)
        if ls[0] == NULL:
            return 0
        cdef object lazy = <object>ls[0]
        ls[0] = NULL
        Py_DECREF(lazy)  # the slot's reference
        cdef Py_ssize_t i
        cdef PyObject** s
        cdef PyObject* v
        cdef object plain
        if type(lazy) is str and type(self._values) is LazyValues:
            # a canonical Allow: its fields written straight into the slots
            for i in range(self._n):
                s = <PyObject**>((<char*><PyObject*>obj) + self._offs[i])
                if s[0] == NULL:
                    plain = (<LazyValues>self._values)._plain(self._kinds[i], <str>lazy)
                    Py_INCREF(plain)
                    s[0] = <PyObject*>plain
            return 0
        values = self._values(lazy)
        if type(values) is not dict:
            raise TypeError("LazyField: values() must return a dict")
        for i in range(self._n):
            s = <PyObject**>((<char*><PyObject*>obj) + self._offs[i])
            if s[0] == NULL:
                v = PyDict_GetItem(values, self._names[i])
                if v != NULL:
                    Py_INCREF(<object>v)
                    s[0] = v
        return 0

    def __get__(self, obj, objtype):
        if obj is None:
            return self
        self._check(obj)
        cdef PyObject* p = _cd_get(obj, self._off)
        if p == NULL:
            self._fill(obj)
            p = _cd_get(obj, self._off)
            if p == NULL:
                raise AttributeError(
                    f"'{type(obj).__name__}' object has no attribute '{self._name}'"
                )
        return <object>p

    def __set__(self, obj, value):
        self._check(obj)
        cdef PyObject** slot = <PyObject**>((<char*><PyObject*>obj) + self._off)
        cdef PyObject* old = slot[0]
        Py_INCREF(value)
        slot[0] = <PyObject*>value
        Py_XDECREF(old)

    def __delete__(self, obj):
        self._check(obj)
        cdef PyObject** slot = <PyObject**>((<char*><PyObject*>obj) + self._off)
        cdef PyObject* old = slot[0]
        if old == NULL:
            raise AttributeError(self._name)
        slot[0] = NULL
        Py_XDECREF(old)


cdef object _cd_f32_shortest(double x):
    """The codec's ``f32_shortest`` for a float: round to f32, then the shortest decimal (at
    most 9 significant digits, as Rust prints) that maps back to the same f32 bits."""
    if isnan(x) or isinf(x):
        return x
    cdef float f = <float>x
    if isinf(f):
        return float("inf") if x > 0 else float("-inf")
    cdef uint32_t bits, cbits
    memcpy(&bits, &f, 4)
    cdef double target = <double>f
    cdef char buf[40]
    cdef int digits
    cdef double cand
    cdef float cf
    for digits in range(1, 10):
        snprintf(buf, sizeof(buf), "%.*g", digits, target)
        cand = strtod(buf, NULL)
        cf = <float>cand
        if isinf(cf) and not isinf(cand):
            continue
        memcpy(&cbits, &cf, 4)
        if cbits == bits:
            return cand
    return target


cdef bint _cd_str_map(object m):
    """Whether every key and value of the exact dict ``m`` is an exact str."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* x
    while _cd_dict_next(<PyObject*>m, &pos, &k, &x):
        if not _cd_str_exact(k) or not _cd_str_exact(x):
            return False
    return True


cdef bint _cd_str_list(object v):
    """Whether ``v`` is an exact list of exact str."""
    if not _cd_list_exact(<PyObject*>v):
        return False
    cdef Py_ssize_t i
    for i in range(_cd_list_size(<PyObject*>v)):
        if not _cd_str_exact(_cd_list_item(<PyObject*>v, i)):
            return False
    return True


cdef Py_ssize_t _cd_ops_keys(object ops):
    """Key count of header ops in their canonical shape; -1 for anything else (the codec's
    ``_header_ops_count``)."""
    if not _cd_list_exact(<PyObject*>ops):
        return -1
    cdef Py_ssize_t i, nk = 0, pos
    cdef PyObject* item
    cdef PyObject* tag
    cdef PyObject* inner
    cdef object name, value
    for i in range(_cd_list_size(<PyObject*>ops)):
        item = _cd_list_item(<PyObject*>ops, i)
        if not _cd_dict_exact(item) or _cd_dict_size(item) != 1:
            return -1
        pos = 0
        _cd_dict_next(item, &pos, &tag, &inner)
        if not _cd_dict_exact(inner):
            return -1
        name = (<dict>inner).get("name")
        if name is None or not _cd_str_exact(<PyObject*>name):
            return -1
        if not _cd_str_exact(tag):
            return -1
        if <object>tag == "remove":
            if _cd_dict_size(inner) != 1:
                return -1
            nk += 2
        elif <object>tag == "set" or <object>tag == "add":
            value = (<dict>inner).get("value")
            if _cd_dict_size(inner) != 2 or value is None or not _cd_str_exact(<PyObject*>value):
                return -1
            nk += 3
        else:
            return -1
    return nk


@cython.final
cdef class ResponseFactory:
    """Builds fresh decoded AgentResponse objects for the proxy's decode hot path.

    ``make`` allocates the reply and writes its eager slots directly (no dataclass
    ``__init__``), leaving the other fields to be built on first read from ``lazy``; the
    class's slot layout is checked once, here. ``match_json`` recognises the canonical JSON
    Allow reply (template head + correlation id + tail) and ``match_msgpack`` the MessagePack
    ones (head + fixstr id + tail) without parsing them: such a reply is the object plus its
    correlation id, nothing else.
    """

    def __init__(
        self,
        type response_cls,
        object allow,
        tuple json_template,
        tuple msgpack_templates,
    ):
        self._resp_cls = response_cls
        self._allow = allow
        head, tail = json_template
        self._head = bytes(head)
        self._tail = bytes(tail)
        self._msgpack = tuple((bytes(h), bytes(t)) for h, t in msgpack_templates)
        cdef Py_ssize_t i
        for i in range(5):
            self._r_off[i] = _cd_slot_offset(response_cls, _cd_EAGER_SLOTS[i])

    cpdef object make(self, object version, object decision, object needs_more, object lazy):
        """A fresh reply; ``lazy`` is its cid (a plain Allow) or ``(build, ...)`` whose
        ``build(lazy)`` returns the lazy fields in declaration order."""
        cdef Py_ssize_t* o = self._r_off
        cdef object r = (<PyTypeObject*>self._resp_cls).tp_new(
            self._resp_cls, <PyObject*>_cd_EMPTY, NULL
        )
        _cd_put(r, o[0], version)
        _cd_put(r, o[1], decision)
        _cd_put(r, o[2], needs_more)
        _cd_put(r, o[3], False)
        _cd_put(r, o[4], lazy)
        return r

    cpdef object allow(self, str cid):
        """A fresh plain Allow whose ``audit.custom`` routes it to ``cid``."""
        return self.make(2, self._allow, False, cid)

    cpdef object cid_of(self, object response):
        """The correlation id of a reply made by :meth:`allow` (still unread)."""
        return <object>_cd_get(response, self._r_off[4])

    cpdef object match(self, object payload, int mode):
        """The plain Allow reply of ``payload`` (mode 1 JSON, 2 MessagePack), else None."""
        if type(payload) is not bytes:
            return None
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef const char* s = PyBytes_AS_STRING(payload)
        cdef Py_ssize_t hl, tl, idl, i
        cdef unsigned char c, h
        if mode == 1:
            hl = PyBytes_GET_SIZE(self._head)
            tl = PyBytes_GET_SIZE(self._tail)
            if n < hl + tl:
                return None
            if memcmp(s, PyBytes_AS_STRING(self._head), hl) != 0:
                return None
            if memcmp(s + n - tl, PyBytes_AS_STRING(self._tail), tl) != 0:
                return None
            for i in range(hl, n - tl):
                c = <unsigned char>s[i]
                if c < 0x20 or c > 0x7E or c == 0x22 or c == 0x5C:
                    return None
            return self.make(2, self._allow, False, PyUnicode_DecodeASCII(s + hl, n - tl - hl, NULL))
        for head, tail in self._msgpack:
            hl = PyBytes_GET_SIZE(head)
            tl = PyBytes_GET_SIZE(tail)
            if n < hl or n < tl:
                continue
            if memcmp(s, PyBytes_AS_STRING(head), hl) != 0:
                continue
            if memcmp(s + n - tl, PyBytes_AS_STRING(tail), tl) != 0:
                continue
            if n <= hl:
                return None
            h = <unsigned char>s[hl]
            idl = h & 0x1F
            if h & 0xE0 != 0xA0 or n != hl + 1 + idl + tl:
                return None
            try:
                cid = PyUnicode_DecodeUTF8(s + hl + 1, idl, NULL)
            except UnicodeDecodeError:
                return None
            return self.make(2, self._allow, False, cid)
        return None

    def set_map_decoding(self, tuple keys, tuple audit_keys, object block_cls, object f32,
                         object build_lazy):
        """Enable :meth:`from_map`: ``keys``/``audit_keys`` the wire keys in order, ``f32(v,
        path)`` the confidence converter, ``build_lazy`` what builds the lazy fields."""
        if len(keys) != 10 or len(audit_keys) != 5:
            raise TypeError("ResponseFactory: unexpected AgentResponse/AuditMetadata keys")
        self._keys = keys
        self._audit_keys = audit_keys
        self._block = block_cls
        self._f32 = f32
        self._build = build_lazy
        cdef Py_ssize_t i
        for i, name in enumerate(("version", "decision", "request_headers", "response_headers",
                                  "routing_metadata", "audit", "needs_more",
                                  "request_body_mutation", "response_body_mutation",
                                  "websocket_decision")):
            self._ix[i] = keys.index(name)
        for i, name in enumerate(("tags", "rule_ids", "confidence", "reason_codes", "custom")):
            self._aix[i] = audit_keys.index(name)

    cpdef object from_map(self, object d):
        """``(cid, reply, key count)`` for a decoded AgentResponse map in its canonical shape
        (upstream's keys in order, decision allow or a plain block, canonical header ops,
        string maps and lists, a flat audit, no mutations or WebSocket decision), else None:
        the codec's Python path then decodes it, and raises on errors."""
        if self._build is None or type(d) is not dict or _cd_dict_size(<PyObject*>d) != 10:
            return None
        cdef PyObject* v[10]
        cdef PyObject* av[5]
        cdef PyObject* k
        cdef PyObject* x
        cdef Py_ssize_t pos = 0, i = 0, n
        cdef long long nk = 10
        cdef int overflow = 0
        cdef long long ll
        while _cd_dict_next(<PyObject*>d, &pos, &k, &x):
            if <object>k != self._keys[i]:
                return None
            v[i] = x
            i += 1
        cdef object version = <object>v[self._ix[0]]
        if not _cd_int_exact(<PyObject*>version):
            return None
        ll = _cd_as_ll(<PyObject*>version, &overflow)
        if overflow or ll < 0 or ll > 0xFFFFFFFF:
            return None
        cdef object dec = <object>v[self._ix[1]]
        cdef object decision, inner, status, body, hdrs
        if _cd_str_exact(<PyObject*>dec):
            if dec != "allow":
                return None
            decision = self._allow
        elif _cd_dict_exact(<PyObject*>dec) and _cd_dict_size(<PyObject*>dec) == 1:
            inner = (<dict>dec).get("block")
            if inner is None or not _cd_dict_exact(<PyObject*>inner) \
                    or _cd_dict_size(<PyObject*>inner) != 3:
                return None
            status = (<dict>inner).get("status")
            if status is None or not _cd_int_exact(<PyObject*>status):
                return None
            ll = _cd_as_ll(<PyObject*>status, &overflow)
            if overflow or ll < 0 or ll > 0xFFFF:
                return None
            if "body" not in <dict>inner or "headers" not in <dict>inner:
                return None
            body = (<dict>inner)["body"]
            if body is not None and not _cd_str_exact(<PyObject*>body):
                return None
            hdrs = (<dict>inner)["headers"]
            if hdrs is not None:
                if not _cd_dict_exact(<PyObject*>hdrs) or not _cd_str_map(hdrs):
                    return None
                nk += _cd_dict_size(<PyObject*>hdrs)
            decision = self._block(status, body, hdrs)
            nk += 4
        else:
            return None
        cdef object rqh = <object>v[self._ix[2]]
        cdef object rsh = <object>v[self._ix[3]]
        n = _cd_ops_keys(rqh)
        if n < 0:
            return None
        nk += n
        n = _cd_ops_keys(rsh)
        if n < 0:
            return None
        nk += n
        cdef object rm = <object>v[self._ix[4]]
        if not _cd_dict_exact(<PyObject*>rm) or not _cd_str_map(rm):
            return None
        nk += _cd_dict_size(<PyObject*>rm)
        cdef object audit_v = <object>v[self._ix[5]]
        if not _cd_dict_exact(<PyObject*>audit_v) or _cd_dict_size(<PyObject*>audit_v) != 5:
            return None
        pos = 0
        i = 0
        while _cd_dict_next(<PyObject*>audit_v, &pos, &k, &x):
            if <object>k != self._audit_keys[i]:
                return None
            av[i] = x
            i += 1
        nk += 5
        cdef object tags = <object>av[self._aix[0]]
        cdef object rule_ids = <object>av[self._aix[1]]
        cdef object conf = <object>av[self._aix[2]]
        cdef object reasons = <object>av[self._aix[3]]
        cdef object custom = <object>av[self._aix[4]]
        if not (_cd_str_list(tags) and _cd_str_list(rule_ids) and _cd_str_list(reasons)):
            return None
        if type(conf) is float:
            conf = _cd_f32_shortest(<double>conf)
        elif conf is not None:
            try:
                conf = self._f32(conf, "audit.confidence")
            except Exception:
                return None
        if not _cd_dict_exact(<PyObject*>custom):
            return None
        cdef object cid = ""
        if _cd_dict_size(<PyObject*>custom):
            pos = 0
            while _cd_dict_next(<PyObject*>custom, &pos, &k, &x):
                if _cd_dict_exact(x) or _cd_list_exact(x):
                    return None
            nk += _cd_dict_size(<PyObject*>custom)
            cid = (<dict>custom).get("correlation_id", "")
            if not _cd_str_exact(<PyObject*>cid):
                return None
        cdef object needs_more = <object>v[self._ix[6]]
        if needs_more is not True and needs_more is not False:
            return None
        if v[self._ix[7]] != <PyObject*>None or v[self._ix[8]] != <PyObject*>None \
                or v[self._ix[9]] != <PyObject*>None:
            return None
        lazy = (self._build, rqh, rsh, rm, (tags, rule_ids, conf, reasons, custom), None, None,
                None)
        return cid, self.make(version, decision, needs_more, lazy), nk

    cpdef object match_json(self, object payload):
        """``(cid, Allow)`` for the canonical JSON Allow with a plain-ASCII id, else None."""
        r = self.match(payload, 1)
        return None if r is None else (self.cid_of(r), r)

    cpdef object match_msgpack(self, object payload):
        """``(cid, Allow)`` for a canonical MessagePack Allow (id < 32 bytes), else None."""
        r = self.match(payload, 2)
        return None if r is None else (self.cid_of(r), r)


_cd_EVENT_SLOTS = ("metadata", "method", "uri", "headers")
_cd_METADATA_SLOTS = (
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


@cython.final
cdef class HeadersEventEncoder:
    """Encodes a RequestHeadersEvent to upstream's JSON, byte-identical to ``dumps`` of the map
    with sorted keys at every level.

    The slots of the event and its metadata are read directly (layout checked once, here).
    The common shape (plain ASCII strings, ints, None, headers as lists of strings) is written
    directly, each field checked against its declared type as it is written (validation costs
    no extra pass). ``encode`` returns None for anything else (a wrong type, non-ASCII text,
    another class, an unset slot); the caller then validates and takes the generic path.
    """

    def __init__(self, type event_cls, type metadata_cls, object dumps, object option):
        if event_cls.__slots__ != _cd_EVENT_SLOTS or metadata_cls.__slots__ != _cd_METADATA_SLOTS:
            raise TypeError("HeadersEventEncoder: unexpected RequestHeadersEvent/RequestMetadata slots")
        self._event_cls = event_cls
        self._md_cls = metadata_cls
        self._dumps = dumps
        self._option = option
        cdef Py_ssize_t i
        for i in range(4):
            self._e_off[i] = _cd_slot_offset(event_cls, _cd_EVENT_SLOTS[i])
        for i in range(12):
            self._m_off[i] = _cd_slot_offset(metadata_cls, _cd_METADATA_SLOTS[i])

    cpdef object encode(self, object event, object correlation_id):
        """The JSON payload of ``event`` routed to ``correlation_id``, or None (not handled)."""
        if type(event) is not self._event_cls:
            return None
        cdef Py_ssize_t i
        cdef PyObject* ev[4]
        for i in range(4):
            ev[i] = _cd_get(event, self._e_off[i])
            if ev[i] == NULL:
                return None
        cdef object m = <object>ev[0]
        if type(m) is not self._md_cls:
            return None
        cdef PyObject* mv[12]
        for i in range(12):
            mv[i] = _cd_get(m, self._m_off[i])
            if mv[i] == NULL:
                return None
        return _cd_headers_json(correlation_id, ev, mv)

    cpdef bint check(self, object event, object correlation_id) except -1:
        """True when every field of ``event`` has exactly its declared type (no pass over
        anything else); False sends the caller to the validator that names the bad field."""
        if type(event) is not self._event_cls or not _cd_str_exact(<PyObject*>correlation_id):
            return False
        cdef Py_ssize_t i, j, m, pos = 0
        cdef PyObject* ev[4]
        cdef PyObject* mv[12]
        cdef PyObject* k
        cdef PyObject* v
        cdef int overflow = 0
        cdef long long port
        for i in range(4):
            ev[i] = _cd_get(event, self._e_off[i])
            if ev[i] == NULL:
                return False
        if type(<object>ev[0]) is not self._md_cls:
            return False
        for i in range(12):
            mv[i] = _cd_get(<object>ev[0], self._m_off[i])
            if mv[i] == NULL:
                return False
        if not (_cd_str_exact(ev[1]) and _cd_str_exact(ev[2]) and _cd_str_exact(mv[0])
                and _cd_str_exact(mv[1]) and _cd_str_exact(mv[2]) and _cd_str_exact(mv[5])
                and _cd_str_exact(mv[10]) and _cd_int_exact(mv[3])):
            return False
        port = _cd_as_ll(mv[3], &overflow)
        if overflow or port < 0 or port > 0xFFFF:
            return False
        for i in (4, 6, 7, 8, 9, 11):
            if mv[i] != <PyObject*>None and not _cd_str_exact(mv[i]):
                return False
        if not _cd_dict_exact(ev[3]):
            return False
        while _cd_dict_next(ev[3], &pos, &k, &v):
            if not _cd_str_exact(k) or not _cd_list_exact(v):
                return False
            m = _cd_list_size(v)
            for j in range(m):
                if not _cd_str_exact(_cd_list_item(v, j)):
                    return False
        return True


# Direct JSON writer for the common RequestHeaders shape, byte-identical to
# orjson.dumps(..., option=OPT_SORT_KEYS): only printable-ASCII strings without '"' or '\\',
# exact ints, None, and headers as a dict of exact lists of such strings (at most
# _CD_MAX_HEADERS names). Anything else makes it give up (returns None) so the caller
# serializes the same maps with orjson.

cdef enum:
    _CD_MAX_HEADERS = 128

cdef struct _CdBuf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    PyObject* ba  # when set, data lives in this bytearray (the connection's write buffer)


cdef inline int _cd_reserve(_CdBuf* b, Py_ssize_t extra) except -1:
    if b.size + extra <= b.cap:
        return 0
    return _cd_grow(b, extra)


cdef int _cd_grow(_CdBuf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef char* data
    cap = b.cap * 2
    while cap < b.size + extra:
        cap *= 2
    if b.ba != NULL:
        _pr_grow(<bytearray>b.ba, cap)
        b.data = PyByteArray_AS_STRING(<bytearray>b.ba)
        b.cap = cap
        return 0
    data = <char*>PyMem_Realloc(b.data, cap)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.cap = cap
    return 0


cdef inline int _cd_raw(_CdBuf* b, const char* s, Py_ssize_t n) except -1:
    _cd_reserve(b, n)
    memcpy(b.data + b.size, s, n)
    b.size += n
    return 0


cdef inline uint64_t _cd_swar(uint64_t w) noexcept nogil:
    """High bit set in some byte iff a byte of ``w`` (all < 0x80) is < 0x20, '"', '\\' or DEL."""
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t q = w ^ (ones * 0x22)
    cdef uint64_t b = w ^ (ones * 0x5C)
    cdef uint64_t d = w ^ (ones * 0x7F)
    return ((w - ones * 0x20) & ~w) | ((q - ones) & ~q) | ((b - ones) & ~b) | ((d - ones) & ~d)


cdef inline bint _cd_clean(PyObject* o):
    """True for an exact str whose JSON form is its ASCII text in quotes."""
    cdef Py_ssize_t i, n
    cdef unsigned char* s
    cdef unsigned char c
    cdef uint64_t w, acc
    if not _cd_str_exact(o) or not _cd_is_compact_ascii(o):
        return False
    s = _cd_ascii_data(o)
    n = _cd_ulen(o)
    i = 0
    acc = 0
    while i + 8 <= n:
        memcpy(&w, s + i, 8)
        acc |= _cd_swar(w)
        i += 8
    if acc & 0x8080808080808080ULL:
        return False
    while i < n:
        c = s[i]
        if c < 0x20 or c == 0x22 or c == 0x5C or c == 0x7F:
            return False
        i += 1
    return True


cdef inline int _cd_str(_CdBuf* b, PyObject* o) except -1:
    """Append a string already checked by _cd_clean, quoted."""
    cdef Py_ssize_t n = _cd_ulen(o)
    _cd_reserve(b, n + 2)
    b.data[b.size] = 34
    memcpy(b.data + b.size + 1, _cd_ascii_data(o), n)
    b.data[b.size + 1 + n] = 34
    b.size += n + 2
    return 0


cdef inline int _cd_req_str(_CdBuf* b, PyObject* o) except -1:
    """Append a required string field; 1 when written, 0 when not handled (or mistyped)."""
    if _cd_clean(o):
        _cd_str(b, o)
        return 1
    return 0


cdef inline int _cd_opt_str(_CdBuf* b, PyObject* o) except -1:
    """Append an optional string field (None is null); 1 when written, 0 when not handled."""
    if o == <PyObject*>None:
        _cd_raw(b, "null", 4)
        return 1
    return _cd_req_str(b, o)


cdef int _cd_u16(_CdBuf* b, PyObject* o) except -1:
    """Append an exact int in 0..65535; 1 when written, 0 when not handled (or mistyped)."""
    cdef int overflow = 0
    cdef long long v
    cdef char tmp[8]
    cdef int i = 8
    if not _cd_int_exact(o):
        return 0
    v = _cd_as_ll(o, &overflow)
    if overflow or v < 0 or v > 0xFFFF:
        return 0
    while True:
        i -= 1
        tmp[i] = <char>(48 + v % 10)
        v //= 10
        if v == 0:
            break
    _cd_raw(b, tmp + i, 8 - i)
    return 1


cdef inline bint _cd_key_lt(PyObject* a, PyObject* b):
    cdef Py_ssize_t na = _cd_ulen(a)
    cdef Py_ssize_t nb = _cd_ulen(b)
    cdef int c = memcmp(_cd_ascii_data(a), _cd_ascii_data(b), na if na < nb else nb)
    return c < 0 or (c == 0 and na < nb)


cdef int _cd_headers(_CdBuf* b, PyObject* h) except -1:
    """Append the headers map with sorted names; 1 when written, 0 when not handled."""
    cdef PyObject* keys[_CD_MAX_HEADERS]
    cdef PyObject* vals[_CD_MAX_HEADERS]
    cdef uint64_t pre[_CD_MAX_HEADERS]
    cdef uint64_t pk
    cdef Py_ssize_t kn
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* item
    cdef Py_ssize_t pos = 0, n = 0, i, j, m
    if not _cd_dict_exact(h) or _cd_dict_size(h) > _CD_MAX_HEADERS:
        return 0
    while _cd_dict_next(h, &pos, &k, &v):
        if not _cd_clean(k) or not _cd_list_exact(v):
            return 0
        kn = _cd_ulen(k)
        pk = 0
        memcpy(&pk, _cd_ascii_data(k), kn if kn < 8 else 8)
        pk = _cd_bswap64(pk)
        # insertion sort by bytes (ASCII here), as orjson sorts keys; 8-byte prefix first
        i = n
        while i > 0 and (pk < pre[i - 1] or (pk == pre[i - 1] and _cd_key_lt(k, keys[i - 1]))):
            keys[i] = keys[i - 1]
            vals[i] = vals[i - 1]
            pre[i] = pre[i - 1]
            i -= 1
        keys[i] = k
        vals[i] = v
        pre[i] = pk
        n += 1
    _cd_raw(b, "{", 1)
    for i in range(n):
        if i:
            _cd_raw(b, ",", 1)
        _cd_str(b, keys[i])
        _cd_raw(b, ":[", 2)
        v = vals[i]
        m = _cd_list_size(v)
        for j in range(m):
            item = _cd_list_item(v, j)
            if not _cd_clean(item):
                return 0
            if j:
                _cd_raw(b, ",", 1)
            _cd_str(b, item)
        _cd_raw(b, "]", 1)
    _cd_raw(b, "}", 1)
    return 1


cdef bint _cd_headers_body(_CdBuf* b, PyObject* c, PyObject** ev, PyObject** mv) except -1:
    """Write the RequestHeaders JSON payload; False when the shape is not handled."""
    _cd_raw(b, '{"correlation_id":', 18)
    _cd_str(b, c)
    _cd_raw(b, ',"headers":', 11)
    if not _cd_headers(b, ev[3]):
        return False
    _cd_raw(b, ',"metadata":{"client_ip":', 25)
    if not _cd_req_str(b, mv[2]):
        return False
    _cd_raw(b, ',"client_port":', 15)
    if not _cd_u16(b, mv[3]):
        return False
    _cd_raw(b, ',"correlation_id":', 18)
    _cd_str(b, c)
    _cd_raw(b, ',"protocol":', 12)
    if not _cd_req_str(b, mv[5]):
        return False
    _cd_raw(b, ',"request_id":', 14)
    if not _cd_req_str(b, mv[1]):
        return False
    _cd_raw(b, ',"route_id":', 12)
    if not _cd_opt_str(b, mv[8]):
        return False
    _cd_raw(b, ',"server_name":', 15)
    if not _cd_opt_str(b, mv[4]):
        return False
    _cd_raw(b, ',"timestamp":', 13)
    if not _cd_req_str(b, mv[10]):
        return False
    _cd_raw(b, ',"tls_cipher":', 14)
    if not _cd_opt_str(b, mv[7]):
        return False
    _cd_raw(b, ',"tls_version":', 15)
    if not _cd_opt_str(b, mv[6]):
        return False
    if mv[11] != <PyObject*>None:
        _cd_raw(b, ',"traceparent":', 15)
        if not _cd_opt_str(b, mv[11]):
            return False
    _cd_raw(b, ',"upstream_id":', 15)
    if not _cd_opt_str(b, mv[9]):
        return False
    _cd_raw(b, '},"method":', 11)
    if not _cd_req_str(b, ev[1]):
        return False
    _cd_raw(b, ',"uri":', 7)
    if not _cd_req_str(b, ev[2]):
        return False
    _cd_raw(b, "}", 1)
    return True


cdef object _cd_headers_json(object cid, PyObject** ev, PyObject** mv):
    """The RequestHeaders JSON payload written directly, or None when the shape is not handled."""
    cdef _CdBuf b
    cdef PyObject* c = <PyObject*>cid
    if not _cd_clean(c):
        return None
    b.size = 0
    b.cap = 2048
    b.ba = NULL
    b.data = <char*>PyMem_Malloc(b.cap)
    if b.data == NULL:
        raise MemoryError()
    try:
        if not _cd_headers_body(&b, c, ev, mv):
            return None
        return _cd_bytes_from(b.data, b.size)
    finally:
        PyMem_Free(b.data)


cdef Py_ssize_t _cd_headers_into(HeadersEventEncoder enc, bytearray buf, Py_ssize_t start,
                                 object event, object cid) except -2:
    """Append ``event``'s JSON payload to ``buf`` at ``start``; its size, or -1 if declined
    (``buf`` is then left at ``start`` bytes)."""
    cdef Py_ssize_t i
    cdef PyObject* ev[4]
    cdef PyObject* mv[12]
    cdef _CdBuf b
    cdef PyObject* c = <PyObject*>cid
    if type(event) is not enc._event_cls or not _cd_clean(c):
        return -1
    for i in range(4):
        ev[i] = _cd_get(event, enc._e_off[i])
        if ev[i] == NULL:
            return -1
    cdef object m = <object>ev[0]
    if type(m) is not enc._md_cls:
        return -1
    for i in range(12):
        mv[i] = _cd_get(m, enc._m_off[i])
        if mv[i] == NULL:
            return -1
    _pr_grow(buf, start + 1536)
    b.ba = <PyObject*>buf
    b.data = PyByteArray_AS_STRING(buf)
    b.size = start
    b.cap = PyByteArray_GET_SIZE(buf)
    try:
        if not _cd_headers_body(&b, c, ev, mv):
            PyByteArray_Resize(buf, start)
            return -1
    except BaseException:
        PyByteArray_Resize(buf, start)
        raise
    PyByteArray_Resize(buf, b.size)
    return b.size - start
