"""Endpoint discovery: where an agent id's replicas are, kept up to date.

One small protocol, :class:`DiscoverySource`: an object whose :meth:`~DiscoverySource.
updates` is an async iterator yielding the agent's current endpoint list whenever it may
have changed. Three sources ship: :class:`StaticSource` (a fixed list), :class:`FileSource`
(a file polled for changes, one endpoint per line, no inotify dependency) and
:class:`DnsSource` (A/AAAA or SRV records via dnspython, re-resolved when their TTL runs
out). :class:`Discovery` runs a source and calls ``on_change(agent_id, endpoints)`` with
every list that differs from the previous one.

:func:`endpoints_updater` is the ``on_change`` that feeds a pool: the first list registers
the agent with all its endpoints, later ones go to ``pool.set_endpoints`` (new replicas
connect, removed ones drain, the others are kept). See docs/deployment.md.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import os
import ssl as _ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from .connection import parse_endpoint
from .errors import AgentProtocolError, ConnectionFailed

__all__ = [
    "Discovery",
    "DiscoverySource",
    "DnsSource",
    "FileSource",
    "OnChange",
    "StaticSource",
    "endpoints_updater",
    "single_endpoint_updater",
]

log = logging.getLogger("agentpool.discovery")

OnChange = Callable[[str, list[str]], Awaitable[None] | None]


@runtime_checkable
class DiscoverySource(Protocol):
    """Yields an agent's endpoint list now and whenever it may have changed.

    Lists may repeat (consumers drop unchanged ones). A source that cannot refresh keeps
    quiet (it logs) rather than yielding an empty list, so a resolver outage never drains
    every replica. When the iterator ends, the last list stays in force.
    """

    def updates(self) -> AsyncIterator[list[str]]: ...


def _checked(endpoints: Iterable[str], where: str) -> list[str]:
    """Valid endpoints in order, duplicates removed; invalid ones logged and skipped."""
    out: list[str] = []
    for ep in endpoints:
        ep = ep.strip()
        try:
            parse_endpoint(ep)
        except AgentProtocolError as exc:
            log.warning("%s: ignoring endpoint: %s", where, exc)
            continue
        if ep not in out:
            out.append(ep)
    return out


class StaticSource:
    """A fixed endpoint list (validated now: an invalid endpoint raises ConnectionFailed)."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        for ep in endpoints:
            parse_endpoint(ep)
        self.endpoints = list(dict.fromkeys(ep.strip() for ep in endpoints))

    async def updates(self) -> AsyncIterator[list[str]]:
        yield list(self.endpoints)


