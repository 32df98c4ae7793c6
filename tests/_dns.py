"""A stub DNS server for the discovery tests: a UDP responder on loopback (dnspython builds
the replies) whose records and TTLs a test changes while a DnsSource watches them.

Needs dnspython: import it after ``pytest.importorskip("dns.message")``; the ``stub_dns``
fixture (tests/conftest.py) serves one per test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class StubDns(asyncio.DatagramProtocol):
    """Answers from ``records[(name, type)] = (ttl, [rdata text, ...])``; counts queries."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.queries: dict[tuple[str, str], int] = {}
        self.servfail = False
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text().rstrip(".")
        rdtype = dns.rdatatype.to_text(q.rdtype)
        key = (name, rdtype)
        self.queries[key] = self.queries.get(key, 0) + 1
        if self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif key in self.records:
            ttl, rdatas = self.records[key]
            if rdatas:
                response.answer.append(dns.rrset.from_text_list(q.name, ttl, "IN", rdtype, rdatas))
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)
