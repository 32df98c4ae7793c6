"""Run real agent processes for tests.

``spawn_agent()`` starts ``python -m agentpool agent ...`` in a subprocess on a fresh short
Unix socket path (or a loopback TCP port), waits until it is listening (bounded), yields an
:class:`AgentProc` and always kills the process at the end. ``aspawn_agent()`` is the same as
an async context manager that does not block the event loop while the agent starts.

Examples (``agentpool.agent.examples``): ``waf``, ``echo``, ``bench``, ``control`` (behaviour
driven by ``x-test-*`` request headers, see ``agentpool/agent/examples.py``). Extra knobs are
passed through ``extra_args``, e.g. ``("--delay", "0.5")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import agentpool

READY_PREFIX = "agentpool agent listening on "
_PKG_ROOT = str(Path(agentpool.__file__).resolve().parent.parent)

__all__ = ["READY_PREFIX", "AgentProc", "aspawn_agent", "short_socket_dir", "spawn_agent"]


def short_socket_dir() -> str:
    """A fresh directory under /tmp whose paths stay well below the 108-byte UDS limit."""
    return tempfile.mkdtemp(prefix="ap-", dir="/tmp")


class AgentProc:
    """One agent subprocess: its endpoint, its process, and controls to kill/restart it."""

    def __init__(
        self,
        example: str,
        *,
        encoding: str = "json",
        tcp: bool = False,
        protocol: str = "v2",
        extra_args: Sequence[str] = (),
        ready_timeout: float = 10.0,
    ) -> None:
        self.example = example
        self.encoding = encoding
        self.tcp = tcp
        self.protocol = protocol
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self._dir = short_socket_dir()
        self.path: str | None = None if tcp else os.path.join(self._dir, "a.sock")
        self.host = "127.0.0.1"
        self.port = 0
        self.endpoint = ""
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "agentpool", "agent", "--example", self.example]
        argv += ["--encoding", self.encoding, "--protocol", self.protocol]
        if self.tcp:
            argv += ["--tcp", f"{self.host}:{self.port}"]
        else:
            assert self.path is not None
            argv += ["--socket", self.path]
        return argv + self.extra_args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> None:
        """Start the process (non-blocking); call :meth:`wait_ready` next."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("agent already running")
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=self._env(),
            start_new_session=True,
        )

    def _read_ready(self, deadline: float) -> bool:
        """Poll stdout for the ready line until ``deadline``; True once it arrived."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if not sel.select(min(remaining, 0.05)):
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"agent {self.example!r} exited with {proc.returncode} before listening"
                        )
                    continue
                line = proc.stdout.readline()
                if not line:
                    proc.wait(timeout=5)
                    raise RuntimeError(
                        f"agent {self.example!r} exited with {proc.returncode} before listening"
                    )
                if line.startswith(READY_PREFIX):
                    self.endpoint = line[len(READY_PREFIX) :].strip()
                    if self.tcp:
                        self.port = int(self.endpoint.rsplit(":", 1)[1])
                    return True

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the agent prints its ready line (bounded); kill it on failure."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        try:
            if not self._read_ready(deadline):
                raise TimeoutError(f"agent {self.example!r} did not start listening in time")
        except BaseException:
            self.kill()
            raise

    async def await_ready(self, timeout: float | None = None) -> None:
        """Like :meth:`wait_ready` without blocking the running event loop."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        try:
            while True:
                if self._read_ready(min(deadline, time.monotonic() + 0.005)):
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"agent {self.example!r} did not start listening in time")
                await asyncio.sleep(0.02)
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (default SIGKILL) and reap it; idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def terminate(self) -> None:
        """Graceful stop (SIGTERM), bounded."""
        self.kill(signal.SIGTERM)

    def restart(self) -> None:
        """Kill and start again on the same socket path / TCP port, waiting until ready."""
        self.kill()
        self.start()
        self.wait_ready()

    async def arestart(self) -> None:
        self.kill()
        self.start()
        await self.await_ready()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"AgentProc({self.example!r}, endpoint={self.endpoint!r}, alive={self.alive()})"


@contextlib.contextmanager
def spawn_agent(
    example: str = "waf",
    *,
    encoding: str = "json",
    tcp: bool = False,
    protocol: str = "v2",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 10.0,
) -> Iterator[AgentProc]:
    """Run an example agent in a subprocess for the duration of the block (always killed).

    ``encoding`` is what the agent supports: ``"json"`` (JSON only) or ``"msgpack"`` (both, so
    it picks msgpack when the proxy offers it). ``protocol="v1"`` runs a legacy v1 agent.
    """
    agent = AgentProc(
        example,
        encoding=encoding,
        tcp=tcp,
        protocol=protocol,
        extra_args=extra_args,
        ready_timeout=ready_timeout,
    )
    try:
        agent.start()
        agent.wait_ready()
        yield agent
    finally:
        agent.cleanup()


@contextlib.asynccontextmanager
async def aspawn_agent(
    example: str = "waf",
    *,
    encoding: str = "json",
    tcp: bool = False,
    protocol: str = "v2",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 10.0,
) -> AsyncIterator[AgentProc]:
    """Async twin of :func:`spawn_agent` (waits for readiness without blocking the loop)."""
    agent = AgentProc(
        example,
        encoding=encoding,
        tcp=tcp,
        protocol=protocol,
        extra_args=extra_args,
        ready_timeout=ready_timeout,
    )
    try:
        agent.start()
        await agent.await_ready()
        yield agent
    finally:
        agent.cleanup()
