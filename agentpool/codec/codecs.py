"""The ``Codec`` classes: one object per payload encoding (JSON, MessagePack)."""

from __future__ import annotations

from typing import Any, Final

from ..enums import MessageType
from ..errors import AgentProtocolError, InvalidMessage
from ..messages import (
    AgentResponse,
    ConfigUpdateResponse,
    ControlMessage,
    Event,
    HealthStatus,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
)
from .control import (
    _CONFIG_UPDATE,
    _CONFIG_UPDATE_RESPONSE,
    _METRICS,
    _control_obj,
    _decode_flow,
    _decode_health,
    _is_config_update_response,
)
from .events import (
    _EVENT_ENCODERS,
    _EVENT_SCHEMAS,
    _HEADERS_ENCODER,
    _chunk_typed,
    _event_obj,
    _headers_json,
    _request_headers_fast,
    _unpack_events,
    validate_event,
)
from .response import (
    _RESPONSE,
    _RESPONSES,
    _as_bytes,
    _check_response_duplicates,
    _json_allow_fast,
    _msgpack_allow_fast,
    _response_cid,
    _response_from_map,
    _response_obj,
    _ws_before_colon,
)
from .schema import (
    _MISSING,
    _SORT,
    _bad_type,
    _dumps,
    _guard,
    _invalid,
    _json,
    _JSONDecodeError,
    _loads,
    _packb,
    _serialization,
    _Struct,
    _unpack,
)


def fast_paths(encoding: str) -> tuple[Any, Any, str]:
    """The core's C paths for ``encoding``, for ``AgentProtocolCore.set_fast_paths``: the
    RequestHeaders writer and the canonical-Allow recogniser (what the codec tries first)."""
    return _HEADERS_ENCODER, _RESPONSES, encoding


# --------------------------------------------------------------------------------------------
# The codecs


class Codec:
    """One payload encoding (``name`` is ``"json"`` or ``"msgpack"``); use the module instances."""

    name: str = ""
    binary: bool = False
    """True when bytes travel as raw ``bin`` (MessagePack), False when as base64 text (JSON)."""

    def encode_event(self, event: Event, correlation_id: str) -> bytes:
        """Proxy side: encode ``event`` with ``correlation_id`` injected at the top level."""
        raise NotImplementedError

    def decode_event(self, msg_type: int, payload: bytes) -> Event:
        """Agent side: decode an event frame's payload."""
        schema = _EVENT_SCHEMAS.get(msg_type)
        if schema is None:
            raise InvalidMessage(f"not an event message type: 0x{int(msg_type) & 0xFF:02x}")
        obj = self._load_event(payload)
        return _guard(lambda: self._finish_event(msg_type, schema, obj))  # type: ignore[no-any-return]

    def _load_event(self, payload: bytes) -> Any:
        raise NotImplementedError

    def _finish_event(self, msg_type: int, schema: _Struct, obj: Any) -> Event:
        if msg_type == MessageType.REQUEST_HEADERS and obj.__class__ is dict:
            fast = _request_headers_fast(obj)
            if fast is not None:
                return fast
        event: Event = schema.decode(obj, "$")
        return event

    def event_correlation_id(self, payload: bytes) -> str:
        """Best-effort correlation id of an event payload ("" if none); never raises."""
        try:
            obj = self._load_event(payload)
            cid = _MISSING
            if obj.__class__ is dict:
                cid = obj.get("correlation_id", _MISSING)
                if cid.__class__ is not str:
                    md = obj.get("metadata")
                    if md.__class__ is dict:
                        cid = md.get("correlation_id", _MISSING)
                    elif md.__class__ is list and md:
                        cid = md[0]
            elif obj.__class__ is list and obj:
                cid = obj[0]
            if isinstance(cid, (bytes, bytearray)):
                cid = bytes(cid).decode("utf-8")
            return str(cid) if isinstance(cid, str) else ""
        except Exception:
            return ""

    def encode_response(self, response: AgentResponse, correlation_id: str) -> bytes:
        """Agent side: encode ``response`` with ``audit.custom.correlation_id`` injected."""
        raise NotImplementedError

    def decode_response(self, payload: bytes) -> tuple[str, AgentResponse]:
        """Proxy side hot path: ``(correlation id from audit.custom, response)``."""
        raise NotImplementedError

    def encode_control(self, msg: ControlMessage) -> bytes:
        """Encode health, metrics, config update (request or response) or flow control."""
        try:
            obj = _control_obj(msg, self.binary)
            return self._dump_control(obj, isinstance(msg, HealthStatus))
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise _serialization(exc) from None

    def _dump_control(self, obj: dict[str, Any], sort: bool) -> bytes:
        raise NotImplementedError

    def _load(self, payload: bytes) -> Any:
        raise NotImplementedError

    def decode_control(self, msg_type: int, payload: bytes) -> ControlMessage:
        """Decode a 0x30-0x33 payload; lenient about int vs tagged health/flow forms.

        A 0x32 payload is a ConfigUpdateRequest (agent to proxy) or, in the other direction,
        a ConfigUpdateResponse; the shape tells them apart.
        """
        obj = self._load(payload)

        def run() -> ControlMessage:
            if msg_type == MessageType.HEALTH_STATUS:
                return _decode_health(obj)
            if msg_type == MessageType.FLOW_CONTROL:
                return _decode_flow(obj)
            if msg_type == MessageType.METRICS_REPORT:
                return _METRICS.decode(obj, "$")  # type: ignore[no-any-return]
            if msg_type == MessageType.CONFIG_UPDATE_REQUEST:
                if _is_config_update_response(obj):
                    return _CONFIG_UPDATE_RESPONSE.decode(obj, "$")  # type: ignore[no-any-return]
                return _CONFIG_UPDATE.decode(obj, "$")  # type: ignore[no-any-return]
            raise InvalidMessage(f"not a control message type: 0x{int(msg_type) & 0xFF:02x}")

        return _guard(run)  # type: ignore[no-any-return]

    def decode_config_update_response(self, payload: bytes) -> ConfigUpdateResponse:
        """Decode the proxy's answer to an agent's ConfigUpdateRequest (agent side)."""
        obj = self._load(payload)
        return _guard(lambda: _CONFIG_UPDATE_RESPONSE.decode(obj, "$"))  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<Codec {self.name}>"