def parse_endpoint_file(text: str, where: str = "endpoints") -> list[str]:
    """One endpoint per line; blank lines and ``#`` comments ignored."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return _checked((line for line in lines if line), where)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class FileSource:
    """Endpoints listed in a file, re-read when its mtime, size or inode changes.

    Polled every ``interval`` seconds (no inotify). Write it atomically (write a temporary
    file, then rename). A missing or unreadable file keeps the last list.
    """

    def __init__(self, path: str | os.PathLike[str], *, interval: float = 1.0) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.path = os.fspath(path)
        self.interval = float(interval)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    async def updates(self) -> AsyncIterator[list[str]]:
        seen: tuple[int, int, int] | None = None
        warned = False
        while True:
            stamp = self._stamp()
            if stamp is None:
                if not warned:
                    log.warning("endpoint file %s is missing; keeping the last list", self.path)
                    warned = True
            elif stamp != seen:
                warned = False
                try:
                    text = await asyncio.to_thread(_read_text, self.path)
                except (OSError, UnicodeDecodeError) as exc:
                    log.warning("cannot read endpoint file %s: %s", self.path, exc)
                else:
                    seen = stamp
                    yield parse_endpoint_file(text, self.path)
            await asyncio.sleep(self.interval)


class DnsSource:
    """Endpoints from DNS, re-resolved when the answer's TTL expires (dnspython).

    ``record="A"``, ``"AAAA"`` or ``"A+AAAA"`` resolve ``name`` to addresses (sorted) and
    use ``port``; ``record="SRV"`` resolves ``name`` (e.g. ``_agent._tcp.waf.svc``) to targets
    and ports, ordered by priority then weight (both are only an order for now). SRV
    targets stay host names (so TLS checks them) unless ``resolve_targets`` resolves them
    to addresses through the same resolver. Endpoints are ``f"{scheme}://host:port"``.

    The TTL is clamped to ``[min_ttl, max_ttl]``. A failed lookup (timeout, SERVFAIL,
    NXDOMAIN, no records) keeps the last list and retries after ``retry_interval``.
    ``nameservers`` / ``port`` (``dns_port``) override the system resolver configuration.
    """

    def __init__(
        self,
        name: str,
        *,
        record: str = "A+AAAA",
        port: int | None = None,
        scheme: str = "tcp",
        nameservers: Sequence[str] | None = None,
        dns_port: int = 53,
        resolve_targets: bool = False,
        min_ttl: float = 1.0,
        max_ttl: float = 300.0,
        retry_interval: float = 5.0,
        lifetime: float = 5.0,
    ) -> None:
        record = record.upper()
        if record not in ("A", "AAAA", "A+AAAA", "SRV"):
            raise ValueError(f"unknown record type {record!r} (A, AAAA, A+AAAA or SRV)")
        if record != "SRV" and port is None:
            raise ValueError(f"{record} records need a port")
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"unknown scheme {scheme!r} (tcp or tls)")
        if not 0 < min_ttl <= max_ttl or not retry_interval > 0:
            raise ValueError("need 0 < min_ttl <= max_ttl and retry_interval > 0")
        try:
            import dns.asyncresolver
        except ImportError as exc:  # pragma: no cover - exercised without the extra
            raise ImportError("DnsSource needs dnspython: pip install 'agentpool[dns]'") from exc
        self.name = name
        self.record = record
        self.port = port
        self.scheme = scheme
        self.resolve_targets = resolve_targets
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.retry_interval = float(retry_interval)
        self.lifetime = float(lifetime)
        if nameservers is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        if nameservers is not None or dns_port != 53:
            self._resolver.port = dns_port
        self.lookups = 0

    async def _query(self, name: str, rdtype: str) -> tuple[list[Any], float]:
        """Records and TTL; NoAnswer gives ``([], max_ttl)``."""
        import dns.resolver

        self.lookups += 1
        try:
            answer = await self._resolver.resolve(name, rdtype, lifetime=self.lifetime)
        except dns.resolver.NoAnswer:
            return [], self.max_ttl
        if answer.rrset is None:  # pragma: no cover - resolve() raises NoAnswer instead
            return [], self.max_ttl
        return list(answer.rrset), float(answer.rrset.ttl)

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        kinds = ("A", "AAAA") if self.record == "A+AAAA" else (self.record,)
        if self.record == "SRV":
            kinds = ("A", "AAAA")
        out: list[str] = []
        ttl = self.max_ttl
        for kind in kinds:
            records, t = await self._query(name, kind)
            # answers come in any order; sorting keeps an unchanged set an unchanged list
            out += sorted((r.address for r in records), key=ipaddress.ip_address)
            if records:
                ttl = min(ttl, t)
        return out, ttl

    @staticmethod
    def _hostport(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def resolve(self) -> tuple[list[str], float]:
        """One lookup: ``(endpoints, seconds until the next one)``; raises on failure."""
        if self.record != "SRV":
            assert self.port is not None
            addrs, ttl = await self._addresses(self.name)
            hostports = [self._hostport(a, self.port) for a in addrs]
        else:
            records, ttl = await self._query(self.name, "SRV")
            records.sort(key=lambda r: (r.priority, -r.weight, str(r.target)))
            hostports = []
            for r in records:
                target = str(r.target).rstrip(".")
                if not target:
                    continue
                if self.resolve_targets:
                    addrs, t = await self._addresses(target)
                    ttl = min(ttl, t)
                    hostports += [self._hostport(a, r.port) for a in addrs]
                else:
                    hostports.append(self._hostport(target, r.port))
        if not hostports:
            raise ConnectionFailed(f"DNS {self.record} {self.name}: no records")
        endpoints = _checked((f"{self.scheme}://{hp}" for hp in hostports), self.name)
        return endpoints, min(max(ttl, self.min_ttl), self.max_ttl)

    async def updates(self) -> AsyncIterator[list[str]]:
        while True:
            try:
                endpoints, wait = await self.resolve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "DNS %s %s failed (keeping the last list): %s", self.record, self.name, exc
                )
                wait = self.retry_interval
            else:
                yield endpoints
            await asyncio.sleep(wait)


class Discovery:
    """Run a source for one agent id and call ``on_change(agent_id, endpoints)`` on changes.

    ``on_change`` may be sync or async; it runs for the first list and then only for lists
    that differ (as ordered lists) from the previous one, one call at a time. An exception
    from it is logged and the list is offered again on the source's next update.
    """

    def __init__(self, agent_id: str, source: DiscoverySource, on_change: OnChange) -> None:
        self.agent_id = agent_id
        self.source = source
        self.on_change = on_change
        self.endpoints: list[str] | None = None
        self.changes = 0
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Consume the source until it ends (or the task is cancelled)."""
        async for endpoints in self.source.updates():
            if endpoints == self.endpoints:
                continue
            try:
                result = self.on_change(self.agent_id, list(endpoints))
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("discovery %s: on_change failed", self.agent_id)
                continue
            self.endpoints = list(endpoints)
            self.changes += 1

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def stop(self) -> None:
        """Cancel the task and wait for it.

        The cancellation is repeated until the task has ended: on Python < 3.12
        ``asyncio.wait_for`` (inside DNS lookups) can swallow a cancellation that lands as
        the lookup completes, and the task would otherwise run on forever.
        """
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled():
            task.result()

    async def __aenter__(self) -> Discovery:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _PoolWithEndpoints(Protocol):
    def agent_ids(self) -> list[str]: ...

    async def add_agent(
        self,
        agent_id: str,
        endpoint: str | Sequence[str],
        *,
        protocol: str = ...,
        ssl: _ssl.SSLContext | None,
    ) -> None: ...

    async def set_endpoints(self, agent_id: str, endpoints: str | Sequence[str]) -> None: ...


def endpoints_updater(
    pool: _PoolWithEndpoints, *, ssl: _ssl.SSLContext | None = None, protocol: str = "v2"
) -> Callable[[str, list[str]], Awaitable[None]]:
    """An ``on_change`` feeding the pool's endpoint set for the agent id.

    The first list registers the agent (``add_agent(agent_id, endpoints, ssl=ssl,
    protocol=protocol)``) unless the pool already has it; every later list goes to
    ``set_endpoints``, which connects new replicas, drains removed ones and keeps the
    others untouched. An empty list keeps the current endpoints (a source that lost every
    record is more likely broken than right).
    """

    async def on_change(agent_id: str, endpoints: list[str]) -> None:
        if not endpoints:
            log.warning("discovery %s: empty endpoint list; keeping the current ones", agent_id)
            return
        if agent_id in pool.agent_ids():
            await pool.set_endpoints(agent_id, endpoints)
        else:
            await pool.add_agent(agent_id, endpoints, protocol=protocol, ssl=ssl)

    return on_change


single_endpoint_updater = endpoints_updater
"""The earlier name of :func:`endpoints_updater` (from when an agent had one endpoint)."""
