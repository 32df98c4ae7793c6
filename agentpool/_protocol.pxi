# Proxy side of one agent connection: frame routing by correlation id, timeouts, write
# coalescing and backpressure (twin: _protocol_py.py).
# Long on purpose: one cdef class whose methods share typed C state on the hot path; Cython
# cannot spread a cdef class's methods over several files without a call per split.

cimport cython
from libc.math cimport INFINITY
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import collections as _pr_collections

cdef extern from "Python.h":
    ctypedef struct _pr_bytearray "PyByteArrayObject":
        Py_ssize_t ob_alloc

cdef object _pr_AGENT_RESPONSE = _MessageType.AGENT_RESPONSE
cdef int _pr_CANCEL = 0x40
# CancelReason values on the wire (0-based, docs/protocol.md)
REASON_TIMEOUT = 1
REASON_MANUAL = 5
cdef int _pr_REASON_TIMEOUT = 1
cdef int _pr_REASON_MANUAL = 5
cdef object _pr_deque = _pr_collections.deque
cdef double _pr_TIMER_SLACK = 0.0005
# Under load the frames of one loop iteration share one write; with ``flush_after`` = N > 0 they
# are written as soon as N are queued, so the agent can start on them while the rest are
# encoded. Off by default: on the 2-core machine measured it cost client CPU and gained no
# throughput (docs/performance.md, "Writes").
FLUSH_AFTER = 0
cdef Py_ssize_t _pr_FLUSH_AFTER = 0
# submit() flags (the first ones are the pool's request kinds)
SUBMIT_TRACK = 1
SUBMIT_DURATION = 2
SUBMIT_STORE_AFFINITY = 8
SUBMIT_BEGUN = 128
SUBMIT_SAMPLE = 256
cdef int _pr_F_TRACK = 1
cdef int _pr_F_DURATION = 2
cdef int _pr_F_STORE_AFFINITY = 8
cdef int _pr_F_BEGUN = 128
cdef int _pr_F_SAMPLE = 256


@cython.final
cdef class RequestGroup:
    """Requests awaited together: ``future`` resolves (None) once every request submitted
    with the group has completed, whatever its outcome (no callback per request)."""

    def __cinit__(self, future):
        self.future = future
        self.remaining = 0


cdef inline int _pr_group_done(RequestGroup g) except -1:
    g.remaining -= 1
    if g.remaining == 0 and not g.future.done():
        g.future.set_result(None)
    return 0


cdef inline int _pr_entry_gone(tuple entry) except -1:
    """A request left the waiter map without its reply: count it in its group."""
    if entry[4] is not None:
        _pr_group_done(<RequestGroup>entry[4])
    return 0


# A waiter entry, the value of ``_waiters`` and the element of the timer queue (one tuple per
# request): (deadline, correlation id, future, flags, group, timeout, connection state). flags is
# -1 for a request() (nothing accounted here), else the SUBMIT_TRACK/SUBMIT_DURATION bits of a
# submit(); timeout is the request's own or None (the default).
cdef int _PR_NOT_SUBMITTED = -1
# After close(), how long the transport may take to hand its last bytes to the kernel before
# it is aborted (an agent that stopped reading would otherwise keep it open forever).
cdef double _pr_CLOSE_GRACE = 0.25


cdef inline double _pr_monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline int _pr_grow(bytearray buf, Py_ssize_t size) except -1:
    """Resize ``buf`` to ``size`` bytes, reserving capacity geometrically.

    PyByteArray_Resize allocates exactly what is asked once a buffer grows by more than
    1/8, so appending frame after frame would copy the whole queue on every append.
    """
    if size >= (<_pr_bytearray *>buf).ob_alloc:
        PyByteArray_Resize(buf, size + (size >> 1))
    PyByteArray_Resize(buf, size)
    return 0


