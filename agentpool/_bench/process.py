"""The processes a benchmark starts: each waited for until its Unix socket accepts (bounded),
all stopped at the end (SIGTERM, then SIGKILL, bounded)."""

from __future__ import annotations

import os
import socket
import subprocess
import time


class Processes:
    """The subprocesses this run started; all are stopped by ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], path: str, name: str, timeout: float = 15.0) -> int:
        """Start ``argv`` and wait until it accepts on the Unix socket ``path``; its pid."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            cwd=os.path.dirname(path),  # a source tree in the caller's directory would shadow
        )
        self.procs.append(proc)
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

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
        self.procs.clear()
