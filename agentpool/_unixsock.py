"""Listening on a Unix socket path without stealing it, and removing it only if still ours.

Used by :class:`~agentpool.agent.AgentServer` and
:meth:`~agentpool.reverse.ReverseConnectionListener.bind_uds` (docs/protocol.md,
"Socket paths"). Binding refuses a path where a process is listening (found by connecting to
it), replaces a stale socket file nobody listens on, and refuses a path that exists but is
not a socket. Closing unlinks the path only when it is still the file we bound (same device
and inode), so a process that took the path over meanwhile keeps it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from .errors import AddressInUse

__all__ = ["FileId", "bind_unix", "unlink_if_ours"]

FileId = tuple[int, int]

# A live listener accepts a Unix connect at once (or leaves it pending in its backlog); this
# bound only matters for a listener whose backlog is full.
_PROBE_TIMEOUT = 1.0


def _probe(path: str) -> bool:
    """True if a process accepts connections on ``path``; False if the socket is stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # listening, backlog full
    except OSError as exc:
        raise AddressInUse(path, f"cannot tell whether it is in use ({exc})") from exc
    finally:
        probe.close()
    return True


def bind_unix(
    path: str, *, backlog: int = 100, mode: int | None = None
) -> tuple[socket.socket, FileId]:
    """Bind and listen on ``path``; returns the non-blocking socket and the file's identity.

    Raises :class:`~agentpool.errors.AddressInUse` if a process listens there or the path is
    not a socket; other bind errors (missing directory, permissions) raise their ``OSError``.
    ``mode`` is applied before ``listen()``, so no one connects under a looser mode.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise AddressInUse(path, "the path exists and is not a socket")
        if _probe(path):
            raise AddressInUse(path, "another process is listening there")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # another process bound it since we looked
            raise AddressInUse(path, "another process bound it first") from exc
        raise
    file_id: FileId | None = None
    try:
        st = os.stat(path)
        file_id = (st.st_dev, st.st_ino)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        unlink_if_ours(path, file_id)
        raise
    return sock, file_id


def unlink_if_ours(path: str, file_id: FileId | None) -> bool:
    """Remove ``path`` if it is still the socket file identified by ``file_id``."""
    if file_id is None:
        return False
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != file_id:
            return False
        os.unlink(path)
    except OSError:
        return False
    return True
