"""Process helpers for the HTTP integration tests: agents, uvicorn, the proxy, bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import agents

import agentpool

TESTS = str(Path(__file__).resolve().parent)
ROOT = str(Path(agentpool.__file__).resolve().parent.parent)


def env(**extra: str) -> dict[str, str]:
    return agents.child_env(**extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    proc: subprocess.Popen[bytes], check: str | tuple[str, int], timeout: float = 20.0
) -> None:
    """Wait until a Unix socket path / a TCP port accepts, or fail with the output."""
    agents.wait_ready(proc, agents.Ready(sock=check), timeout=timeout)


def spawn(args: list[str], **extra: str) -> subprocess.Popen[bytes]:
    return agents.start_process(args, env=env(**extra), stderr=subprocess.STDOUT, cwd=TESTS)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    return agents.stop_process(proc, sig, timeout)


def script_agent(path: str) -> subprocess.Popen[bytes]:
    proc = spawn([sys.executable, os.path.join(TESTS, "agents", "http_agent.py"), path])
    wait_ready(proc, path)
    return proc


def example_agent(path: str, example: str = "waf") -> subprocess.Popen[bytes]:
    proc = spawn(
        [sys.executable, "-m", "agentpool", "agent", "--example", example, "--socket", path]
    )
    wait_ready(proc, path)
    return proc


def uvicorn(factory: str, agent: str, *, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "10",
    ]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = spawn(args, AP_TEST_AGENT=agent)
    wait_ready(proc, ("127.0.0.1", port))
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            stop(p)


def aiohttp_server(target: str, agent: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "aiohttp.web", "-H", "127.0.0.1", "-P", str(port), target],
        AP_TEST_AGENT=agent,
    )
    wait_ready(proc, ("127.0.0.1", port))
    return proc, f"http://127.0.0.1:{port}"


def proxy(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "agentpool", "proxy", "--listen", f"127.0.0.1:{port}", *args]
    )
    wait_ready(proc, ("127.0.0.1", port))
    return proc, f"http://127.0.0.1:{port}"
