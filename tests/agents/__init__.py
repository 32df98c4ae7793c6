"""Run real agent processes for tests.

``spawn_agent()`` starts ``python -m agentpool agent ...`` in a subprocess on a fresh short
Unix socket path (or a loopback TCP port), waits until it is listening (bounded), yields an
:class:`AgentProc` and always kills the process at the end. ``aspawn_agent()`` is the same as
an async context manager that does not block the event loop while the agent starts.

Examples (``agentpool.agent.examples``): ``waf``, ``echo``, ``bench``, ``control`` (behaviour
driven by ``x-test-*`` request headers, see ``agentpool/agent/examples.py``). Extra knobs are
passed through ``extra_args``, e.g. ``("--delay", "0.5")``.

The test agents live beside this module, in tests/agents/: ``faulty_agent.py`` (faults on
cue, the reliability tests), ``integrity_agent.py`` (raw agent that misbehaves on cue, the
verdict-integrity tests), ``grpc_agent.py``, ``obs_agent.py`` (metrics, config updates, flow
control on cue) and ``http_agent.py`` (the HTTP integration tests' scripted agent). Each runs as
its own process (``python tests/agents/X.py ...``).

Every test agent process is started, waited for and stopped by the functions here:
:func:`start_process`, :func:`wait_ready` / :func:`await_ready` (bounded: a ready line on
stdout, or a socket that accepts) and :func:`stop_process` (a signal, then SIGKILL, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, AnyStr, TypeVar

import agentpool

READY_PREFIX = "agentpool agent listening on "
_PKG_ROOT = str(Path(agentpool.__file__).resolve().parent.parent)
_AGENTS_DIR = str(Path(__file__).resolve().parent)
TESTS_DIR = str(Path(_AGENTS_DIR).parent)

__all__ = [
    "READY_PREFIX",
    "AgentProc",
    "FaultyAgentProc",
    "Ready",
    "StressAgentProc",
    "arunning",
    "aspawn_agent",
    "await_ready",
    "child_env",
    "running",
    "short_socket_dir",
    "spawn_agent",
    "start_process",
    "stop_process",
    "wait_ready",
]


class Ready:
    """What "ready" means for a process: a stdout ``line`` starting with this text, or a
    ``sock`` that accepts (a Unix socket path or a (host, port))."""

    def __init__(self, *, line: str | None = None, sock: str | tuple[str, int] | None = None):
        if (line is None) == (sock is None):
            raise ValueError("give exactly one of line= and sock=")
        self.line = line
        self.sock = sock

    def __repr__(self) -> str:
        return f"line {self.line!r}" if self.line is not None else f"socket {self.sock!r}"


def child_env(**extra: str) -> dict[str, str]:
    """This environment with agentpool's root and tests/ first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_PKG_ROOT, TESTS_DIR, env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def start_process(
    argv: Sequence[str],
    *,
    text: bool = False,
    stderr: int | IO[Any] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.Popen[AnyStr]:
    """Start ``argv`` in its own session, stdin closed, stdout piped (for its ready line)."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=text,
        env=child_env() if env is None else env,
        cwd=cwd,
        start_new_session=True,
    )


def _accepts(target: tuple[str, int] | str) -> bool:
    try:
        if isinstance(target, str):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.2)
                s.connect(target)
        else:
            socket.create_connection(target, timeout=0.2).close()
    except OSError:
        return False
    return True


def _exited(proc: subprocess.Popen[AnyStr], name: str) -> RuntimeError:
    proc.wait(timeout=5)
    out = ""
    if proc.stdout is not None and not proc.stdout.closed:
        with contextlib.suppress(Exception):
            data = proc.stdout.read()
            out = data.decode(errors="replace") if isinstance(data, bytes) else data
    detail = f": {out.strip()}" if out.strip() else ""
    return RuntimeError(f"{name} exited with {proc.returncode} before it was ready{detail}")


def _poll_ready(proc: subprocess.Popen[AnyStr], ready: Ready, name: str, wait: float) -> str | None:
    """One bounded look (at most ``wait`` s): the ready line (or "" for a socket) or None."""
    if ready.sock is not None:
        if proc.poll() is not None:
            raise _exited(proc, name)
        if _accepts(ready.sock):
            return ""
        time.sleep(wait)
        return None
    stdout: IO[AnyStr] | None = proc.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        if not sel.select(wait):
            if proc.poll() is not None:
                raise _exited(proc, name)
            return None
    raw = stdout.readline()
    if not raw:
        raise _exited(proc, name)
    line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    assert ready.line is not None
    return line.strip() if line.startswith(ready.line) else None


def wait_ready(
    proc: subprocess.Popen[AnyStr], ready: Ready, *, timeout: float = 10.0, name: str = "process"
) -> str:
    """Block until ``proc`` is ready (see :class:`Ready`), at most ``timeout`` s; its ready
    line ("" for a socket). On failure the process is stopped and the error raised."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{name} was not ready within {timeout:g} s ({ready!r})")
            line = _poll_ready(proc, ready, name, min(remaining, 0.05))
            if line is not None:
                return line
    except BaseException:
        stop_process(proc, signal.SIGKILL)
        raise