class _JsonCodec(Codec):
    name = "json"

    def encode_event(self, event: Event, correlation_id: str) -> bytes:
        try:
            cls = event.__class__
            if cls is RequestHeadersEvent:
                # The proxy's hottest encode is written by the core, which checks every
                # field's type as it writes; anything it declines (a wrong type, unusual
                # values, unset slots) takes the validated generic path below.
                out = _headers_json(event, correlation_id)
                if out is not None:
                    return out
            elif cls is RequestBodyChunkEvent or cls is ResponseBodyChunkEvent:
                # Per-chunk hot path: the schema's encoder once the field types are checked.
                if _chunk_typed(event, correlation_id):
                    return _dumps(_EVENT_ENCODERS[cls](event, False, correlation_id), option=_SORT)
            validate_event(event, correlation_id)
            return _dumps(_event_obj(event, correlation_id, False), option=_SORT)
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def encode_event_binary_path(
        self, event: RequestBodyChunkEvent | ResponseBodyChunkEvent, correlation_id: str
    ) -> bytes:
        """Upstream's unused zero-copy body path (both counters, one of them null); for parity."""
        try:
            validate_event(event, correlation_id)
            d = _event_obj(event, correlation_id, False)
            d.setdefault("bytes_received", None)
            d.setdefault("bytes_sent", None)
            return _dumps(d, option=_SORT)
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def _load_event(self, payload: bytes) -> Any:
        return _json(payload)

    def event_correlation_id(self, payload: bytes) -> str:
        if payload.__class__ is bytes and payload.startswith(b'{"correlation_id":"'):
            end = payload.find(b'"', 19)
            if end > 0:
                raw = payload[19:end]
                if b"\\" not in raw:
                    try:
                        return raw.decode("utf-8")
                    except UnicodeDecodeError:
                        pass
        return super().event_correlation_id(payload)

    def _load(self, payload: bytes) -> Any:
        return _json(payload)

    def encode_response(self, response: AgentResponse, correlation_id: str) -> bytes:
        try:
            return _dumps(_response_obj(response, correlation_id))
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def decode_response(self, payload: bytes) -> tuple[str, AgentResponse]:
        # The canonical Allow reply: the id is taken out of the bytes, no parsing.
        fast = _json_allow_fast(payload)
        if fast is not None:
            return fast
        try:
            d = _loads(payload)
        except _JSONDecodeError as exc:
            raise InvalidMessage(str(exc)) from None
        except TypeError as exc:
            raise InvalidMessage(f"payload is not bytes: {exc}") from None
        if d.__class__ is not dict:
            _bad_type(d, "struct AgentResponse", "$")
        try:
            cid, resp, nk = _response_from_map(d)
        except AgentProtocolError:
            raise
        except Exception as exc:
            raise _invalid(exc) from None
        raw = payload if payload.__class__ is bytes else _as_bytes(payload)
        if nk != raw.count(b":") and (nk != raw.count(b'":') or _ws_before_colon(raw)):
            _check_response_duplicates(raw)
        return cid, resp

    def _dump_control(self, obj: dict[str, Any], sort: bool) -> bytes:
        return _dumps(obj, option=_SORT) if sort else _dumps(obj)


class _MsgpackCodec(Codec):
    name = "msgpack"
    binary = True

    def encode_event(self, event: Event, correlation_id: str) -> bytes:
        try:
            validate_event(event, correlation_id)
            return _packb(_event_obj(event, correlation_id, True), use_bin_type=True)  # type: ignore[no-any-return]
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def _load_event(self, payload: bytes) -> Any:
        return _unpack_events(payload)

    def _load(self, payload: bytes) -> Any:
        return _unpack(payload)

    def encode_response(self, response: AgentResponse, correlation_id: str) -> bytes:
        try:
            return _packb(_response_obj(response, correlation_id), use_bin_type=True)  # type: ignore[no-any-return]
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def decode_response(self, payload: bytes) -> tuple[str, AgentResponse]:
        fast = _msgpack_allow_fast(payload)
        if fast is not None:
            return fast
        obj = _unpack(payload)
        try:
            if obj.__class__ is dict:
                cid, resp, _ = _response_from_map(obj)
                return cid, resp
            if obj.__class__ is list:
                resp = _RESPONSE.decode(obj, "$")
                return _response_cid(resp.audit.custom), resp
        except AgentProtocolError:
            raise
        except Exception as exc:
            raise _invalid(exc) from None
        _bad_type(obj, "struct AgentResponse", "$")

    def _dump_control(self, obj: dict[str, Any], sort: bool) -> bytes:
        return _packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


JSON_CODEC: Final[Codec] = _JsonCodec()
MSGPACK_CODEC: Final[Codec] = _MsgpackCodec()
_CODECS: Final = {"json": JSON_CODEC, "msgpack": MSGPACK_CODEC}


def get_codec(name: str) -> Codec:
    """The codec for an encoding name (``"json"`` or ``"msgpack"``)."""
    key = getattr(name, "value", name)
    codec = _CODECS.get(key) if isinstance(key, str) else None
    if codec is None:
        raise InvalidMessage(f"unknown variant `{name}`, expected `json` or `msgpack`")
    return codec
