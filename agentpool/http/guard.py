"""The header guard and the replies: which header edits an agent may make, and what a verdict
sends back.

Held apart from the routes and the per-request exchange because every integration and the
exchange itself apply edits and build replies the same way, with no pool or route involved.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

import orjson

from ..errors import AgentProtocolError
from ..messages import (
    AgentResponse,
    Allow,
    Block,
    BodyMutation,
    Challenge,
    HeaderOp,
    Redirect,
)

__all__ = [
    "HOP_BY_HOP",
    "NEVER_MUTABLE",
    "HeaderGuard",
    "Headers",
    "Reply",
    "Stop",
    "apply_header_ops",
    "decision_reply",
]

log = logging.getLogger("agentpool.http")

Headers: TypeAlias = list[tuple[str, str]]
"""Header list with lower-case names, in order, repeated names kept."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
"""Hop-by-hop headers (RFC 9110 §7.6.1): a proxy never forwards them."""

NEVER_MUTABLE = HOP_BY_HOP | {"host", ":authority", "content-length"}
"""Headers no agent may change, whatever the guard allows."""

_BAD_VALUE = re.compile(r"[\r\n\0]")


@dataclass(slots=True)
class HeaderGuard:
    """Which header edits an agent may make.

    :data:`NEVER_MUTABLE` (Host, hop-by-hop headers, Content-Length, Transfer-Encoding) and
    headers named by the request's ``Connection`` header are always refused; ``deny`` adds
    names; a non-empty ``allow`` refuses everything it does not list. Names match
    case-insensitively; a trailing ``*`` matches a prefix (``x-agent-*``).
    """

    allow: Iterable[str] = ()
    deny: Iterable[str] = ()
    _allow: tuple[frozenset[str], tuple[str, ...]] = field(init=False, repr=False)
    _deny: tuple[frozenset[str], tuple[str, ...]] = field(init=False, repr=False)

    @staticmethod
    def _split(names: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
        names = [n.lower() for n in names]
        return (
            frozenset(n for n in names if not n.endswith("*")),
            tuple(n[:-1] for n in names if n.endswith("*")),
        )

    def __post_init__(self) -> None:
        self._allow = self._split(self.allow)
        self._deny = self._split(self.deny)

    def permits(self, name: str, connection_tokens: frozenset[str] = frozenset()) -> bool:
        """Whether an agent may change header ``name`` (lower-case)."""
        if name in NEVER_MUTABLE or name in connection_tokens:
            return False
        exact, prefixes = self._deny
        if name in exact or name.startswith(prefixes):
            return False
        exact, prefixes = self._allow
        if exact or prefixes:
            return name in exact or name.startswith(prefixes)
        return True


@dataclass(slots=True)
class Reply:
    """A response the integration sends instead of (or in place of) the application's."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""


class Stop(Exception):
    """Raised by an :class:`Exchange` when ``reply`` replaces the application's response."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def apply_header_ops(
    headers: Headers,
    ops: Iterable[HeaderOp],
    guard: HeaderGuard,
    where: str,
    connection_tokens: frozenset[str] = frozenset(),
) -> int:
    """Apply ``ops`` to ``headers`` in place through ``guard``; returns how many were refused."""
    refused = 0
    for op in ops:
        name = op.name.lower()
        if not guard.permits(name, connection_tokens):
            refused += 1
            log.warning("refused %s of header %r by an agent (%s)", op.op, name, where)
            continue
        if op.op == "remove":
            headers[:] = [h for h in headers if h[0] != name]
            continue
        value = op.value or ""
        if "\r" in value or "\n" in value or "\0" in value:
            refused += 1
            log.warning("refused header %r with a control character (%s)", name, where)
            continue
        if op.op == "set":
            headers[:] = [h for h in headers if h[0] != name]
        headers.append((name, value))
    return refused


def decision_reply(response: AgentResponse) -> Reply | None:
    """The reply a non-Allow decision stands for (None for Allow).

    A Block's own headers never include framing or hop-by-hop headers (:data:`NEVER_MUTABLE`)
    nor values with CR/LF/NUL; those are dropped. Challenge mapping:

    with a ``url`` param: 302 to it plus ``x-agentpool-challenge: <type>``; otherwise 401
    with ``WWW-Authenticate: <type> k="v", ...`` (params sorted); the body is JSON
    ``{"challenge_type": ..., "params": {...}}`` in both cases.
    """
    decision = response.decision
    if isinstance(decision, Allow):
        return None
    if isinstance(decision, Block):
        headers = [
            (k.lower(), v)
            for k, v in (decision.headers or {}).items()
            if k.lower() not in NEVER_MUTABLE and not _BAD_VALUE.search(k + v)
        ]
        body = (decision.body or "").encode()
        if body and not any(k == "content-type" for k, _ in headers):
            headers.append(("content-type", "text/plain; charset=utf-8"))
        return Reply(decision.status, headers, body)
    if isinstance(decision, Redirect):
        if _BAD_VALUE.search(decision.url) or not 300 <= decision.status <= 399:
            log.warning("agent sent an invalid redirect (%d %r)", decision.status, decision.url)
            return Reply(502, [("content-type", "text/plain; charset=utf-8")], b"Bad gateway")
        return Reply(decision.status, [("location", decision.url)])
    if isinstance(decision, Challenge):
        params = decision.params
        body = orjson.dumps({"challenge_type": decision.challenge_type, "params": params})
        headers = [("content-type", "application/json")]
        kind = decision.challenge_type
        url = params.get("url")
        if url:
            headers += [("location", url), ("x-agentpool-challenge", kind)]
            status = 302
        else:
            auth = ", ".join(f'{k}="{v}"' for k, v in sorted(params.items()) if '"' not in k + v)
            headers.append(("www-authenticate", f"{kind} {auth}".strip()))
            status = 401
        return Reply(status, [(k, v) for k, v in headers if not _BAD_VALUE.search(v)], body)
    raise AgentProtocolError(f"unknown decision {decision!r}")


def _mutated(data: bytes, mutation: BodyMutation | None) -> bytes | None:
    """The chunk after a body mutation (None: pass through); ``data`` is base64."""
    if mutation is None or mutation.data is None:
        return None
    if mutation.data == "":
        return b""
    try:
        return base64.b64decode(mutation.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentProtocolError(
            f"body mutation data for chunk {mutation.chunk_index} is not base64: {exc}"
        ) from None
