# Declarations of the protocol part of the core (included by _core.pxd).

cdef class RequestGroup:
    cdef readonly object future
    cdef readonly Py_ssize_t remaining


cdef class AgentProtocolCore:
    cdef object _loop
    cdef object _create_future
    cdef object _call_soon
    cdef object _call_later
    cdef object _on_frame
    cdef object _on_lost
    cdef FrameDecoder _decoder
    cdef object _decode
    cdef object _encode
    cdef dict _waiters
    cdef dict _tombs
    cdef object _encode_cancel
    cdef object _tq
    cdef object _timer
    cdef bytearray _wbuf
    cdef bint _flush_scheduled
    cdef bint _wrote_direct
    cdef list _drain_waiters
    cdef object _flush_cb
    cdef object _timer_cb
    cdef readonly object transport
    cdef readonly double request_timeout
    cdef public object agent_id
    cdef public Py_ssize_t max_abandoned
    cdef public Py_ssize_t max_write_buffer
    cdef readonly bint write_paused
    cdef readonly bint closed
    cdef readonly object close_error
    cdef readonly unsigned long long requests_sent
    cdef readonly unsigned long long responses_received
    cdef readonly unsigned long long unmatched_responses
    cdef readonly unsigned long long decode_errors
    cdef readonly unsigned long long timeouts
    cdef readonly unsigned long long abandoned
    cdef readonly unsigned long long late_replies
    cdef readonly unsigned long long refused
    cdef readonly unsigned long long frames_received
    cdef readonly unsigned long long frames_sent
    cdef readonly unsigned long long bytes_received
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long writes
    cdef ProtocolMetrics _pm
    cdef object _on_aff_reject
    cdef HeadersEventEncoder _hdr
    cdef ResponseFactory _resp
    cdef int _resp_mode
    cdef Py_ssize_t _queued
    cdef public Py_ssize_t flush_after

    cdef int _append_frame(self, int msg_type, object payload) except -1
    cdef int _do_flush(self) except -1
    cdef bint _paused_over_bound(self) except -1
    cdef int _wake_writers(self) except -1
    cdef int _close_transport(self) except -1
    cdef int _arm(self) except -1
    cdef int _expire(self, object cid, tuple entry, double timeout) except -1
    cdef int _entomb(self, object cid, int reason) except -1
    cdef int _fatal(self, object error) except -1
    cdef int _shutdown(self, object error) except -1
    cpdef object request(self, int msg_type, object payload, str correlation_id, object timeout=*)
    cpdef write_frame(self, int msg_type, object payload)
    cpdef object send_event(self, object event, str correlation_id, object timeout=*)
    cpdef object submit(self, object event, str correlation_id, object timeout,
                        ConnState st, AffinityMap affinity, int flags, RequestGroup group=*)
    cdef int _register(self, str correlation_id, object fut, object timeout, double t,
                       int flags, object group, object st) except -1
    cdef int _complete(self, tuple entry, object response) except -1
