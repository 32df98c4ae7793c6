"""`python -m agentpool proxy` and the aiohttp middleware: real processes, real clients."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("aiohttp")

from http_apps import proxy_config  # noqa: E402
from http_procs import (  # noqa: E402
    aiohttp_server,
    env,
    free_port,
    proxy,
    script_agent,
    spawn,
    stop,
    wait_ready,
)


@pytest.fixture(scope="module", params=["proxy", "middleware"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp(request.param)
    sock = str(tmp / "script.sock")
    agent = script_agent(sock)
    procs = [agent]
    try:
        if request.param == "proxy":
            upstream, up_url = aiohttp_server("http_apps:aiohttp_upstream")
            procs.append(upstream)
            config = tmp / "proxy.json"
            config.write_text(json.dumps(proxy_config(f"unix:{sock}", up_url)))
            proc, url = proxy("--config", str(config))
        else:
            proc, url = aiohttp_server("http_apps:aiohttp_app", f"unix:{sock}")
        procs.append(proc)
        yield request.param, url
    finally:
        for p in reversed(procs):
            stop(p)


@pytest.fixture(scope="module")
def client(server: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[1], timeout=10.0) as c:
        yield c


def test_allow_block_redirect_challenge(client: httpx.Client) -> None:
    r = client.get("/hello?x=1")
    assert r.status_code == 200 and r.json()["path"] == "/hello"
    r = client.get("/block")
    assert (r.status_code, r.text, r.headers["x-blocked"]) == (403, "blocked by agent", "1")
    r = client.get("/redirect")
    assert (r.status_code, r.headers["location"]) == (302, "https://example.test/login")
    r = client.get("/challenge")
    assert (r.status_code, r.headers["www-authenticate"]) == (401, 'captcha realm="test"')


def test_header_edits_and_guard(client: httpx.Client, server: tuple[str, str]) -> None:
    r = client.get("/edit", headers={"x-remove-me": "1", "x-request-id": "edit-1"})
    assert r.status_code == 200
    headers = r.json()["headers"]
    assert headers["x-added"] == ["by-agent"]
    assert "x-remove-me" not in headers
    assert "x-forbidden-by-guard" not in headers  # HeaderGuard(deny=["x-forbidden-*"])
    assert "transfer-encoding" not in headers
    if server[0] == "middleware":
        assert headers["host"] == [r.request.headers["host"]]
    else:  # the proxy forwards to the upstream's host, never the agent's choice
        assert headers["host"] != ["evil.example"]
        assert headers["x-forwarded-host"] == [r.request.headers["host"]]
    assert headers["x-request-id-seen"] == ["edit-1"]
    assert r.headers["x-resp-added"] == "yes"


def test_request_body_streamed_and_mutated(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"one secret, "
        yield b"two secret"

    r = client.post("/body/x", content=chunks(), headers={"x-needs-more": "1"})
    assert r.status_code == 200
    assert r.json()["body"] == "one XXXXXX, two XXXXXX"
    r = client.post("/body/x", content=b"an attack here")
    assert (r.status_code, r.text) == (403, "attack in body")
    assert client.post("/bodybuf/x", content=b"buffered secret").json()["body"] == "buffered XXXXXX"
    assert client.post("/bodybuf/x", content=b"x" * 65).status_code == 413
    assert client.post("/limit/x", content=b"x" * 17).status_code == 413

    def big() -> Iterator[bytes]:
        yield b"x" * 10
        yield b"x" * 10

    assert client.post("/limit/x", content=big()).status_code == 413


def test_response_body(client: httpx.Client, server: tuple[str, str]) -> None:
    r = client.get("/respbuf")
    assert r.text == "hello UPSTREAM bye UPSTREAM"
    r = client.get("/resp")  # streamed by the upstream / the handler itself (StreamResponse)
    assert r.headers["x-resp-status-seen"] == "200"
    assert r.text == "hello UPSTREAM bye UPSTREAM"
    if server[0] == "proxy":
        r = client.get("/respblock")
        assert (r.status_code, r.text) == (451, "response blocked")
    else:  # a response the handler streams itself is cut off, never sent
        with pytest.raises(httpx.TransportError):
            client.get("/respblock")


def test_stalled_agent_policies(client: httpx.Client) -> None:
    assert client.get("/stall").status_code == 503
    assert client.get("/open/stall").status_code == 200
    r = client.get("/retry/stall")
    assert (r.status_code, r.headers["retry-after"]) == (503, "7")
    assert client.get("/skip/stall").status_code == 200


def test_request_complete_reaches_agent(client: httpx.Client) -> None:
    client.get("/hello", headers={"x-request-id": "complete-proxy"})
    deadline = time.monotonic() + 5
    seen: list[str] = []
    while time.monotonic() < deadline:
        seen = client.get("/__completes").json()
        if "complete-proxy:200" in seen:
            break
        time.sleep(0.05)
    assert "complete-proxy:200" in seen


def test_proxy_killed_agent_two_workers_graceful(tmp_path: pytest.TempPathFactory) -> None:
    sock = str(tmp_path / "k.sock")  # type: ignore[operator]
    agent = script_agent(sock)
    upstream, up_url = aiohttp_server("http_apps:aiohttp_upstream")
    config = tmp_path / "p.json"  # type: ignore[operator]
    config.write_text(json.dumps(proxy_config(f"unix:{sock}", up_url)))
    proc, url = proxy("--config", str(config), "--workers", "2")
    try:
        # two worker processes share the port: both get connections
        deadline = time.monotonic() + 10
        ready = 0
        while time.monotonic() < deadline and ready < 20:
            with httpx.Client(base_url=url, timeout=10) as c:
                if c.get("/hello").status_code == 200:
                    ready += 1
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = f.read().split()
        assert len(workers) == 2
        results: list[int] = []

        def slow() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                results.append(c.get("/open/x/slow").status_code)

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.4)
        agent.send_signal(signal.SIGKILL)
        agent.wait(5)
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/hello").status_code == 503
            assert c.get("/open/hello").status_code == 200
        assert stop(proc, signal.SIGTERM, timeout=15) == 0
        for t in threads:
            t.join(10)
        assert results == [200] * 4
    finally:
        stop(proc)
        stop(upstream)
        stop(agent)


def test_middleware_killed_agent_two_workers_graceful(tmp_path: pytest.TempPathFactory) -> None:
    """Two aiohttp worker processes with the middleware on one port (SO_REUSEPORT), the agent
    killed (fail closed / open / status), then SIGTERM to both with requests in flight: every
    one of them is answered before the workers exit."""
    sock = str(tmp_path / "m.sock")  # type: ignore[operator]
    agent = script_agent(sock)
    port = free_port()
    workers = [
        spawn([sys.executable, "http_aio_worker.py", str(port)], AP_TEST_AGENT=f"unix:{sock}")
        for _ in range(2)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        for w in workers:
            wait_ready(w, ("127.0.0.1", port))
        pids: set[int] = set()
        deadline = time.monotonic() + 10
        while len(pids) < 2 and time.monotonic() < deadline:
            with httpx.Client(base_url=url, timeout=10) as c:  # a new connection each time
                pids.add(c.get("/hello").json()["pid"])
        assert pids == {w.pid for w in workers}
        agent.send_signal(signal.SIGKILL)
        agent.wait(5)
        for _ in range(4):  # new connections: both workers see the agent gone
            with httpx.Client(base_url=url, timeout=10) as c:
                assert c.get("/hello").status_code == 503
                assert c.get("/open/hello").status_code == 200
                r = c.get("/retry/hello")
                assert (r.status_code, r.headers["retry-after"]) == (503, "7")
        results: list[int] = []
        connected = threading.Barrier(7)

        def slow() -> None:  # 3 s in the handler (fail open: the agent is gone)
            with httpx.Client(base_url=url, timeout=15) as c:
                c.get("/open/hello")  # the connection is accepted by a worker first
                connected.wait(10)
                results.append(c.get("/open/x/slow?s=3").status_code)

        threads = [threading.Thread(target=slow) for _ in range(6)]
        for t in threads:
            t.start()
        connected.wait(10)
        time.sleep(1.0)
        for w in workers:
            w.send_signal(signal.SIGTERM)
        assert [w.wait(15) for w in workers] == [0, 0]  # one SIGTERM each: graceful
        for t in threads:
            t.join(15)
        assert results == [200] * 6
    finally:
        for w in workers:
            stop(w)
        stop(agent)


def test_proxy_demo_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agentpool", "proxy", "--demo", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "curl -si http://127.0.0.1:" in text
    assert "/hello     -> 200 x-agentpool-checked: 1" in text
    assert "/admin     -> 403" in text
    assert "/old/page  -> 301 /new/page" in text
    assert "x-echo-x-team: blue" in text


def test_loadtest_command_builtin_loop() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentpool",
            "loadtest",
            "--tool",
            "builtin",
            "--duration",
            "0.3",
            "--repeat",
            "1",
            "--connections",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "load: builtin" in text
    assert "| ASGI, uvicorn + httptools |" in text
    assert "| agentpool proxy (aiohttp) |" in text
    assert "errors" not in text


def test_websocket_frames(server: tuple[str, str]) -> None:
    ws_client = pytest.importorskip("websockets.sync.client")
    url = server[1].replace("http://", "ws://")
    with ws_client.connect(url + "/ws", open_timeout=5) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "echo:hi"
        ws.send("drop-me")
        ws.send("say-hidden")
        assert ws.recv(timeout=5) == "visible"
        ws.send("close-me")
        with pytest.raises(Exception, match="4000"):
            ws.recv(timeout=5)
    with ws_client.connect(url + "/ws", open_timeout=5) as ws:  # fail closed: 1011
        ws.send("stall")
        with pytest.raises(Exception, match="1011"):
            ws.recv(timeout=5)
    with pytest.raises(Exception, match="403"):
        ws_client.connect(url + "/block", open_timeout=5)


def test_websocket_frames_both_ways_at_once(server: tuple[str, str]) -> None:
    """Frames of both directions in flight together are checked one at a time per agent
    (an agent handles one event per correlation id; a newer one would supersede it)."""
    ws_client = pytest.importorskip("websockets.sync.client")
    with ws_client.connect(server[1].replace("http://", "ws://") + "/ws", open_timeout=5) as ws:
        for _ in range(3):
            ws.send("say-hidden")  # the upstream answers with two frames...
            ws.send("slow-1")  # ...while this client frame waits 0.2 s for its verdict
            got = {ws.recv(timeout=5), ws.recv(timeout=5)}
            assert got == {"visible", "echo:slow-1"}
