"""AgentMiddleware under a real uvicorn process, against a real agent process, real clients."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")

import sys  # noqa: E402

from http_procs import (  # noqa: E402
    example_agent,
    free_port,
    script_agent,
    spawn,
    stop,
    uvicorn,
    wait_ready,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sock = str(tmp_path_factory.mktemp("asgi") / "script.sock")
    agent = script_agent(sock)
    proc, url = uvicorn("http_apps:asgi", f"unix:{sock}")
    try:
        yield url
    finally:
        stop(proc)
        stop(agent)


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10.0) as c:
        yield c


def test_allow_passes_request_with_metadata(client: httpx.Client) -> None:
    r = client.get("/hello?x=1", headers={"traceparent": "00-abc-def-01", "x-request-id": "rid-1"})
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == "/hello"
    assert body["agentpool"]["correlation_id"] not in ("", "rid-1")  # always generated
    meta = body["agentpool"]["routing_metadata"]
    assert meta == {"seen-path": "/hello", "traceparent": "00-abc-def-01"}


def test_block_redirect_challenge(client: httpx.Client) -> None:
    r = client.get("/block")
    assert (r.status_code, r.text, r.headers["x-blocked"]) == (403, "blocked by agent", "1")
    r = client.get("/redirect")
    assert (r.status_code, r.headers["location"]) == (302, "https://example.test/login")
    r = client.get("/challenge")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'captcha realm="test"'
    assert r.json() == {"challenge_type": "captcha", "params": {"realm": "test"}}


def test_header_edits_and_guard(client: httpx.Client) -> None:
    r = client.get("/edit", headers={"x-remove-me": "1", "x-request-id": "edit-1"})
    assert r.status_code == 200
    headers = r.json()["headers"]
    assert headers["x-added"] == ["by-agent"]
    assert "x-remove-me" not in headers
    assert "x-forbidden-by-guard" not in headers  # HeaderGuard(deny=["x-forbidden-*"])
    assert "transfer-encoding" not in headers
    assert headers["host"] == [r.request.headers["host"]]  # the guard refused the Host edit
    assert headers["x-client-ip"] == ["127.0.0.1"]
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
    r = client.post("/bodybuf/x", content=b"buffered secret")
    assert r.json()["body"] == "buffered XXXXXX"


def test_body_limits_413(client: httpx.Client) -> None:
    assert client.post("/bodybuf/x", content=b"x" * 65).status_code == 413
    assert client.post("/limit/x", content=b"x" * 17).status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b"x" * 10
        yield b"x" * 10

    assert client.post("/limit/x", content=chunks()).status_code == 413
    assert client.post("/limit/x", content=b"x" * 16).status_code == 200


def test_response_headers_and_body(client: httpx.Client) -> None:
    r = client.get("/resp")
    assert r.status_code == 200
    assert r.text == "hello UPSTREAM bye UPSTREAM"
    assert r.headers["x-resp-status-seen"] == "200"
    r = client.get("/respbuf")
    assert r.text == "hello UPSTREAM bye UPSTREAM"
    assert r.headers["content-length"] == str(len(r.content))
    r = client.get("/respblock")
    assert (r.status_code, r.text) == (451, "response blocked")


def test_stalled_agent_policies(client: httpx.Client) -> None:
    r = client.get("/stall")
    assert (r.status_code, r.text) == (503, "Service unavailable")
    r = client.get("/open/stall")
    assert r.status_code == 200
    r = client.get("/retry/stall")
    assert (r.status_code, r.headers["retry-after"]) == (503, "7")
    assert client.get("/skip/stall").status_code == 200  # route without agents


def test_request_complete_reaches_agent(client: httpx.Client) -> None:
    client.get("/hello", headers={"x-request-id": "complete-me"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = client.get("/__completes").json()
        if "complete-me:200" in seen:
            break
        time.sleep(0.05)
    assert "complete-me:200" in seen


def test_request_id_is_not_the_correlation_id(client: httpx.Client) -> None:
    r = client.get("/edit", headers={"x-request-id": "same"})
    assert r.json()["agentpool"]["correlation_id"] != "same"
    assert r.json()["headers"]["x-request-id-seen"] == ["same"]  # the agent got it


def test_websocket_frames(server: str) -> None:
    url = server.replace("http://", "ws://") + "/ws"
    with ws_client.connect(url, open_timeout=5) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "echo:hi"
        ws.send("drop-me")
        ws.send("say-hidden")
        assert ws.recv(timeout=5) == "visible"  # "drop-me" never reached the app
        ws.send("close-me")
        with pytest.raises(Exception) as info:
            ws.recv(timeout=5)
        assert "4000" in str(info.value)
    with ws_client.connect(url, open_timeout=5) as ws:  # fail closed: 1011
        ws.send("stall")
        with pytest.raises(Exception, match="1011"):
            ws.recv(timeout=5)


def test_websocket_blocked_handshake(server: str) -> None:
    url = server.replace("http://", "ws://") + "/block"
    with pytest.raises(Exception) as info:
        ws_client.connect(url, open_timeout=5)
    assert "403" in str(info.value)


def test_killed_agent_fail_closed_and_open(tmp_path: pytest.TempPathFactory) -> None:
    sock = str(tmp_path / "kill.sock")  # type: ignore[operator]
    agent = script_agent(sock)
    proc, url = uvicorn("http_apps:asgi", f"unix:{sock}")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/hello").status_code == 200
            agent.send_signal(signal.SIGKILL)
            agent.wait(5)
            assert c.get("/hello").status_code == 503
            assert c.get("/open/hello").status_code == 200
            r = c.get("/retry/hello")
            assert (r.status_code, r.headers["retry-after"]) == (503, "7")
    finally:
        stop(proc)
        stop(agent)


def test_graceful_shutdown_and_two_workers(tmp_path: pytest.TempPathFactory) -> None:
    sock = str(tmp_path / "w.sock")  # type: ignore[operator]
    agent = script_agent(sock)
    proc, url = uvicorn("http_apps:asgi", f"unix:{sock}", workers=2)
    results: list[int] = []
    try:
        pids: set[int] = set()
        for _ in range(40):
            with httpx.Client(base_url=url, timeout=10) as c:
                pids.add(c.get("/hello").json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2

        connected = threading.Barrier(5)

        def slow() -> None:
            with httpx.Client(base_url=url, timeout=15) as c:
                c.get("/hello")  # the connection is accepted by a worker first
                connected.wait(10)
                results.append(c.get("/x/slow?s=3").status_code)

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        connected.wait(10)
        time.sleep(1.0)  # the slow requests are in their handlers
        assert stop(proc, signal.SIGTERM, timeout=20) == 0
        for t in threads:
            t.join(15)
        assert results == [200] * 4
    finally:
        stop(proc)
        stop(agent)


def test_starlette_with_example_waf(tmp_path: pytest.TempPathFactory) -> None:
    sock = str(tmp_path / "waf.sock")  # type: ignore[operator]
    pytest.importorskip("starlette")
    agent = example_agent(sock)
    proc, url = uvicorn("http_apps:starlette", f"unix:{sock}")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/hello").json() == {"checked": "1"}
            assert c.get("/admin/x").status_code == 403
    finally:
        stop(proc)
        stop(agent)


def test_fastapi_with_script_agent(tmp_path: pytest.TempPathFactory) -> None:
    pytest.importorskip("fastapi")
    sock = str(tmp_path / "fa.sock")  # type: ignore[operator]
    agent = script_agent(sock)
    proc, url = uvicorn("http_fastapi_app:app", f"unix:{sock}")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            r = c.get("/edit")
            assert (r.status_code, r.json()["added"]) == (200, "by-agent")
            assert r.json()["agentpool"]["routing_metadata"]["seen-path"] == "/edit"
            r = c.get("/block")
            assert (r.status_code, r.text) == (403, "blocked by agent")
            assert c.post("/body/x", content=b"my secret").json()["body"] == "my XXXXXX"
            assert c.post("/body/x", content=b"attack").status_code == 403
            assert c.post("/limit/x", content=b"x" * 17).status_code == 413
        with ws_client.connect(url.replace("http://", "ws://") + "/ws", open_timeout=5) as ws:
            ws.send("drop-me")
            ws.send("hi")
            assert ws.recv(timeout=5) == "echo:hi"
    finally:
        stop(proc)
        stop(agent)


def test_concurrent_requests_with_one_request_id(server: str) -> None:
    cids: list[str] = []

    def call() -> None:
        with httpx.Client(base_url=server, timeout=10) as c:
            r = c.get("/x/slow", headers={"x-request-id": "dup"})
            cids.append(r.json()["agentpool"]["correlation_id"])

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(cids) == 3 and len(set(cids)) == 3 and "dup" not in cids


SERVERS = {
    "hypercorn": ["-m", "hypercorn", "--bind", "127.0.0.1:{port}", "http_hypercorn_app:app"],
    "granian": [
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        "1",
        "--log-level",
        "warning",
        "http_hypercorn_app:app",
    ],
}


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_other_asgi_servers(name: str, tmp_path: pytest.TempPathFactory) -> None:
    """The same middleware under hypercorn and granian (real server processes)."""
    pytest.importorskip(name)
    sock = str(tmp_path / "h.sock")  # type: ignore[operator]
    agent = script_agent(sock)
    port = free_port()
    args = [a.replace("{port}", str(port)) for a in SERVERS[name]]
    proc = spawn([sys.executable, *args], AP_TEST_AGENT=f"unix:{sock}")
    try:
        wait_ready(proc, ("127.0.0.1", port))
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as c:
            r = c.get("/edit", headers={"x-remove-me": "1"})
            assert r.json()["headers"]["x-added"] == ["by-agent"]
            assert "x-remove-me" not in r.json()["headers"]
            assert r.headers["x-resp-added"] == "yes"
            r = c.get("/block")
            assert (r.status_code, r.text) == (403, "blocked by agent")
            assert c.get("/redirect").headers["location"] == "https://example.test/login"
            assert c.post("/body/x", content=b"a secret").json()["body"] == "a XXXXXX"
            assert c.post("/limit/x", content=b"x" * 17).status_code == 413
            assert c.get("/resp").text == "hello UPSTREAM bye UPSTREAM"
            assert c.get("/stall").status_code == 503
            assert c.get("/open/stall").status_code == 200
        with ws_client.connect(url.replace("http://", "ws://") + "/ws", open_timeout=5) as ws:
            ws.send("drop-me")
            ws.send("hi")
            assert ws.recv(timeout=5) == "echo:hi"
            ws.send("close-me")
            with pytest.raises(Exception, match="4000"):
                ws.recv(timeout=5)
        with pytest.raises(Exception, match="403"):
            ws_client.connect(url.replace("http://", "ws://") + "/block", open_timeout=5)
    finally:
        stop(proc)
        stop(agent)


def test_request_id_of_an_abandoned_request_is_not_refused(client: httpx.Client) -> None:
    """The stalled request's id stays owed at its agent connection (the pool refuses it as a
    duplicate there); later requests with that request id are asked under a generated id."""
    assert client.get("/stall", headers={"x-request-id": "tomb"}).status_code == 503
    for _ in range(8):  # round robin reaches the connection holding the abandoned id
        r = client.get("/hello", headers={"x-request-id": "tomb"})
        assert r.status_code == 200
        assert r.json()["headers"]["x-request-id"] == ["tomb"]


def test_same_request_id_back_to_back(client: httpx.Client) -> None:
    for _ in range(30):  # RequestComplete of the previous one may still be in flight
        assert client.get("/hello", headers={"x-request-id": "seq"}).status_code == 200
