"""The processes a benchmark starts, each waited for (bounded) until it is ready: its Unix
socket accepts, or it printed ``agentpool agent listening on <endpoint>``; all stopped at the
end (SIGTERM, then SIGKILL, bounded). Also used by the scripts in benchmarks/."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import tempfile
import time
from types import TracebackType

READY_PREFIX = "agentpool agent listening on "


class Processes:
    """The subprocesses this run started; all are stopped by ``stop_all`` (or on leaving a
    ``with`` block)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def _popen(self, argv: list[str], cwd: str, stdout: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            start_new_session=True,
            cwd=cwd,  # a source tree in the caller's directory would shadow the package
        )
        self.procs.append(proc)
        return proc

    def start(self, argv: list[str], path: str, name: str, timeout: float = 15.0) -> int:
        """Start ``argv`` and wait until it accepts on the Unix socket ``path``; its pid."""
        proc = self._popen(argv, os.path.dirname(path), subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before accepting")
            if os.path.exists(path):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(path)
                        return proc.pid
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not accept on {path} within {timeout:.0f} s")
            time.sleep(0.02)

    def start_listening(
        self, argv: list[str], name: str, count: int = 1, timeout: float = 15.0
    ) -> tuple[int, list[str]]:
        """Start an ``agentpool agent`` command line and wait until it printed ``count``
        ready lines; its pid and the endpoints they name, in order."""
        proc = self._popen(argv, tempfile.gettempdir(), subprocess.PIPE)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        endpoints: list[str] = []
        deadline = time.monotonic() + timeout
        while len(endpoints) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{name} was not listening within {timeout:.0f} s")
            if not select.select([fd], [], [], min(remaining, 0.1))[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"{name} exited with {proc.wait(5)} before listening")
            buf += chunk
            *lines, rest = buf.split(b"\n")
            buf = rest
            for raw in lines:
                line = raw.decode(errors="replace")
                if line.startswith(READY_PREFIX):
                    endpoints.append(line[len(READY_PREFIX) :].strip())
        return proc.pid, endpoints

    def stop_all(self) -> None:
        """SIGTERM to every process still running, then SIGKILL after 3 s; bounded."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()
