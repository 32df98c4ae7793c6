"""Agents in front of HTTP servers: routes, failure policy, header guard, per-request exchange.

This is the framework-neutral layer shared by :mod:`agentpool.asgi`, :mod:`agentpool.aiohttp`
and ``python -m agentpool proxy``: it turns a request into events, sends them to the agents a
route names (independent agents in one fan-out), and turns the replies into what the server
does next — a :class:`Reply` to send at once, header edits passed through the
:class:`HeaderGuard`, body chunks to forward (possibly mutated), or a WebSocket decision.
See docs/integrations.md for the behaviour in full.

The parts: :mod:`~agentpool.http.guard` (header guard, replies), :mod:`~agentpool.http.config`
(routes, rules, config mapping), :mod:`~agentpool.http.plan` (a route resolved against the
pool), :mod:`~agentpool.http.glue` (:class:`Glue`) and :mod:`~agentpool.http.exchange` (one
request); import the public names from ``agentpool.http`` itself.
"""

from .config import EVENT_NAMES, AgentRule, BodyMode, Failure, Route, load_config
from .exchange import Exchange
from .glue import Glue
from .guard import (
    HOP_BY_HOP,
    NEVER_MUTABLE,
    HeaderGuard,
    Headers,
    Reply,
    Stop,
    apply_header_ops,
    decision_reply,
)

__all__ = [
    "EVENT_NAMES",
    "HOP_BY_HOP",
    "NEVER_MUTABLE",
    "AgentRule",
    "BodyMode",
    "Exchange",
    "Failure",
    "Glue",
    "HeaderGuard",
    "Headers",
    "Reply",
    "Route",
    "Stop",
    "apply_header_ops",
    "decision_reply",
    "load_config",
]
