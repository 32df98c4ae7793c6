"""The ``agentpool`` command line, run as a real process (console script and ``-m``).

Usage errors are one line on stderr with exit status 2; errors while running are one line
with status 1; Ctrl-C exits 130; no traceback anywhere.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from agents import aspawn_agent, short_socket_dir

import agentpool
from agentpool import _impl

SCRIPT = Path(sys.executable).with_name("agentpool")
T = 60.0


def _argv(*args: str) -> list[str]:
    assert SCRIPT.exists(), f"console script missing next to {sys.executable}"
    return [str(SCRIPT), *args]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(*args),
        capture_output=True,
        text=True,
        timeout=T,
        stdin=subprocess.DEVNULL,
        cwd=tempfile.gettempdir(),
        env=env,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_version_and_python_m() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"agentpool {agentpool.__version__} (core: ")
    same = subprocess.run(
        [sys.executable, "-m", "agentpool", "--version"],
        capture_output=True,
        text=True,
        timeout=T,
        cwd=tempfile.gettempdir(),
    )
    assert same.returncode == 0 and same.stdout == result.stdout


def test_help_shows_defaults() -> None:
    top = _run("--help")
    assert top.returncode == 0
    for name in ("demo", "agent", "bench"):
        assert name in top.stdout
    agent = _run("agent", "--help").stdout
    assert "(default: waf)" in agent and "(default: WARNING)" in agent
    assert "(default: 3000)" in _run("demo", "--help").stdout
    assert "(default: 64)" in _run("bench", "--help").stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "required: <command>"),
        (("nonsense",), "invalid choice: 'nonsense'"),
        (("agent", "--tcp", "localhost"), "--tcp: expected HOST:PORT"),
        (("agent", "--socket", "/tmp/x.sock", "--log-level", "verbose"), "--log-level"),
        (("agent",), "exactly one of --socket, --tcp or --reverse"),
        (("agent", "--reverse", "tpc://127.0.0.1:1"), "unknown scheme 'tpc'"),
        (("agent", "--socket", "/tmp/x.sock", "--example", "nope"), "invalid choice: 'nope'"),
        (("demo", "--requests", "0"), "--requests: must be at least 1"),
        (("bench", "--only", "nonsense"), "--only: unknown scenario 'nonsense'"),
        (("bench", "--only", "pool,nonsense"), "'nonsense'"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], needle: str) -> None:
    line = _one_line_error(_run(*args), 2, needle)
    assert line.startswith("agentpool")


def test_uvloop_missing_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "uvloop.py").write_text("raise ImportError('uvloop is not here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    _one_line_error(_run("demo", "--loop", "uvloop", env=env), 2, "uvloop is not installed")
    _one_line_error(
        _run("agent", "--socket", "/tmp/x.sock", "--loop", "uvloop", env=env),
        2,
        "uvloop is not installed",
    )


def test_runtime_errors_are_one_line() -> None:
    _one_line_error(
        _run("agent", "--socket", "/nonexistent-dir/waf.sock"),
        1,
        "/nonexistent-dir/waf.sock",
        "no directory /nonexistent-dir",
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line_error(_run("agent", "--tcp", f"127.0.0.1:{port}"), 1, "address already in use")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = closed.getsockname()[1]
        _one_line_error(_run("agent", "--reverse", f"127.0.0.1:{port}"), 1, f"127.0.0.1:{port}")


def _wait_for(proc: subprocess.Popen[str], needle: str, timeout: float = 30.0) -> str:
    """Read ``proc``'s stderr until a line contains ``needle``; what was read."""
    assert proc.stderr is not None
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"no {needle!r} in {seen!r}"
        if sel.select(0.2):
            line = proc.stderr.readline()
            assert line, f"process ended before {needle!r}: {seen!r}"
            seen += line
    sel.close()
    return seen


@pytest.mark.parametrize(
    ("args", "ready"),
    [
        (("agent", "--socket", "{dir}/a.sock"), None),
        (("demo", "--requests", "10000000", "--quiet"), "pool ready"),
        (("bench", "--quick", "--no-grpc", "--only", "raw", "--duration", "30"), "scenarios x"),
    ],
    ids=["agent", "demo", "bench"],
)
def test_ctrl_c_exits_130_without_traceback(args: tuple[str, ...], ready: str | None) -> None:
    tmp = short_socket_dir()
    argv = _argv(*(a.replace("{dir}", tmp) for a in args))
    # a terminal's Ctrl-C signals the whole foreground process group
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if ready is None else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=tempfile.gettempdir(),
    )
    try:
        if ready is None:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("agentpool agent listening on")
        else:
            _wait_for(proc, ready)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=T)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_agent_command_on_ipv6_loopback() -> None:
    """``--tcp [::1]:0`` listens on ::1 and prints an endpoint a pool can use as given."""
    from _helpers import hdrs

    from agentpool import AgentPool, AgentPoolConfig, Allow, Block

    proc = await asyncio.create_subprocess_exec(
        *_argv("agent", "--tcp", "[::1]:0", "--example", "waf"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tempfile.gettempdir(),
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), T)).decode()
        assert line.startswith("agentpool agent listening on tcp://[::1]:"), line
        endpoint = line.split()[-1]
        async with AgentPool(AgentPoolConfig()) as pool:
            await pool.add_agent("waf", endpoint)
            blocked = await pool.send_request_headers("waf", "c1", hdrs("c1", "/admin"))
            allowed = await pool.send_request_headers("waf", "c2", hdrs("c2", "/index.html"))
        assert blocked.decision == Block(status=403, body="Forbidden"), blocked
        assert isinstance(allowed.decision, Allow), allowed
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), T)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def test_agent_command_serves_a_pool() -> None:
    """``agentpool agent`` (what the README's Quick look points at) answers a pool."""
    from agentpool import AgentPool, AgentPoolConfig

    async with aspawn_agent("waf") as agent, AgentPool(AgentPoolConfig()) as pool:
        await pool.add_agent("waf", agent.endpoint)
        assert pool.is_agent_healthy("waf")


ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_from_the_source_tree() -> None:
    """The README's first command runs ``agentpool demo`` from the checkout itself."""
    proc = subprocess.run(
        _argv("demo", "--requests", "200", "--quiet"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    core = "compiled" if _impl.HAS_EXTENSIONS else "pure Python"
    assert f"core: {core}" in proc.stderr
    assert "== 200 requests" in proc.stdout


def test_source_tree_without_core_says_so(tmp_path: Path) -> None:
    package = Path(agentpool.__file__).parent
    copy = tmp_path / "agentpool"
    copy.mkdir()
    for path in package.iterdir():
        if path.suffix in (".py", ".pyx", ".pxd", ".pxi", ".pyi"):
            (copy / path.name).write_bytes(path.read_bytes())
    (copy / "_core.pyx").touch()  # a source checkout: Cython sources, no built extension
    env = {k: v for k, v in os.environ.items() if k != "AGENTPOOL_NO_EXTENSIONS"}
    # -S: site-packages only as plain path entries, so an editable install's import hook
    # cannot supply the missing extension from the checkout it points at
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys((paths["purelib"], paths["platlib"])))
    proc = subprocess.run(
        [sys.executable, "-S", "-c", "import agentpool"],
        capture_output=True,
        text=True,
        timeout=T,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"imported from its source tree ({copy})" in last
    assert "compiled core has not been built" in last and "AGENTPOOL_NO_EXTENSIONS=1" in last
