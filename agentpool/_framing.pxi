# v2 UDS framing: 4-byte big-endian length (type byte + payload), type byte, payload.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy

from agentpool.enums import MessageType as _MessageType
from agentpool import errors as _errors

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEF _MAX_MESSAGE_SIZE = 16777216
DEF _HEADER = 5

cdef list _TYPE_TABLE = [None] * 256
for _mt in _MessageType:
    _TYPE_TABLE[int(_mt)] = _mt


cdef inline Py_ssize_t _read_len(const unsigned char *p) noexcept:
    return (<Py_ssize_t>p[0] << 24) | (<Py_ssize_t>p[1] << 16) | (<Py_ssize_t>p[2] << 8) | <Py_ssize_t>p[3]


def encode_frame(int msg_type, payload) -> bytes:
    """Frame ``payload`` as one v2 message: ``LEN(u32 BE) | TYPE | PAYLOAD``."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char *dst
    if msg_type < 0 or msg_type > 255 or _TYPE_TABLE[msg_type] is None:
        raise _errors.InvalidMessage(f"Unknown message type: 0x{msg_type & 0xff:02x}")
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        if n > _MAX_MESSAGE_SIZE:
            raise _errors.MessageTooLarge(n, _MAX_MESSAGE_SIZE)
        out = PyBytes_FromStringAndSize(NULL, n + _HEADER)
        dst = <unsigned char *>PyBytes_AS_STRING(out)
        dst[0] = <unsigned char>(((n + 1) >> 24) & 0xff)
        dst[1] = <unsigned char>(((n + 1) >> 16) & 0xff)
        dst[2] = <unsigned char>(((n + 1) >> 8) & 0xff)
        dst[3] = <unsigned char>((n + 1) & 0xff)
        dst[4] = <unsigned char>msg_type
        if n:
            memcpy(dst + _HEADER, view.buf, n)
    finally:
        PyBuffer_Release(&view)
    return out


cdef class FrameDecoder:
    """Incremental v2 frame decoder.

    ``feed()`` takes byte chunks of any size and returns the complete frames as
    ``(MessageType, payload)`` tuples. Complete frames are sliced straight out of the
    incoming chunk; only an unfinished tail is buffered, and consumed bytes are never
    copied again. A framing error (zero length, oversize, unknown type) is fatal: frames
    completed before it are returned first, then every later ``feed()`` raises it
    (``failed`` tells whether one is pending).
    """

    def __cinit__(self, Py_ssize_t max_size=_MAX_MESSAGE_SIZE):
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._buf = bytearray()
        self._start = 0
        self._max_size = max_size
        self._error = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._start

    @property
    def failed(self) -> bool:
        return self._error is not None

    cdef int _parse(self, const unsigned char *data, Py_ssize_t size,
                    Py_ssize_t *consumed, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t length
        cdef unsigned char t
        cdef object mt
        while size - pos >= 4:
            length = _read_len(data + pos)
            if length == 0:
                self._error = _errors.InvalidMessage("Zero-length message")
                break
            if length > self._max_size:
                self._error = _errors.MessageTooLarge(length, self._max_size)
                break
            if size - pos < 5:
                break
            t = data[pos + 4]
            mt = _TYPE_TABLE[t]
            if mt is None:
                self._error = _errors.InvalidMessage(f"Unknown message type: 0x{t:02x}")
                break
            if size - pos - 4 < length:
                break
            out.append((mt, PyBytes_FromStringAndSize(<char *>data + pos + _HEADER, length - 1)))
            pos += 4 + length
        consumed[0] = pos
        if self._error is not None and not out:
            raise self._error
        return 0

    cpdef list feed(self, object data):
        """Add ``data``; return the frames it completes, in order."""
        cdef Py_buffer view
        cdef Py_ssize_t consumed = 0
        cdef Py_ssize_t pending
        cdef list out = []
        if self._error is not None:
            raise self._error
        pending = len(self._buf) - self._start
        if pending == 0:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._parse(<const unsigned char *>view.buf, view.len, &consumed, out)
                if consumed < view.len:
                    if self._start:
                        del self._buf[:]
                        self._start = 0
                    self._buf += (<const unsigned char *>view.buf)[consumed:view.len]
            finally:
                PyBuffer_Release(&view)
            return out
        self._buf += data
        PyObject_GetBuffer(self._buf, &view, PyBUF_SIMPLE)
        try:
            self._parse(<const unsigned char *>view.buf + self._start,
                        view.len - self._start, &consumed, out)
        finally:
            PyBuffer_Release(&view)
        self._start += consumed
        if self._start == len(self._buf):
            del self._buf[:]
            self._start = 0
        elif self._start > 65536 and self._start * 2 > len(self._buf):
            del self._buf[:self._start]
            self._start = 0
        return out
