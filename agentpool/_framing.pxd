# Declarations of the framing layer (included by _core.pxd).

cdef class FrameDecoder:
    cdef bytearray _buf
    cdef Py_ssize_t _start
    cdef Py_ssize_t _max_size
    cdef object _error

    cdef int _parse(self, const unsigned char *data, Py_ssize_t size,
                    Py_ssize_t *consumed, list out) except -1
    cpdef list feed(self, object data)