cdef inline void _pr_put_header(bytearray buf, Py_ssize_t at, Py_ssize_t n, int msg_type) noexcept:
    cdef unsigned char *dst = <unsigned char *>PyByteArray_AS_STRING(buf) + at
    dst[0] = <unsigned char>(((n + 1) >> 24) & 0xff)
    dst[1] = <unsigned char>(((n + 1) >> 16) & 0xff)
    dst[2] = <unsigned char>(((n + 1) >> 8) & 0xff)
    dst[3] = <unsigned char>((n + 1) & 0xff)
    dst[4] = <unsigned char>msg_type


def clone_error(exc):
    """A fresh copy of an agentpool error (so every failed waiter gets its own instance)."""
    cls = type(exc)
    if cls is _errors.ConnectionClosed:
        return _errors.ConnectionClosed(exc.detail)
    if cls is _errors.InvalidMessage:
        return _errors.InvalidMessage(exc.reason, field=exc.field)
    if cls is _errors.MessageTooLarge:
        return _errors.MessageTooLarge(exc.size, exc.max)
    if cls is _errors.Io:
        return _errors.Io(exc.error)
    return exc


cdef class AgentProtocolCore:
    """asyncio protocol for one proxy→agent connection (compiled hot path).

    Decodes frames, routes AgentResponse frames to the waiter future registered under their
    correlation id, hands every other frame to ``on_frame(msg_type, payload)``, expires
    requests after their timeout, coalesces the frames written during one loop iteration into
    a single ``transport.write`` and bounds what it queues: once ``max_write_buffer`` bytes
    wait in its own buffer (plus the transport's while writes are paused) ``request`` fails
    with Unavailable. ``close()`` never waits on an agent that stopped reading: queued data
    is dropped (the waiters are already failed) and the transport aborted.
    ``on_lost(exc)`` is called once when the transport is gone, with the error that closed
    it (None after a local ``close()``).

    A request abandoned before its reply (timeout, :meth:`discard`, :meth:`cancel`) leaves a
    tombstone for its correlation id and queues a Cancel frame; the owed reply, when it
    comes, is consumed by the tombstone. While an id has a live waiter or a tombstone, a new
    request with it is refused with DuplicateCorrelationId, so a late reply can never answer
    another event. Tombstones never expire: more than ``max_abandoned`` of them close the
    connection as broken (docs/protocol.md, "Abandoned requests").
    """

    def __init__(self, loop, on_frame, on_lost, *, double request_timeout=30.0,
                 Py_ssize_t max_write_buffer=4 * 1024 * 1024,
                 Py_ssize_t max_frame_size=_MAX_MESSAGE_SIZE,
                 agent_id=None, Py_ssize_t max_abandoned=1024):
        if not (request_timeout > 0.0 and request_timeout < INFINITY):
            raise ValueError(
                f"request_timeout must be a positive finite number, not {request_timeout!r}")
        if max_abandoned < 0:
            raise ValueError("max_abandoned must not be negative")
        self._loop = loop
        self._create_future = loop.create_future
        self._call_soon = loop.call_soon
        self._call_later = loop.call_later
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._decoder = FrameDecoder(max_frame_size)
        self._decode = None
        self._encode = None
        self._waiters = {}
        self._tombs = {}
        self._encode_cancel = None
        self._tq = _pr_deque()
        self._timer = None
        self._wbuf = bytearray()
        self._flush_scheduled = False
        self._wrote_direct = False
        self._drain_waiters = []
        self._flush_cb = self._flush
        self._timer_cb = self._on_timer
        self.transport = None
        self.request_timeout = request_timeout
        self.agent_id = agent_id
        self.max_abandoned = max_abandoned
        self.max_write_buffer = max_write_buffer
        self.write_paused = False
        self.closed = False
        self.close_error = None
        self._pm = None
        self._on_aff_reject = None
        self._hdr = None
        self._resp = None
        self._resp_mode = 0
        self._queued = 0
        self.flush_after = _pr_FLUSH_AFTER

    def set_accounting(self, ProtocolMetrics metrics, on_affinity_rejected=None):
        """Account :meth:`submit`-ted requests in ``metrics``; ``on_affinity_rejected()`` is
        called when the affinity map refuses a new correlation id (at capacity)."""
        self._pm = metrics
        self._on_aff_reject = on_affinity_rejected

    def set_fast_paths(self, HeadersEventEncoder headers=None, ResponseFactory responses=None,
                       str encoding="json"):
        """C paths tried before the Python encoder/decoder: ``headers`` writes JSON
        RequestHeaders events straight into the write buffer; ``responses`` recognises the
        canonical Allow reply of ``encoding`` (json or msgpack) without parsing it."""
        self._hdr = headers if encoding == "json" else None
        self._resp = responses
        self._resp_mode = 0 if responses is None else (1 if encoding == "json" else 2)

    def set_decoder(self, decode_response):
        """Route AgentResponse frames with ``decode_response(payload) -> (cid, response)``.

        Clears the reply fast path (set it again with :meth:`set_fast_paths`)."""
        self._decode = decode_response
        self._resp = None
        self._resp_mode = 0

    def set_encoder(self, encode_event):
        """Encode events for :meth:`send_event` with ``encode_event(event, cid) -> bytes``.

        Clears the event fast path (set it again with :meth:`set_fast_paths`)."""
        self._encode = encode_event
        self._hdr = None

    def set_cancel_encoder(self, encode_cancel):
        """Build Cancel payloads for abandoned requests with ``encode_cancel(cid, reason)``."""
        self._encode_cancel = encode_cancel

    @property
    def in_flight(self):
        return len(self._waiters)

    @property
    def abandoned_pending(self):
        """Replies still owed to abandoned requests (tombstones)."""
        return len(self._tombs)

    def is_pending(self, str correlation_id):
        """Whether ``correlation_id`` has a live waiter or owes a reply on this connection."""
        return correlation_id in self._waiters or correlation_id in self._tombs

    @property
    def write_buffer_size(self):
        return PyByteArray_GET_SIZE(self._wbuf)

    @property
    def write_queue_full(self):
        return (PyByteArray_GET_SIZE(self._wbuf) >= self.max_write_buffer
                or (self.write_paused and self._paused_over_bound()))

    def waiting_ids(self):
        """Correlation ids with a live waiter."""
        return [cid for cid, e in self._waiters.items() if not (<tuple>e)[2].done()]

    # -- asyncio protocol callbacks --------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        cdef list frames
        cdef tuple frame
        cdef object msg_type, payload, decode, fut, cid, response, entry
        cdef dict waiters = self._waiters
        self._wrote_direct = False
        self.bytes_received += len(data)
        try:
            frames = self._decoder.feed(data)
        except _errors.AgentProtocolError as exc:
            self._fatal(exc)
            return
        decode = self._decode
        cdef ResponseFactory resp = self._resp
        for frame in frames:
            msg_type = frame[0]
            payload = frame[1]
            self.frames_received += 1
            if msg_type is _pr_AGENT_RESPONSE and decode is not None:
                response = resp.match(payload, self._resp_mode) if self._resp_mode else None
                if response is not None:
                    cid = resp.cid_of(response)
                else:
                    try:
                        cid, response = decode(payload)
                    except Exception:
                        self.decode_errors += 1
                        self._on_frame(msg_type, payload)
                        continue
                entry = waiters.pop(cid, None)
                if entry is None:
                    if self._tombs and self._tombs.pop(cid, None) is not None:
                        self.late_replies += 1
                    else:
                        self.unmatched_responses += 1
                    continue
                fut = (<tuple>entry)[2]
                if fut.done():  # cancelled by its holder: this is the reply it gave up on
                    self.late_replies += 1
                    _pr_entry_gone(<tuple>entry)
                    continue
                self._complete(<tuple>entry, response)
            else:
                self._on_frame(msg_type, payload)
                if self.closed:
                    return
        if self._decoder._error is not None:
            try:
                self._decoder.feed(b"")
            except _errors.AgentProtocolError as exc:
                self._fatal(exc)

    def eof_received(self):
        self._shutdown(_errors.ConnectionClosed("agent closed the connection"))
        self._close_transport()
        return None

    def connection_lost(self, exc):
        if exc is None:
            err = _errors.ConnectionClosed("agent closed the connection")
        else:
            err = _errors.ConnectionClosed(str(exc) or type(exc).__name__)
        self._shutdown(err)
        self.transport = None
        self._wbuf = bytearray()
        cb = self._on_lost
        self._on_lost = None
        if cb is not None:
            cb(self.close_error)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        if PyByteArray_GET_SIZE(self._wbuf) and not self._flush_scheduled:
            self._do_flush()
        if self._drain_waiters and not self.write_paused:
            self._wake_writers()

    # -- requests --------------------------------------------------------------------------

    cpdef object request(self, int msg_type, object payload, str correlation_id, object timeout=None):
        """Send an event frame and return the future its AgentResponse will resolve."""
        cdef object fut, handle
        cdef double t = 0.0
        cdef dict waiters = self._waiters
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        if timeout is not None:
            t = timeout
            if not (t > 0.0 and t < INFINITY):
                raise ValueError(f"timeout must be a positive finite number, not {timeout!r}")
        if correlation_id in waiters or (self._tombs and correlation_id in self._tombs):
            self.refused += 1
            raise _errors.DuplicateCorrelationId(correlation_id, self._where())
        if (PyByteArray_GET_SIZE(self._wbuf) >= self.max_write_buffer
                or (self.write_paused and self._paused_over_bound())):
            raise _errors.Unavailable("write buffer full: the agent is not reading")
        self._append_frame(msg_type, payload)
        fut = self._create_future()
        self._register(correlation_id, fut, timeout, t, _PR_NOT_SUBMITTED, None, None)
        return fut

    cdef int _register(self, str correlation_id, object fut, object timeout, double t,
                       int flags, object group, object st) except -1:
        cdef tuple entry
        cdef bint default = timeout is None or t == self.request_timeout
        entry = (_pr_monotonic() + (self.request_timeout if default else t), correlation_id, fut,
                 flags, group, None if default else timeout, st)
        self._waiters[correlation_id] = entry
        self.requests_sent += 1
        if default:
            tq = self._tq
            while tq and (<tuple>tq[0])[2].done():
                tq.popleft()
            tq.append(entry)
            if self._timer is None:
                self._arm()
            elif len(tq) > 2 * len(self._waiters) + 1024:
                self._tq = _pr_deque([e for e in tq if not (<tuple>e)[2].done()])
        else:
            handle = self._call_later(t, self._expire_cb, correlation_id, entry, t)
            fut.add_done_callback(_PrTimerCanceller(handle))
        return 0

    cdef int _complete(self, tuple entry, object response) except -1:
        """Resolve a waiter with its reply and account a submitted request's success."""
        cdef ProtocolMetrics pm
        cdef int flags = entry[3]
        cdef double started
        entry[2].set_result(response)
        self.responses_received += 1
        if flags == _PR_NOT_SUBMITTED:
            return 0
        (<ConnState>entry[6]).finish(True)
        if entry[4] is not None:
            _pr_group_done(<RequestGroup>entry[4])
        pm = self._pm
        if pm is not None:
            if flags & _pr_F_TRACK:
                pm._responses_total += 1
                if pm._in_flight_requests > 0:
                    pm._in_flight_requests -= 1
            if flags & _pr_F_DURATION:
                started = <double>entry[0] - (
                    self.request_timeout if entry[5] is None else <double>entry[5])
                pm._request_duration._record(_pr_monotonic() - started)
        return 0

    cpdef object submit(self, object event, str correlation_id, object timeout,
                        ConnState st, AffinityMap affinity, int flags,
                        RequestGroup group=None):
        """Send ``event`` as one request with its accounting; the future of its reply.

        One call does what a request needs before it waits: the checks (closed, duplicate
        id here or on the connection ``affinity`` binds it to, write queue full), the encode
        (the C writer straight into the write buffer, else the Python encoder), the frame,
        the waiter and its timer, ``st.begin`` (unless SUBMIT_BEGUN: a slot was taken for
        it), the affinity store (SUBMIT_STORE_AFFINITY), and the metrics (SUBMIT_TRACK:
        requests, in flight; SUBMIT_SAMPLE: serialization time). Its successful completion
        is accounted here too (``st.finish(True)``, responses, in flight, SUBMIT_DURATION:
        request duration); a failure is left to the caller. When this raises, nothing has
        been accounted and nothing written. With a ``group``, its countdown includes this
        request until it completes (reply, error, timeout or abandon).
        """
        cdef double t = 0.0, now, t0
        cdef dict waiters = self._waiters
        cdef bytearray buf
        cdef Py_ssize_t old, n
        cdef int msg_type
        cdef object prev, fut, payload
        cdef ProtocolMetrics pm = self._pm
        cdef bint direct
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        if timeout is not None:
            t = timeout
            if not (t > 0.0 and t < INFINITY):
                raise ValueError(f"timeout must be a positive finite number, not {timeout!r}")
        if correlation_id in waiters or (self._tombs and correlation_id in self._tombs):
            self.refused += 1
            raise _errors.DuplicateCorrelationId(correlation_id, self._where())
        if flags & _pr_F_STORE_AFFINITY:
            # a new request whose id is still owed a reply on another connection of the agent
            prev = affinity.peek(correlation_id)
            if (prev is not None and prev is not st and not (<ConnState>prev).closed
                    and (<ConnState>prev)._conn.is_pending(correlation_id)):
                raise _errors.DuplicateCorrelationId(
                    correlation_id, f"agent {self.agent_id!r}")
        buf = self._wbuf
        old = PyByteArray_GET_SIZE(buf)
        if (old >= self.max_write_buffer
                or (self.write_paused and self._paused_over_bound())):
            raise _errors.Unavailable("write buffer full: the agent is not reading")
        t0 = _pr_monotonic() if flags & _pr_F_SAMPLE else 0.0
        n = -1
        if self._hdr is not None:
            _pr_grow(buf, old + _HEADER)
            n = _cd_headers_into(self._hdr, buf, old + _HEADER, event, correlation_id)
            if n < 0:
                PyByteArray_Resize(buf, old)
        if n >= 0:
            if n > _MAX_MESSAGE_SIZE:
                PyByteArray_Resize(buf, old)
                raise _errors.MessageTooLarge(n, _MAX_MESSAGE_SIZE)
            _pr_put_header(buf, old, n, 0x10)
            self.frames_sent += 1
            direct = (not self._wrote_direct and not waiters and not self._flush_scheduled
                      and not self.write_paused and self.transport is not None and old == 0)
            if direct:
                self._do_flush()
                self._wrote_direct = True
            elif not self.write_paused:
                self._queued += 1
                if self._queued >= self.flush_after > 0:
                    self._do_flush()
                elif not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._call_soon(self._flush_cb)
        else:
            encode = self._encode
            if encode is None:
                raise TypeError("no event encoder set")
            try:
                msg_type = event.MESSAGE_TYPE
            except AttributeError:
                raise _errors.Serialization(f"not an event: {type(event).__name__}") from None
            self._append_frame(msg_type, encode(event, correlation_id))
        now = _pr_monotonic()
        fut = self._create_future()
        self._register(correlation_id, fut, timeout, t, flags & (_pr_F_TRACK | _pr_F_DURATION),
                       group, st)
        if group is not None:
            group.remaining += 1
        if not flags & _pr_F_BEGUN:
            st._in_flight += 1
        st._last_used = now
        if flags & _pr_F_STORE_AFFINITY and not affinity._store(correlation_id, st, now):
            if self._on_aff_reject is not None:
                self._on_aff_reject()
        if pm is not None and flags & _pr_F_TRACK:
            pm._requests_total += 1
            pm._in_flight_requests += 1
            if flags & _pr_F_SAMPLE:
                pm._serialization_time._record(now - t0)
        return fut

    cpdef object send_event(self, object event, str correlation_id, object timeout=None):
        """Encode ``event`` (see set_encoder) and :meth:`request` it; the future of its reply."""
        encode = self._encode
        if encode is None:
            raise TypeError("no event encoder set")
        try:
            msg_type = event.MESSAGE_TYPE
        except AttributeError:
            raise _errors.Serialization(f"not an event: {type(event).__name__}") from None
        return self.request(msg_type, encode(event, correlation_id), correlation_id, timeout)

    cpdef write_frame(self, int msg_type, object payload):
        """Queue a non-request frame (cancel, ping, config update response...)."""
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        self._append_frame(msg_type, payload)

    def discard(self, str correlation_id, fut=None, int reason=_pr_REASON_MANUAL):
        """Abandon the request waiting on ``correlation_id`` (only if it is ``fut``, when given).

        Its waiter is dropped (failed with RequestCancelled if still pending), a tombstone
        keeps the reply it owes from answering anything else, and a Cancel frame is queued.
        """
        entry = self._waiters.get(correlation_id)
        if entry is None or (fut is not None and (<tuple>entry)[2] is not fut):
            return False
        del self._waiters[correlation_id]
        _pr_entry_gone(<tuple>entry)
        cur = (<tuple>entry)[2]
        if not cur.done():
            cur.set_exception(_errors.RequestCancelled(f"request {correlation_id} abandoned"))
        self._entomb(correlation_id, reason)
        return True

    def cancel(self, str correlation_id, int reason, exc):
        """Cancel a live request: fail its waiter with ``exc``, tombstone it, queue a Cancel.

        False (nothing queued) when no request waits on ``correlation_id``.
        """
        entry = self._waiters.pop(correlation_id, None)
        if entry is None:
            return False
        _pr_entry_gone(<tuple>entry)
        fut = (<tuple>entry)[2]
        if not fut.done():
            fut.set_exception(exc)
        self._entomb(correlation_id, reason)
        return True

    def fail_waiter(self, str correlation_id, exc):
        """The reply owed to ``correlation_id`` arrived but is unusable: fail its waiter.

        A tombstone for it is cleared instead (its reply has come). True if a live waiter
        was failed.
        """
        entry = self._waiters.pop(correlation_id, None)
        if entry is None:
            if self._tombs.pop(correlation_id, None) is not None:
                self.late_replies += 1
            return False
        _pr_entry_gone(<tuple>entry)
        fut = (<tuple>entry)[2]
        if fut.done():
            return False
        fut.set_exception(exc)
        return True

    def wait_writable(self):
        """A future resolved when the write queue has room again (None if it has now).

        It resolves on the next flush that leaves the transport writable, or on
        ``resume_writing``; the caller should check again (others may have filled it).
        """
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        if not self.write_queue_full:
            return None
        if not self.write_paused and not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_soon(self._flush_cb)
        fut = self._create_future()
        self._drain_waiters.append(fut)
        return fut

    def close(self, error=None):
        """Fail every waiter (``error`` or ConnectionClosed) and close the transport.

        Queued frames are flushed while the agent keeps reading; if it does not (writes
        paused, or the transport still holds data after the grace period) the transport is
        aborted, so the connection is always gone promptly.
        """
        if not self.closed:
            self._shutdown(error or _errors.ConnectionClosed("connection closed by the proxy"))
            if error is None:
                self.close_error = None
        self._close_transport()

    def abort(self, error=None):
        """Like :meth:`close` but drops unsent data."""
        if not self.closed:
            self._shutdown(error or _errors.ConnectionClosed("connection aborted by the proxy"))
        self._wbuf = bytearray()
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------

    cdef int _append_frame(self, int msg_type, object payload) except -1:
        """Queue one frame, written at once when the line is idle.

        A frame is written directly when no request is outstanding on the connection and none
        was written directly since the last read or flush; other frames are coalesced and
        written by one flush callback (call_soon), so under load the frames of one loop
        iteration share one write and at low concurrency there is neither an extra loop hop
        nor a callback.
        """
        cdef Py_buffer view
        cdef Py_ssize_t n, old
        cdef unsigned char *dst
        cdef bint direct
        cdef bytes frame
        if msg_type < 0 or msg_type > 255 or _TYPE_TABLE[msg_type] is None:
            raise _errors.InvalidMessage(f"Unknown message type: 0x{msg_type & 0xff:02x}")
        transport = self.transport
        direct = (not self._wrote_direct and not self._waiters and not self._flush_scheduled
                  and not self.write_paused
                  and transport is not None and PyByteArray_GET_SIZE(self._wbuf) == 0)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n > _MAX_MESSAGE_SIZE:
                raise _errors.MessageTooLarge(n, _MAX_MESSAGE_SIZE)
            if direct:
                frame = PyBytes_FromStringAndSize(NULL, n + _HEADER)
                dst = <unsigned char *>PyBytes_AS_STRING(frame)
            else:
                old = PyByteArray_GET_SIZE(self._wbuf)
                _pr_grow(self._wbuf, old + n + _HEADER)
                dst = <unsigned char *>PyByteArray_AS_STRING(self._wbuf) + old
            dst[0] = <unsigned char>(((n + 1) >> 24) & 0xff)
            dst[1] = <unsigned char>(((n + 1) >> 16) & 0xff)
            dst[2] = <unsigned char>(((n + 1) >> 8) & 0xff)
            dst[3] = <unsigned char>((n + 1) & 0xff)
            dst[4] = <unsigned char>msg_type
            if n:
                memcpy(dst + _HEADER, view.buf, n)
        finally:
            PyBuffer_Release(&view)
        self.frames_sent += 1
        if direct:
            self._wrote_direct = True
            if not transport.is_closing():
                self.bytes_sent += n + _HEADER
                self.writes += 1
                transport.write(frame)
        elif not self.write_paused:
            self._queued += 1
            if self._queued >= self.flush_after > 0:
                self._do_flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._call_soon(self._flush_cb)
        return 0

    def _flush(self):
        self._flush_scheduled = False
        self._wrote_direct = False
        self._do_flush()

    cdef int _do_flush(self) except -1:
        cdef bytearray data
        if self.write_paused or not PyByteArray_GET_SIZE(self._wbuf):
            return 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        data = self._wbuf
        self._wbuf = bytearray()
        self._queued = 0
        self.bytes_sent += PyByteArray_GET_SIZE(data)
        self.writes += 1
        transport.write(data)
        if self._drain_waiters and not self.write_paused:
            self._wake_writers()
        return 0

    cdef bint _paused_over_bound(self) except -1:
        """Own queue plus the transport's buffer at or over the bound (writes paused)."""
        transport = self.transport
        if transport is None:
            return False
        return (PyByteArray_GET_SIZE(self._wbuf) + <Py_ssize_t>transport.get_write_buffer_size()
                >= self.max_write_buffer)

    cdef int _wake_writers(self) except -1:
        waiters = self._drain_waiters
        self._drain_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        return 0

    cdef int _close_transport(self) except -1:
        """Close the transport without ever waiting on an agent that does not read."""
        transport = self.transport
        if transport is None:
            return 0
        if PyByteArray_GET_SIZE(self._wbuf) and not self.write_paused:
            self._do_flush()
        self._wbuf = bytearray()
        if self.write_paused:
            transport.abort()
            return 0
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            self._call_later(_pr_CLOSE_GRACE, self._grace_abort, transport)
        return 0

    def _grace_abort(self, transport):
        if self.transport is transport:
            transport.abort()

    cdef int _arm(self) except -1:
        cdef double delay
        if self._tq and not self.closed:
            delay = (<tuple>self._tq[0])[0] - _pr_monotonic()
            self._timer = self._call_later(delay if delay > 0 else 0.0, self._timer_cb)
        return 0

    def _on_timer(self):
        cdef double now, deadline
        cdef tuple entry
        self._timer = None
        now = _pr_monotonic() + _pr_TIMER_SLACK
        tq = self._tq
        while tq:
            entry = <tuple>tq[0]
            fut = entry[2]
            if fut.done():
                tq.popleft()
                if self._waiters.get(entry[1]) is entry:
                    self._expire(entry[1], entry, self.request_timeout)
                continue
            deadline = entry[0]
            if deadline <= now:
                tq.popleft()
                self._expire(entry[1], entry, self.request_timeout)
            else:
                break
        self._arm()

    def _expire_cb(self, cid, tuple entry, double timeout):
        self._expire(cid, entry, timeout)

    cdef int _expire(self, object cid, tuple entry, double timeout) except -1:
        cdef bint registered = self._waiters.get(cid) is entry
        fut = entry[2]
        if registered:
            del self._waiters[cid]
            _pr_entry_gone(entry)
        if not fut.done():
            self.timeouts += 1
            fut.set_exception(
                _errors.Timeout(timeout, agent_id=self.agent_id, correlation_id=cid))
            if registered:
                self._entomb(cid, _pr_REASON_TIMEOUT)
        elif registered:  # given up by its holder without discard(): still owes a reply
            self._entomb(cid, _pr_REASON_MANUAL)
        return 0

    cdef int _entomb(self, object cid, int reason) except -1:
        """Remember that ``cid`` owes a reply; queue a Cancel; too many owed: broken."""
        if self.closed:
            return 0
        cdef dict tombs = self._tombs
        tombs[cid] = reason
        self.abandoned += 1
        encode = self._encode_cancel
        if encode is not None:
            try:
                self._append_frame(_pr_CANCEL, encode(cid, reason))
            except Exception:  # the tombstone alone keeps the owed reply from crossing
                pass
        if len(tombs) > self.max_abandoned:
            self._shutdown(_errors.ConnectionClosed(
                f"the agent owes {len(tombs)} replies to abandoned requests "
                f"(more than max_abandoned={self.max_abandoned}); connection recycled"))
            self._close_transport()
        return 0

    def _where(self):
        if self.agent_id is None:
            return "this connection"
        return f"a connection to agent {self.agent_id!r}"

    cdef int _fatal(self, object error) except -1:
        self._shutdown(error)
        self._wbuf = bytearray()
        if self.transport is not None:
            self.transport.abort()
        return 0

    cdef int _shutdown(self, object error) except -1:
        if self.closed:
            return 0
        self.closed = True
        self.close_error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._tq.clear()
        self._tombs.clear()
        waiters = self._waiters
        self._waiters = {}
        for entry in waiters.values():
            fut = (<tuple>entry)[2]
            if not fut.done():
                fut.set_exception(clone_error(error))
            _pr_entry_gone(<tuple>entry)
        drains = self._drain_waiters
        self._drain_waiters = []
        for d in drains:
            if not d.done():
                d.set_exception(clone_error(error))
        return 0


@cython.final
cdef class _PrTimerCanceller:
    """Done-callback cancelling a per-request timer (requests with a non-default timeout)."""
    cdef object handle

    def __cinit__(self, handle):
        self.handle = handle

    def __call__(self, fut):
        self.handle.cancel()
