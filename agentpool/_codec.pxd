# cdef declarations of the codec helpers (_codec.pxi).
cimport cython


@cython.final
cdef class LazyValues:
    cdef type _audit_cls
    cdef Py_ssize_t _a_off[5]
    cdef object _audit(self, str cid)
    cdef int _kind(self, str name)
    cdef object _plain(self, int kind, str cid)


@cython.final
cdef class LazyField:
    cdef type _cls
    cdef str _name
    cdef object _values
    cdef tuple _names
    cdef Py_ssize_t _n
    cdef Py_ssize_t _off
    cdef Py_ssize_t _lazy_off
    cdef Py_ssize_t _offs[16]
    cdef int _kinds[16]
    cdef int _check(self, object obj) except -1
    cdef int _fill(self, object obj) except -1


@cython.final
cdef class ResponseFactory:
    cdef type _resp_cls
    cdef object _allow
    cdef bytes _head
    cdef bytes _tail
    cdef tuple _msgpack
    cdef Py_ssize_t _r_off[5]
    cdef tuple _keys
    cdef tuple _audit_keys
    cdef object _block
    cdef object _f32
    cdef object _build
    cdef Py_ssize_t _ix[10]
    cdef Py_ssize_t _aix[5]
    cpdef object make(self, object version, object decision, object needs_more, object lazy)
    cpdef object allow(self, str cid)
    cpdef object cid_of(self, object response)
    cpdef object match(self, object payload, int mode)
    cpdef object from_map(self, object d)
    cpdef object match_json(self, object payload)
    cpdef object match_msgpack(self, object payload)


@cython.final
cdef class HeadersEventEncoder:
    cdef type _event_cls
    cdef type _md_cls
    cdef object _dumps
    cdef object _option
    cdef Py_ssize_t _e_off[4]
    cdef Py_ssize_t _m_off[12]
    cpdef object encode(self, object event, object correlation_id)
    cpdef bint check(self, object event, object correlation_id) except -1
