"""Pure-Python twin of ``_protocol.pxi``: the proxy side's per-connection hot path.

Long on purpose: it mirrors the compiled core's single class method for method, so the two
can be compared side by side (until both are built from one source).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import errors as _errors
from ._framing_py import MAX_MESSAGE_SIZE, FrameDecoder
from .enums import MessageType

if TYPE_CHECKING:
    from ._metrics_py import ProtocolMetrics
    from ._selection_py import AffinityMap, ConnState

    _ProtocolBase = asyncio.Protocol
else:
    # an asyncio protocol by its methods, as the compiled class (which cannot subclass it)
    _ProtocolBase = object

__all__ = [
    "FLUSH_AFTER",
    "SUBMIT_BEGUN",
    "SUBMIT_DURATION",
    "SUBMIT_SAMPLE",
    "SUBMIT_STORE_AFFINITY",
    "SUBMIT_TRACK",
    "AgentProtocolCore",
    "RequestGroup",
    "clone_error",
]

_AGENT_RESPONSE = MessageType.AGENT_RESPONSE
_CANCEL = int(MessageType.CANCEL)
# CancelReason values on the wire (0-based, docs/protocol.md)
REASON_TIMEOUT = 1
REASON_MANUAL = 5
_VALID_TYPES = frozenset(int(t) for t in MessageType)
_TIMER_SLACK = 0.0005
# Under load the frames of one loop iteration share one write; with ``flush_after`` = N > 0 they
# are written as soon as N are queued, so the agent can start on them while the rest are
# encoded. Off by default: on the 2-core machine measured it cost client CPU and gained no
# throughput (docs/performance.md, "Writes").
FLUSH_AFTER = 0
# submit() flags (the first ones are the pool's request kinds)
SUBMIT_TRACK = 1
SUBMIT_DURATION = 2
SUBMIT_STORE_AFFINITY = 8
SUBMIT_BEGUN = 128
SUBMIT_SAMPLE = 256
# After close(), how long the transport may take to hand its last bytes to the kernel before
# it is aborted (an agent that stopped reading would otherwise keep it open forever).
_CLOSE_GRACE = 0.25

ErrorFactory = Callable[[], BaseException]


def clone_error(exc: BaseException) -> BaseException:
    """A fresh copy of an agentpool error (so every failed waiter gets its own instance)."""
    cls = type(exc)
    if cls is _errors.ConnectionClosed:
        return _errors.ConnectionClosed(exc.detail)  # type: ignore[attr-defined]
    if cls is _errors.InvalidMessage:
        return _errors.InvalidMessage(exc.reason, field=exc.field)  # type: ignore[attr-defined]
    if cls is _errors.MessageTooLarge:
        return _errors.MessageTooLarge(exc.size, exc.max)  # type: ignore[attr-defined]
    if cls is _errors.Io:
        return _errors.Io(exc.error)  # type: ignore[attr-defined]
    return exc


class _TimerCanceller:
    """Done-callback cancelling a per-request timer (requests with a non-default timeout)."""

    __slots__ = ("handle",)

    def __init__(self, handle: asyncio.TimerHandle) -> None:
        self.handle = handle

    def __call__(self, fut: asyncio.Future[Any]) -> None:
        self.handle.cancel()


class RequestGroup:
    """Requests awaited together: ``future`` resolves (None) once every request submitted
    with the group has completed, whatever its outcome (no callback per request)."""

    __slots__ = ("future", "remaining")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.remaining = 0

    def _done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)


_NOT_SUBMITTED = -1
_Entry = tuple[float, str, "asyncio.Future[Any]", int, "RequestGroup | None", "float | None", Any]


def _entry_gone(entry: _Entry) -> None:
    """A request left the waiter map without its reply: count it in its group."""
    group = entry[4]
    if group is not None:
        group._done()


class AgentProtocolCore(_ProtocolBase):
    """asyncio protocol for one proxy→agent connection.

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

    transport: asyncio.Transport | None
    request_timeout: float
    agent_id: str | None
    max_abandoned: int
    flush_after: int
    max_write_buffer: int
    write_paused: bool
    closed: bool
    close_error: BaseException | None
    requests_sent: int
    responses_received: int
    unmatched_responses: int
    decode_errors: int
    timeouts: int
    abandoned: int
    late_replies: int
    refused: int
    frames_received: int
    frames_sent: int
    bytes_received: int
    bytes_sent: int
    writes: int

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_frame: Callable[[MessageType, bytes], object],
        on_lost: Callable[[BaseException | None], object],
        *,
        request_timeout: float = 30.0,
        max_write_buffer: int = 4 * 1024 * 1024,
        max_frame_size: int = MAX_MESSAGE_SIZE,
        agent_id: str | None = None,
        max_abandoned: int = 1024,
    ) -> None:
        if not 0.0 < request_timeout < math.inf:
            raise ValueError(
                f"request_timeout must be a positive finite number, not {request_timeout!r}"
            )
        if max_abandoned < 0:
            raise ValueError("max_abandoned must not be negative")
        self._loop = loop
        self._create_future = loop.create_future
        self._on_frame = on_frame
        self._on_lost: Callable[[BaseException | None], object] | None = on_lost
        self._decoder = FrameDecoder(max_frame_size)
        self._decode: Callable[[bytes], tuple[str, Any]] | None = None
        self._encode: Callable[[Any, str], bytes] | None = None
        # correlation id -> waiter entry, also the timer queue's element: (deadline, id,
        # future, flags, group, timeout, connection state); flags -1 for request() (nothing
        # accounted here), else the SUBMIT_TRACK/SUBMIT_DURATION bits of a submit()
        self._waiters: dict[str, _Entry] = {}
        self._tombs: dict[str, int] = {}
        self._encode_cancel: Callable[[str, int], bytes] | None = None
        self._tq: collections.deque[_Entry] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._wbuf = bytearray()
        self._flush_scheduled = False
        self._wrote_direct = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.transport = None
        self.request_timeout = float(request_timeout)
        self.agent_id = agent_id
        self.max_abandoned = max_abandoned
        self.max_write_buffer = max_write_buffer
        self.write_paused = False
        self.closed = False
        self.close_error: BaseException | None = None
        self.requests_sent = 0
        self.responses_received = 0
        self.unmatched_responses = 0
        self.decode_errors = 0
        self.timeouts = 0
        self.abandoned = 0
        self.late_replies = 0
        self.refused = 0
        self.frames_received = 0
        self.frames_sent = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.writes = 0
        self._pm: ProtocolMetrics | None = None
        self._on_aff_reject: Callable[[], object] | None = None
        self._resp: Any = None
        self._resp_mode = 0
        self._queued = 0
        self.flush_after = FLUSH_AFTER

    # -- configuration -------------------------------------------------------------------

    def set_accounting(
        self, metrics: ProtocolMetrics, on_affinity_rejected: Callable[[], object] | None = None
    ) -> None:
        """Account :meth:`submit`-ted requests in ``metrics``; ``on_affinity_rejected()`` is
        called when the affinity map refuses a new correlation id (at capacity)."""
        self._pm = metrics
        self._on_aff_reject = on_affinity_rejected

    def set_fast_paths(
        self, headers: Any = None, responses: Any = None, encoding: str = "json"
    ) -> None:
        """C paths tried before the Python encoder/decoder in the compiled core; here only
        ``responses`` (the canonical Allow recogniser of ``encoding``) is used."""
        self._resp = responses
        self._resp_mode = 0 if responses is None else (1 if encoding == "json" else 2)

    def set_decoder(self, decode_response: Callable[[bytes], tuple[str, Any]] | None) -> None:
        """Route AgentResponse frames with ``decode_response(payload) -> (cid, response)``.

        Clears the reply fast path (set it again with :meth:`set_fast_paths`)."""
        self._decode = decode_response
        self._resp = None
        self._resp_mode = 0

    def set_encoder(self, encode_event: Callable[[Any, str], bytes] | None) -> None:
        """Encode events for :meth:`send_event` with ``encode_event(event, cid) -> bytes``.

        Clears the event fast path (set it again with :meth:`set_fast_paths`)."""
        self._encode = encode_event

    def set_cancel_encoder(self, encode_cancel: Callable[[str, int], bytes] | None) -> None:
        """Build Cancel payloads for abandoned requests with ``encode_cancel(cid, reason)``."""
        self._encode_cancel = encode_cancel

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    @property
    def abandoned_pending(self) -> int:
        """Replies still owed to abandoned requests (tombstones)."""
        return len(self._tombs)

    def is_pending(self, correlation_id: str) -> bool:
        """Whether ``correlation_id`` has a live waiter or owes a reply on this connection."""
        return correlation_id in self._waiters or correlation_id in self._tombs

    @property
    def write_buffer_size(self) -> int:
        return len(self._wbuf)

    @property
    def write_queue_full(self) -> bool:
        return len(self._wbuf) >= self.max_write_buffer or (
            self.write_paused and self._paused_over_bound()
        )

    def waiting_ids(self) -> list[str]:
        """Correlation ids with a live waiter."""
        return [cid for cid, e in self._waiters.items() if not e[2].done()]

    # -- asyncio protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._wrote_direct = False
        self.bytes_received += len(data)
        try:
            frames = self._decoder.feed(data)
        except _errors.AgentProtocolError as exc:
            self._fatal(exc)
            return
        decode = self._decode
        waiters = self._waiters
        for msg_type, payload in frames:
            self.frames_received += 1
            if msg_type is _AGENT_RESPONSE and decode is not None:
                response = self._resp.match(payload, self._resp_mode) if self._resp_mode else None
                if response is not None:
                    cid = response._lazy
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
                if entry[2].done():  # cancelled by its holder: the reply it gave up on
                    self.late_replies += 1
                    _entry_gone(entry)
                    continue
                self._complete(entry, response)
            else:
                self._on_frame(msg_type, payload)
                if self.closed:
                    return
        if self._decoder.failed:
            try:
                self._decoder.feed(b"")
            except _errors.AgentProtocolError as exc:
                self._fatal(exc)

    def eof_received(self) -> bool | None:
        self._shutdown(_errors.ConnectionClosed("agent closed the connection"))
        self._close_transport()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            err: BaseException = _errors.ConnectionClosed("agent closed the connection")
        else:
            err = _errors.ConnectionClosed(str(exc) or type(exc).__name__)
        self._shutdown(err)
        self.transport = None
        self._wbuf = bytearray()
        cb = self._on_lost
        self._on_lost = None
        if cb is not None:
            cb(self.close_error)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._wbuf and not self._flush_scheduled:
            self._flush()
        if self._drain_waiters and not self.write_paused:
            self._wake_writers()

    # -- requests --------------------------------------------------------------------------

    def request(
        self, msg_type: int, payload: bytes, correlation_id: str, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Send an event frame and return the future its AgentResponse will resolve."""
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        if timeout is not None and not 0.0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive finite number, not {timeout!r}")
        waiters = self._waiters
        if correlation_id in waiters or (self._tombs and correlation_id in self._tombs):
            self.refused += 1
            raise _errors.DuplicateCorrelationId(correlation_id, self._where())
        if len(self._wbuf) >= self.max_write_buffer or (
            self.write_paused and self._paused_over_bound()
        ):
            raise _errors.Unavailable("write buffer full: the agent is not reading")
        self._append_frame(msg_type, payload)
        fut: asyncio.Future[Any] = self._create_future()
        self._register(correlation_id, fut, timeout, _NOT_SUBMITTED, None, None)
        return fut

    def _register(
        self,
        correlation_id: str,
        fut: asyncio.Future[Any],
        timeout: float | None,
        flags: int,
        group: RequestGroup | None,
        st: ConnState | None,
    ) -> None:
        default = timeout is None or timeout == self.request_timeout
        t = self.request_timeout if default or timeout is None else timeout
        entry: _Entry = (
            time.monotonic() + t,
            correlation_id,
            fut,
            flags,
            group,
            None if default else timeout,
            st,
        )
        self._waiters[correlation_id] = entry
        self.requests_sent += 1
        if default:
            tq = self._tq
            while tq and tq[0][2].done():
                tq.popleft()
            tq.append(entry)
            if self._timer is None:
                self._arm()
            elif len(tq) > 2 * len(self._waiters) + 1024:
                self._compact()
        else:
            handle = self._loop.call_later(t, self._expire, correlation_id, entry, t)
            fut.add_done_callback(_TimerCanceller(handle))

    def _complete(self, entry: _Entry, response: Any) -> None:
        """Resolve a waiter with its reply and account a submitted request's success."""
        deadline, _cid, fut, flags, group, timeout, st = entry
        fut.set_result(response)
        self.responses_received += 1
        if flags == _NOT_SUBMITTED:
            return
        st.finish(True)
        if group is not None:
            group._done()
        pm = self._pm
        if pm is not None:
            if flags & SUBMIT_TRACK:
                pm.inc_responses()
                pm.dec_in_flight()
            if flags & SUBMIT_DURATION:
                started = deadline - (self.request_timeout if timeout is None else timeout)
                pm.record_request_duration(time.monotonic() - started)

    def submit(
        self,
        event: Any,
        correlation_id: str,
        timeout: float | None,
        st: ConnState,
        affinity: AffinityMap,
        flags: int,
        group: RequestGroup | None = None,
    ) -> asyncio.Future[Any]:
        """Send ``event`` as one request with its accounting; the future of its reply.

        One call does what a request needs before it waits: the checks (closed, duplicate
        id here or on the connection ``affinity`` binds it to, write queue full), the encode,
        the frame, the waiter and its timer, ``st.begin`` (unless SUBMIT_BEGUN: a slot was
        taken for it), the affinity store (SUBMIT_STORE_AFFINITY), and the metrics
        (SUBMIT_TRACK: requests, in flight; SUBMIT_SAMPLE: serialization time). Its
        successful completion is accounted here too (``st.finish(True)``, responses, in
        flight, SUBMIT_DURATION: request duration); a failure is left to the caller. When
        this raises, nothing has been accounted and nothing written. With a ``group``, its
        countdown includes this request until it completes (reply, error, timeout, abandon).
        """
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        if timeout is not None and not 0.0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive finite number, not {timeout!r}")
        if correlation_id in self._waiters or (self._tombs and correlation_id in self._tombs):
            self.refused += 1
            raise _errors.DuplicateCorrelationId(correlation_id, self._where())
        if flags & SUBMIT_STORE_AFFINITY:
            # a new request whose id is still owed a reply on another connection of the agent
            prev = affinity.peek(correlation_id)
            if (
                prev is not None
                and prev is not st
                and not prev.closed
                and prev.conn.is_pending(correlation_id)
            ):
                raise _errors.DuplicateCorrelationId(correlation_id, f"agent {self.agent_id!r}")
        if len(self._wbuf) >= self.max_write_buffer or (
            self.write_paused and self._paused_over_bound()
        ):
            raise _errors.Unavailable("write buffer full: the agent is not reading")
        encode = self._encode
        if encode is None:
            raise TypeError("no event encoder set")
        try:
            msg_type = event.MESSAGE_TYPE
        except AttributeError:
            raise _errors.Serialization(f"not an event: {type(event).__name__}") from None
        t0 = time.monotonic() if flags & SUBMIT_SAMPLE else 0.0
        self._append_frame(msg_type, encode(event, correlation_id))
        now = time.monotonic()
        fut: asyncio.Future[Any] = self._create_future()
        self._register(
            correlation_id, fut, timeout, flags & (SUBMIT_TRACK | SUBMIT_DURATION), group, st
        )
        if group is not None:
            group.remaining += 1
        if not flags & SUBMIT_BEGUN:
            st.begin(now)
        if flags & SUBMIT_STORE_AFFINITY and not affinity.store(correlation_id, st, now):
            if self._on_aff_reject is not None:
                self._on_aff_reject()
        pm = self._pm
        if pm is not None and flags & SUBMIT_TRACK:
            pm.inc_requests()
            pm.inc_in_flight()
            if flags & SUBMIT_SAMPLE:
                pm.record_serialization_time(now - t0)
        return fut

    def send_event(
        self, event: Any, correlation_id: str, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Encode ``event`` (see set_encoder) and :meth:`request` it; the future of its reply."""
        encode = self._encode
        if encode is None:
            raise TypeError("no event encoder set")
        try:
            msg_type = event.MESSAGE_TYPE
        except AttributeError:
            raise _errors.Serialization(f"not an event: {type(event).__name__}") from None
        return self.request(msg_type, encode(event, correlation_id), correlation_id, timeout)

    def write_frame(self, msg_type: int, payload: bytes) -> None:
        """Queue a non-request frame (cancel, ping, config update response...)."""
        if self.closed:
            raise clone_error(self.close_error or _errors.ConnectionClosed())
        self._append_frame(msg_type, payload)

    def discard(
        self,
        correlation_id: str,
        fut: asyncio.Future[Any] | None = None,
        reason: int = REASON_MANUAL,
    ) -> bool:
        """Abandon the request waiting on ``correlation_id`` (only if it is ``fut``, when given).

        Its waiter is dropped (failed with RequestCancelled if still pending), a tombstone
        keeps the reply it owes from answering anything else, and a Cancel frame is queued.
        """
        entry = self._waiters.get(correlation_id)
        if entry is None or (fut is not None and entry[2] is not fut):
            return False
        del self._waiters[correlation_id]
        _entry_gone(entry)
        cur = entry[2]
        if not cur.done():
            cur.set_exception(_errors.RequestCancelled(f"request {correlation_id} abandoned"))
        self._entomb(correlation_id, reason)
        return True

    def cancel(self, correlation_id: str, reason: int, exc: BaseException) -> bool:
        """Cancel a live request: fail its waiter with ``exc``, tombstone it, queue a Cancel.

        False (nothing queued) when no request waits on ``correlation_id``.
        """
        entry = self._waiters.pop(correlation_id, None)
        if entry is None:
            return False
        _entry_gone(entry)
        fut = entry[2]
        if not fut.done():
            fut.set_exception(exc)
        self._entomb(correlation_id, reason)
        return True

    def fail_waiter(self, correlation_id: str, exc: BaseException) -> bool:
        """The reply owed to ``correlation_id`` arrived but is unusable: fail its waiter.

        A tombstone for it is cleared instead (its reply has come). True if a live waiter
        was failed.
        """
        entry = self._waiters.pop(correlation_id, None)
        if entry is None:
            if self._tombs.pop(correlation_id, None) is not None:
                self.late_replies += 1
            return False
        _entry_gone(entry)
        fut = entry[2]
        if fut.done():
            return False
        fut.set_exception(exc)
        return True

    def wait_writable(self) -> asyncio.Future[None] | None:
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
            self._loop.call_soon(self._flush)
        fut: asyncio.Future[None] = self._create_future()
        self._drain_waiters.append(fut)
        return fut

    def close(self, error: BaseException | None = None) -> None:
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

    def abort(self, error: BaseException | None = None) -> None:
        """Like :meth:`close` but drops unsent data."""
        if not self.closed:
            self._shutdown(error or _errors.ConnectionClosed("connection aborted by the proxy"))
        self._wbuf = bytearray()
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------

    def _append_frame(self, msg_type: int, payload: bytes) -> None:
        """Queue one frame, written at once when the line is idle.

        A frame is written directly when no request is outstanding on the connection and none
        was written directly since the last read or flush; other frames are coalesced and
        written by one flush callback (call_soon), so under load the frames of one loop
        iteration share one write and at low concurrency there is neither an extra loop hop
        nor a callback.
        """
        n = len(payload)
        if n > MAX_MESSAGE_SIZE:
            raise _errors.MessageTooLarge(n, MAX_MESSAGE_SIZE)
        if msg_type not in _VALID_TYPES:
            raise _errors.InvalidMessage(f"Unknown message type: 0x{msg_type & 0xFF:02x}")
        transport = self.transport
        header = (n + 1).to_bytes(4, "big") + bytes((msg_type,))
        direct = (
            not self._wrote_direct
            and not self._waiters
            and not self._flush_scheduled
            and not self.write_paused
            and transport is not None
            and not self._wbuf
        )
        if not direct:
            self._wbuf += header
            self._wbuf += payload
        self.frames_sent += 1
        if direct:
            self._wrote_direct = True
            if transport is not None and not transport.is_closing():
                self.bytes_sent += n + 5
                self.writes += 1
                transport.write(header + bytes(payload))
        elif not self.write_paused:
            self._queued += 1
            if self._queued >= self.flush_after > 0:
                self._write_queued()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._wrote_direct = False
        self._write_queued()

    def _write_queued(self) -> None:
        if self.write_paused or not self._wbuf:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data, self._wbuf = self._wbuf, bytearray()
        self._queued = 0
        self.bytes_sent += len(data)
        self.writes += 1
        transport.write(data)
        if self._drain_waiters and not self.write_paused:
            self._wake_writers()

    def _paused_over_bound(self) -> bool:
        """Own queue plus the transport's buffer at or over the bound (writes paused)."""
        transport = self.transport
        if transport is None:
            return False
        return len(self._wbuf) + transport.get_write_buffer_size() >= self.max_write_buffer

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _close_transport(self) -> None:
        """Close the transport without ever waiting on an agent that does not read."""
        transport = self.transport
        if transport is None:
            return
        if self._wbuf and not self.write_paused:
            self._flush()
        self._wbuf = bytearray()
        if self.write_paused:
            transport.abort()
            return
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            self._loop.call_later(_CLOSE_GRACE, self._grace_abort, transport)

    def _grace_abort(self, transport: asyncio.Transport) -> None:
        if self.transport is transport:
            transport.abort()

    def _arm(self) -> None:
        if self._tq and not self.closed:
            delay = self._tq[0][0] - time.monotonic()
            self._timer = self._loop.call_later(max(delay, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic() + _TIMER_SLACK
        tq = self._tq
        timeout = self.request_timeout
        while tq:
            entry = tq[0]
            deadline, cid, fut = entry[0], entry[1], entry[2]
            if fut.done():
                tq.popleft()
                if self._waiters.get(cid) is entry:
                    self._expire(cid, entry, timeout)
            elif deadline <= now:
                tq.popleft()
                self._expire(cid, entry, timeout)
            else:
                break
        self._arm()

    def _expire(self, cid: str, entry: _Entry, timeout: float) -> None:
        registered = self._waiters.get(cid) is entry
        fut = entry[2]
        if registered:
            del self._waiters[cid]
            _entry_gone(entry)
        if not fut.done():
            self.timeouts += 1
            fut.set_exception(
                _errors.Timeout(timeout, agent_id=self.agent_id, correlation_id=cid)
            )
            if registered:
                self._entomb(cid, REASON_TIMEOUT)
        elif registered:  # given up by its holder without discard(): still owes a reply
            self._entomb(cid, REASON_MANUAL)

    def _entomb(self, cid: str, reason: int) -> None:
        """Remember that ``cid`` owes a reply; queue a Cancel; too many owed: broken."""
        if self.closed:
            return
        tombs = self._tombs
        tombs[cid] = reason
        self.abandoned += 1
        encode = self._encode_cancel
        if encode is not None:
            try:
                self._append_frame(_CANCEL, encode(cid, reason))
            except Exception:  # the tombstone alone keeps the owed reply from crossing
                pass
        if len(tombs) > self.max_abandoned:
            self._shutdown(
                _errors.ConnectionClosed(
                    f"the agent owes {len(tombs)} replies to abandoned requests "
                    f"(more than max_abandoned={self.max_abandoned}); connection recycled"
                )
            )
            self._close_transport()

    def _where(self) -> str:
        if self.agent_id is None:
            return "this connection"
        return f"a connection to agent {self.agent_id!r}"

    def _compact(self) -> None:
        self._tq = collections.deque(e for e in self._tq if not e[2].done())

    def _fatal(self, exc: BaseException) -> None:
        self._shutdown(exc)
        self._wbuf = bytearray()
        if self.transport is not None:
            self.transport.abort()

    def _shutdown(self, error: BaseException) -> None:
        """Mark closed and fail every waiter at once (first error wins)."""
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._tq.clear()
        self._tombs.clear()
        waiters, self._waiters = self._waiters, {}
        for entry in waiters.values():
            fut = entry[2]
            if not fut.done():
                fut.set_exception(clone_error(error))
            _entry_gone(entry)
        drains, self._drain_waiters = self._drain_waiters, []
        for d in drains:
            if not d.done():
                d.set_exception(clone_error(error))
