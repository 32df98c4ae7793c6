"""The schema engine of the codecs: scalar converters, error helpers and ``_Struct``.

Every message is declared once, as a ``_Struct``: its fields in declaration order (upstream's
struct order), each with a decode converter (``conv(value, path) -> value``, raising
InvalidMessage naming ``path``), a kind (required, defaulted, optional, skipped) and, where
the wire form is not the attribute as it stands, an ``_e(...)`` with the encode-side details
(a converter ``enc(value, binary)``, when the field is left out, the attribute name).
``_Struct.decode`` reads a map or a positional array; ``_Struct.encode`` writes the named
map in the same order, so decoder and encoder cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

import msgpack
import orjson

from ..errors import AgentProtocolError, InvalidMessage, Serialization

_loads = orjson.loads
_dumps = orjson.dumps
_SORT: Final = orjson.OPT_SORT_KEYS
_JSONDecodeError = orjson.JSONDecodeError
_b2a = binascii.b2a_base64

if sys.version_info >= (3, 11):

    def _b64decode(text: str) -> bytes:
        return binascii.a2b_base64(text, strict_mode=True)

else:  # pragma: no cover - Python 3.10

    def _b64decode(text: str) -> bytes:
        return base64.b64decode(text, validate=True)


_packb = msgpack.packb
_unpackb = msgpack.unpackb

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_I32_MIN: Final = -(2**31)
_I32_MAX: Final = 2**31 - 1

_MISSING: Any = object()


# --------------------------------------------------------------------------------------------
# Error helpers


def _describe(v: object) -> str:
    """Describe a decoded value the way serde's ``Unexpected`` does."""
    if v is None:
        return "null"
    if v.__class__ is bool:
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v!r}`"
    if isinstance(v, str):
        s = v if len(v) <= 40 else v[:40] + "..."
        return f"string {json.dumps(s)}"
    if isinstance(v, (bytes, bytearray)):
        return "byte array"
    if isinstance(v, (list, tuple)):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _bad_type(v: object, expected: str, path: str) -> NoReturn:
    raise InvalidMessage(
        f"invalid type: {_describe(v)}, expected {expected} at `{path}`", field=path
    )


def _missing(path: str) -> NoReturn:
    parent, _, name = path.rpartition(".")
    where = f" at `{parent}`" if parent else ""
    raise InvalidMessage(f"missing field `{name}`{where}", field=path)


def _serialization(exc: BaseException) -> Serialization:
    return Serialization(str(exc) or type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Scalar converters: ``conv(value, path) -> value``; raise InvalidMessage on a wrong type.

Conv = Callable[[Any, str], Any]


def _str(v: Any, path: str) -> str:
    if v.__class__ is str:
        return v  # type: ignore[no-any-return]
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            _bad_type(v, "a string", path)
    _bad_type(v, "a string", path)


def _opt(conv: Conv) -> Conv:
    def opt(v: Any, path: str) -> Any:
        return None if v is None else conv(v, path)

    opt.inner = conv  # type: ignore[attr-defined]
    return opt


def _uint(bits: int, name: str) -> Conv:
    hi = (1 << bits) - 1

    def conv(v: Any, path: str) -> int:
        if v.__class__ is int or (isinstance(v, int) and v.__class__ is not bool):
            if 0 <= v <= hi:
                return int(v)
            raise InvalidMessage(
                f"invalid value: integer `{v}`, expected {name} at `{path}`", field=path
            )
        _bad_type(v, name, path)

    return conv


_u16 = _uint(16, "u16")
_u32 = _uint(32, "u32")
_u64 = _uint(64, "u64")


def _i32(v: Any, path: str) -> int:
    if isinstance(v, int) and v.__class__ is not bool:
        if _I32_MIN <= v <= _I32_MAX:
            return int(v)
        raise InvalidMessage(f"invalid value: integer `{v}`, expected i32 at `{path}`", field=path)
    _bad_type(v, "i32", path)


def _bool(v: Any, path: str) -> bool:
    if v.__class__ is bool:
        return v  # type: ignore[no-any-return]
    _bad_type(v, "a boolean", path)


def _f64(v: Any, path: str) -> float:
    if v.__class__ is float:
        return v  # type: ignore[no-any-return]
    if isinstance(v, (int, float)) and v.__class__ is not bool:
        return float(v)
    _bad_type(v, "f64", path)


_F32 = struct.Struct("<f")


def f32_shortest(x: float) -> float:
    """Round ``x`` to f32 and return the shortest decimal that maps back to it (as Rust prints)."""
    if math.isnan(x) or math.isinf(x):
        return x
    try:
        packed = _F32.pack(x)
    except OverflowError:
        return math.copysign(math.inf, x)
    target = _F32.unpack(packed)[0]
    for digits in range(1, 10):
        cand = float(f"{target:.{digits}g}")
        try:
            if _F32.pack(cand) == packed:
                return cand
        except OverflowError:
            continue
    return float(target)


def _f32(v: Any, path: str) -> float:
    return f32_shortest(_f64(v, path))


def _any(v: Any, path: str) -> Any:
    return v


def _list(conv: Conv, what: str = "a sequence") -> Conv:
    def lst(v: Any, path: str) -> list[Any]:
        if v.__class__ is not list:
            if isinstance(v, (list, tuple)):
                v = list(v)
            else:
                _bad_type(v, what, path)
        if conv is _str:
            for x in v:
                if x.__class__ is not str:
                    return [_str(x, path) for x in v]
            return v  # type: ignore[no-any-return]
        return [conv(x, path) for x in v]

    return lst


def _map(conv: Conv) -> Conv:
    def mp(v: Any, path: str) -> dict[str, Any]:
        if v.__class__ is not dict:
            _bad_type(v, "a map", path)
        out: dict[str, Any] | None = None
        if conv is _str or conv is _any:
            for k, x in v.items():
                if k.__class__ is not str or (conv is _str and x.__class__ is not str):
                    out = {}
                    break
            if out is None:
                return v  # type: ignore[no-any-return]
        out = {}
        for k, x in v.items():
            out[_str(k, path)] = conv(x, f"{path}.{k}" if k.__class__ is str else path)
        return out

    return mp


_list_str = _list(_str)
_map_str = _map(_str)
_map_any = _map(_any)
_map_headers = _map(_list(_str))


def _data(v: Any, path: str) -> bytes:
    """Body data: raw ``bin`` (MessagePack) or base64 text; undecodable text falls back to UTF-8."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, str):
        try:
            return _b64decode(v)
        except (binascii.Error, ValueError):
            return v.encode("utf-8", "surrogatepass")
    _bad_type(v, "a string", path)


def _b64(data: bytes) -> str:
    return _b2a(data, newline=False).decode("ascii")


# --------------------------------------------------------------------------------------------
# Encode converters: ``enc(value, binary) -> wire value``


def _enc_int(v: Any, binary: bool) -> int:
    """Integers and int enums as plain integers."""
    return int(v)


def _enc_float(v: Any, binary: bool) -> float:
    return float(v)


def _enc_str(v: Any, binary: bool) -> str:
    """String enums (``Encoding``) and strings as plain strings."""
    return str(getattr(v, "value", v))


def _enc_data(v: Any, binary: bool) -> Any:
    """Body data: raw ``bin`` in MessagePack, base64 text in JSON."""
    return bytes(v) if binary else _b64(v)


def _enc_list(enc: Enc) -> Enc:
    def lst(v: Any, binary: bool) -> list[Any]:
        return [enc(x, binary) for x in v]

    return lst


def _enc_json_any(v: Any, binary: bool) -> Any:
    """Arbitrary JSON value as upstream writes a ``serde_json::Value``: object keys sorted."""
    return orjson.Fragment(_dumps(v, option=_SORT))


# --------------------------------------------------------------------------------------------
# Struct schemas (maps by name, sequences by position)

_REQ: Final = 0  # required
_DEF: Final = 1  # default when missing
_OPT: Final = 2  # Option: missing -> None
_SKP: Final = 3  # Option with skip_serializing_if: also omitted from positional arrays


# Encode side: when a field is left out of the map it writes.
_KEEP: Final = 0  # always written (None as null)
_NONE: Final = 1  # left out when None (serde's ``skip_serializing_if = "Option::is_none"``)
_EMPTY: Final = 2  # left out when empty, zero or None

Enc = Callable[[Any, bool], Any]
"""Encode converter: ``enc(value, binary) -> wire value``; ``binary`` is True for MessagePack."""


class _E:
    """The encode-side details of a field, when it needs any (last item of a field spec)."""

    __slots__ = ("attr", "enc", "omit")

    def __init__(self, enc: Enc | None, omit: int | None, attr: str | None) -> None:
        self.enc = enc
        self.omit = omit
        self.attr = attr


def _e(enc: Enc | None = None, *, omit: int | None = None, attr: str | None = None) -> _E:
    """Encode details: ``enc`` converts the attribute's value, ``omit`` overrides the kind's
    rule for leaving the field out (``_SKP`` fields are left out when None, others kept),
    ``attr`` names the attribute when it is not the key."""
    return _E(enc, omit, attr)


class _F:
    __slots__ = ("attr", "conv", "enc", "factory", "key", "kind", "omit", "path")

    def __init__(
        self,
        key: str,
        conv: Conv,
        kind: int,
        factory: Callable[[], Any] | None,
        path: str,
        extra: _E | None = None,
    ) -> None:
        self.key = key
        self.conv = conv
        self.kind = kind
        self.factory = factory
        self.path = path
        self.enc = extra.enc if extra is not None else None
        omit = extra.omit if extra is not None else None
        self.omit = omit if omit is not None else (_NONE if kind == _SKP else _KEEP)
        attr = extra.attr if extra is not None else None
        self.attr = attr if attr is not None else key

    def default(self) -> Any:
        return None if self.factory is None else self.factory()


class _Struct:
    """A serde-like struct schema: field specs in declaration order plus a builder.

    A field spec is ``(key, conv, kind[, default factory][, _e(...)])``.
    """

    __slots__ = ("_encoders", "build", "enc", "fields", "keys", "name", "path")

    def __init__(
        self,
        name: str,
        path: str,
        fields: Sequence[tuple[Any, ...]],
        build: Callable[..., Any],
    ) -> None:
        self.name = name
        self.path = path
        prefix = f"{path}." if path else ""
        specs = []
        for spec in fields:
            extra = spec[-1] if spec[-1].__class__ is _E else None
            if extra is not None:
                spec = spec[:-1]
            key, conv, kind = spec[0], spec[1], spec[2]
            factory = spec[3] if len(spec) > 3 else None
            specs.append(_F(key, conv, kind, factory, prefix + key, extra))
        self.fields: tuple[_F, ...] = tuple(specs)
        self.keys: tuple[str, ...] = tuple(f.key for f in specs)
        self.build = build
        self._encoders: dict[tuple[str, ...], Callable[..., Any]] = {}
        self.enc: Enc = self.encoder()
        """The encoder as a field's encode converter (a nested struct): ``enc(obj, binary)``."""

    def encoder(self, head: tuple[str, ...] = ()) -> Callable[..., Any]:
        """``encode(obj, binary, *head_values) -> dict``: the named map of ``obj`` in field
        order after the ``head`` keys (which replace fields of the same key).

        Generated once per head shape, the way ``dataclasses`` writes ``__init__``: a dict
        display plus one test per field that may be left out, as fast as writing it by hand.
        Raises what the attribute access or a converter raises.
        """
        fn = self._encoders.get(head)
        if fn is not None:
            return fn
        ns: dict[str, Any] = {}
        display = [f"{k!r}: h{i}" for i, k in enumerate(head)]
        steps: list[str] = []
        for i, f in enumerate(self.fields):
            if f.key in head:
                continue
            if not f.attr.isidentifier():  # pragma: no cover - declaration error
                raise ValueError(f"{self.name}.{f.key}: attribute {f.attr!r}")
            value = f"o.{f.attr}"
            if f.enc is not None:
                ns[f"e{i}"] = f.enc
            if f.omit == _KEEP and not steps:
                display.append(f"{f.key!r}: " + (f"e{i}({value}, binary)" if f.enc else value))
                continue
            steps.append(f"    v = {value}")
            indent = "    "
            if f.omit != _KEEP:
                steps.append("    if v is not None:" if f.omit == _NONE else "    if v:")
                indent = "        "
            steps.append(f"{indent}d[{f.key!r}] = " + (f"e{i}(v, binary)" if f.enc else "v"))
        params = "".join(f", h{i}" for i in range(len(head)))
        head_line = f"def encode(o, binary{params}):"
        src = "\n".join([head_line, f"    d = {{{', '.join(display)}}}", *steps, "    return d"])
        # Keys are repr()'d and attributes checked identifiers: nothing here comes off the wire.
        exec(compile(src, f"<encoder {self.name}>", "exec"), ns)
        fn = ns["encode"]
        self._encoders[head] = fn
        return fn  # type: ignore[no-any-return]

    def encode(self, obj: Any, binary: bool = False, head: dict[str, Any] | None = None) -> Any:
        """The named map of ``obj`` (after ``head``, whose keys replace fields of the same key);
        hot callers keep ``encoder(...)`` instead."""
        if head is None:
            return self.enc(obj, binary)
        return self.encoder(tuple(head))(obj, binary, *head.values())

    def values(self, obj: Any, path: str | None = None) -> list[Any]:
        cls = obj.__class__
        if cls is dict:
            out = []
            get = obj.get
            for f in self.fields:
                v = get(f.key, _MISSING)
                if v is _MISSING:
                    if f.kind == _REQ:
                        _missing(f.path)
                    out.append(f.default())
                else:
                    out.append(f.conv(v, f.path))
            return out
        if cls is list or cls is tuple:
            return self._positional(obj)
        _bad_type(obj, f"struct {self.name}", path if path is not None else self.path or "$")

    def _positional(self, arr: Sequence[Any]) -> list[Any]:
        """Decode a positional array (upstream's default MessagePack struct form).

        A short array means skipped fields were left out: skip fields are taken as omitted
        first (in declaration order), falling back to reading them when that does not decode;
        trailing non-required fields take their defaults.
        """
        n, m = len(self.fields), len(arr)
        if m > n:
            raise InvalidMessage(
                f"invalid length {m}, expected struct {self.name} with {n} elements",
                field=self.path or None,
            )
        out: list[Any] = []
        self._fill(arr, 0, 0, n - m, out)
        return out

    def _fill(self, arr: Sequence[Any], fi: int, ai: int, missing: int, out: list[Any]) -> None:
        fields = self.fields
        m = len(arr)
        for idx in range(fi, len(fields)):
            f = fields[idx]
            if ai >= m:
                if f.kind == _REQ:
                    raise InvalidMessage(
                        f"invalid length {m}, expected struct {self.name} with "
                        f"{len(fields)} elements",
                        field=f.path,
                    )
                out.append(f.default())
                continue
            if f.kind == _SKP and missing:
                mark = len(out)
                try:
                    out.append(None)
                    self._fill(arr, idx + 1, ai, missing - 1, out)
                    return
                except InvalidMessage:
                    del out[mark:]
            out.append(f.conv(arr[ai], f.path))
            ai += 1

    def decode(self, obj: Any, path: str | None = None) -> Any:
        return self.build(*self.values(obj, path))

    def conv(self, v: Any, path: str) -> Any:
        return self.decode(v, path)


def _variant(v: Any, path: str, names: str) -> tuple[str, Any]:
    """Split an externally tagged enum value into (tag, content); unit variants give None."""
    if isinstance(v, str):
        return v, _MISSING
    if isinstance(v, (bytes, bytearray)):
        return _str(v, path), _MISSING
    if v.__class__ is dict:
        if len(v) != 1:
            raise InvalidMessage(
                f"invalid type: map with {len(v)} entries, expected enum {names} at `{path}`",
                field=path,
            )
        ((tag, content),) = v.items()
        return _str(tag, path), content
    _bad_type(v, f"enum {names}", path)


def _unknown_variant(tag: str, expected: str, path: str) -> NoReturn:
    raise InvalidMessage(f"unknown variant `{tag}`, expected {expected} at `{path}`", field=path)


def _unpack(payload: bytes) -> Any:
    try:
        return _unpackb(payload, raw=False)
    except Exception as exc:
        raise InvalidMessage(f"invalid MessagePack payload: {exc}") from None


def _json(payload: bytes) -> Any:
    try:
        return _loads(payload)
    except _JSONDecodeError as exc:
        raise InvalidMessage(str(exc)) from None
    except TypeError as exc:
        raise InvalidMessage(f"payload is not bytes: {exc}") from None


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a decoder; anything that is not already a protocol error becomes InvalidMessage."""
    try:
        return fn()
    except AgentProtocolError:
        raise
    except Exception as exc:
        raise _invalid(exc) from None


def _invalid(exc: Exception) -> InvalidMessage:
    """A decoder's unexpected exception as the InvalidMessage callers see."""
    if isinstance(exc, RecursionError):
        return InvalidMessage("recursion limit exceeded")
    return InvalidMessage(f"{type(exc).__name__}: {exc}")
