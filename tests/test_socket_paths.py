"""Unix socket paths: a live path is never taken over, a stale one is replaced, and a path is
removed on close only while it is still the file we bound. Real processes and sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from agents import _PKG_ROOT, aspawn_agent, short_socket_dir

from agentpool.agent import AgentServer
from agentpool.agent.examples import make_agent
from agentpool.connection import AgentConnection
from agentpool.errors import AddressInUse, ConnectionFailed
from agentpool.messages import RequestHeadersEvent, RequestMetadata
from agentpool.reverse import ReverseConnectionListener

T = 10.0


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = short_socket_dir()
    try:
        yield os.path.join(d, "a.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def admin_event(cid: str) -> RequestHeadersEvent:
    return RequestHeadersEvent(
        metadata=RequestMetadata(
            correlation_id=cid, request_id="r", client_ip="1.2.3.4", client_port=1
        ),
        method="GET",
        uri="/admin",
        headers={"host": ["h"]},
    )


async def blocked_by_waf(path: str) -> bool:
    """True if the WAF example agent answers on ``path`` (it blocks /admin with 403)."""
    conn = await asyncio.wait_for(AgentConnection.open(f"unix:{path}", agent_id="probe"), T)
    try:
        r = await asyncio.wait_for(conn.request(admin_event("probe"), "probe"), T)
        return not r.is_allow and r.decision.status == 403  # type: ignore[union-attr]
    finally:
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), T)


@contextlib.asynccontextmanager
async def in_process_waf(path: str) -> AsyncIterator[AgentServer]:
    server = AgentServer(make_agent("waf"), path=path)
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), T)


def exists(path: str) -> bool:
    return os.path.exists(path)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = _PKG_ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


async def test_a_second_server_on_a_live_path_is_refused_and_the_first_keeps_it() -> None:
    async with aspawn_agent("waf") as first:
        path = first.path
        assert path is not None
        inode = os.stat(path).st_ino
        server = AgentServer(make_agent("waf"), path=path)
        with pytest.raises(AddressInUse, match="another process is listening") as info:
            await server.start()
        assert isinstance(info.value, ConnectionFailed) and isinstance(info.value, OSError)
        assert info.value.errno == errno.EADDRINUSE and info.value.path == path
        with pytest.raises(AddressInUse, match="another process is listening"):
            await ReverseConnectionListener.bind_uds(path)
        await server.close()  # closing the refused server must not remove the path
        assert os.stat(path).st_ino == inode
        assert first.alive() and await blocked_by_waf(path)


async def test_a_second_agent_process_on_our_live_path_fails_and_we_keep_it(
    sock_path: str,
) -> None:
    async with in_process_waf(sock_path):
        argv = [sys.executable, "-m", "agentpool", "agent", "--example", "waf"]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--socket",
            sock_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode != 0
        assert b"listening on" not in out
        assert b"another process is listening" in err
        assert await blocked_by_waf(sock_path)
    assert not exists(sock_path)  # we bound it, so our close removed it


async def test_a_stale_socket_file_is_replaced(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file of a process that died without removing it
    async with in_process_waf(sock_path):
        assert await blocked_by_waf(sock_path)
    assert not exists(sock_path)
    # a killed agent process leaves exactly such a file behind
    async with aspawn_agent("waf") as proc_agent:
        path = proc_agent.path
        assert path is not None
        proc_agent.kill()
        assert exists(path)
        async with in_process_waf(path):
            assert await blocked_by_waf(path)


async def test_a_path_that_is_not_a_socket_is_refused(sock_path: str) -> None:
    write_text(sock_path, "precious")
    with pytest.raises(AddressInUse, match="exists and is not a socket"):
        await AgentServer(make_agent("waf"), path=sock_path).start()
    assert read_text(sock_path) == "precious"


TAKEOVER = """
import os, socket, sys
path = sys.argv[1]
os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
print("ready", flush=True)
conn, _ = s.accept()
conn.sendall(b"mine")
sys.stdin.read()
"""


async def test_a_path_taken_over_by_another_process_is_not_removed_on_close(
    sock_path: str,
) -> None:
    server = AgentServer(make_agent("waf"), path=sock_path)
    await server.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TAKEOVER,
        sock_path,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), T) == b"ready\n"
        await asyncio.wait_for(server.close(), T)
        assert exists(sock_path)  # not ours any more: left alone
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock_path), T)
        assert await asyncio.wait_for(reader.readexactly(4), T) == b"mine"
        writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_reverse_listener_close_keeps_a_taken_over_path(sock_path: str) -> None:
    listener = await ReverseConnectionListener.bind_uds(sock_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TAKEOVER,
        sock_path,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), T) == b"ready\n"
        listener.close()
        await listener.wait_closed()
        assert exists(sock_path)
        with pytest.raises(AddressInUse, match="another process is listening"):
            await AgentServer(make_agent("waf"), path=sock_path).start()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