async def await_ready(
    proc: subprocess.Popen[AnyStr], ready: Ready, *, timeout: float = 10.0, name: str = "process"
) -> str:
    """:func:`wait_ready` without blocking the running event loop."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = _poll_ready(proc, ready, name, 0.0)
            if line is not None:
                return line
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{name} was not ready within {timeout:g} s ({ready!r})")
            await asyncio.sleep(0.01)
    except BaseException:
        stop_process(proc, signal.SIGKILL)
        raise


def stop_process(
    proc: subprocess.Popen[AnyStr], sig: int = signal.SIGTERM, timeout: float = 5.0
) -> int:
    """Send ``sig`` (if still running), wait ``timeout`` s, then SIGKILL and wait 5 s more;
    close its stdout. Idempotent; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
    return int(proc.returncode)


_A = TypeVar("_A", bound="AgentProc")


def short_socket_dir() -> str:
    """A fresh directory under /tmp whose paths stay well below the 108-byte UDS limit."""
    return tempfile.mkdtemp(prefix="ap-", dir="/tmp")


class AgentProc:
    """One agent subprocess: its endpoint, its process, and controls to kill/restart it."""

    ready = Ready(line=READY_PREFIX)

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

    def start(self) -> None:
        """Start the process (non-blocking); call :meth:`wait_ready` next."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("agent already running")
        self.proc = start_process(self.argv(), text=True)

    def _ready(self, line: str) -> None:
        if not line.startswith(READY_PREFIX):
            return  # a raw agent's plain "ready": its endpoint is its socket path
        self.endpoint = line[len(READY_PREFIX) :].strip()
        if self.tcp:
            self.port = int(self.endpoint.rsplit(":", 1)[1])

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the agent prints its ready line (bounded); kill it on failure."""
        assert self.proc is not None
        t = self.ready_timeout if timeout is None else timeout
        self._ready(wait_ready(self.proc, self.ready, timeout=t, name=f"agent {self.example!r}"))

    async def await_ready(self, timeout: float | None = None) -> None:
        """Like :meth:`wait_ready` without blocking the running event loop."""
        assert self.proc is not None
        t = self.ready_timeout if timeout is None else timeout
        name = f"agent {self.example!r}"
        self._ready(await await_ready(self.proc, self.ready, timeout=t, name=name))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (default SIGKILL) and reap it; idempotent."""
        if self.proc is not None:
            stop_process(self.proc, sig)

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
def running(agent: _A) -> Iterator[_A]:
    """Start ``agent``, wait until it is ready, yield it; always stopped and cleaned up."""
    try:
        agent.start()
        agent.wait_ready()
        yield agent
    finally:
        agent.cleanup()


@contextlib.asynccontextmanager
async def arunning(agent: _A) -> AsyncIterator[_A]:
    """Async twin of :func:`running` (waits for readiness without blocking the loop)."""
    try:
        agent.start()
        await agent.await_ready()
        yield agent
    finally:
        agent.cleanup()


def spawn_agent(
    example: str = "waf",
    *,
    encoding: str = "json",
    tcp: bool = False,
    protocol: str = "v2",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 10.0,
) -> contextlib.AbstractContextManager[AgentProc]:
    """Run an example agent in a subprocess for the duration of the block (always killed).

    ``encoding`` is what the agent supports: ``"json"`` (JSON only) or ``"msgpack"`` (both, so
    it picks msgpack when the proxy offers it). ``protocol="v1"`` runs a legacy v1 agent.
    """
    return running(
        AgentProc(
            example,
            encoding=encoding,
            tcp=tcp,
            protocol=protocol,
            extra_args=extra_args,
            ready_timeout=ready_timeout,
        )
    )


def aspawn_agent(
    example: str = "waf", **kw: Any
) -> contextlib.AbstractAsyncContextManager[AgentProc]:
    """Async twin of :func:`spawn_agent` (same options)."""
    return arunning(AgentProc(example, **kw))


class FaultyAgentProc(AgentProc):
    """``faulty_agent.py`` in a subprocess on a fresh short socket path.

    ``set_fault()`` rewrites the control file (atomically), so one process can switch faults
    between requests; ``frames()`` reads the ``--log`` lines.
    """

    ready = Ready(line="ready")

    def __init__(
        self,
        *,
        fault: str | None = None,
        handshake: str | None = None,
        agent_id: str = "faulty",
        ready_timeout: float = 10.0,
    ) -> None:
        super().__init__("faulty", ready_timeout=ready_timeout)
        self.dir = self._dir
        assert self.path is not None
        self.endpoint = self.path
        self.control = os.path.join(self.dir, "control.json")
        self.log = os.path.join(self.dir, "frames.log")
        self.fault = fault
        self.handshake = handshake
        self.agent_id = agent_id

    def argv(self) -> list[str]:
        assert self.path is not None
        argv = [sys.executable, os.path.join(_AGENTS_DIR, "faulty_agent.py"), "--socket", self.path]
        argv += ["--agent-id", self.agent_id, "--control", self.control, "--log", self.log]
        if self.fault:
            argv += ["--fault", self.fault]
        if self.handshake:
            argv += ["--handshake", self.handshake]
        return argv

    async def astart(self) -> FaultyAgentProc:
        self.start()
        await self.await_ready()
        return self

    def set_fault(self, default: str | None = None, handshake: str | None = None) -> None:
        tmp = self.control + ".tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps({"default": default, "handshake": handshake}).encode())
        os.replace(tmp, self.control)

    def clear_log(self) -> None:
        with open(self.log, "wb"):
            pass

    def frames(self) -> list[dict[str, Any]]:
        try:
            with open(self.log, "rb") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def accepting(self) -> bool:
        """Whether the socket takes a connection now (a crashed agent's socket refuses)."""
        assert self.path is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(self.path)
            except OSError:
                return False
        return True

    def wait_exit(self, timeout: float = 5.0) -> int:
        """Wait for a crash fault to finish the process off; its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout)


class StressAgentProc(AgentProc):
    """``integrity_agent.py`` as the stress agent process, on a fresh short socket path."""

    ready = Ready(line="ready")

    def __init__(self, late: float, seed: int = 1) -> None:
        super().__init__("stress")
        assert self.path is not None
        self.endpoint = self.path
        self.late = late
        self.seed = seed

    def argv(self) -> list[str]:
        assert self.path is not None
        script = os.path.join(_AGENTS_DIR, "integrity_agent.py")
        late, seed = str(self.late), str(self.seed)
        return [sys.executable, script, "--socket", self.path, "--late", late, "--seed", seed]

    def __enter__(self) -> StressAgentProc:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
        self.cleanup()
