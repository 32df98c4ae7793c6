"""What a subcommand's code raises to report a problem on the command line (agentpool.cli).

Its own module so that the subcommands (demo, proxy, loadtest...) need not import the CLI that
imports them.
"""

from __future__ import annotations

__all__ = ["CommandError"]


class CommandError(Exception):
    """A problem a subcommand reports as one line (exit status 1, or ``status``)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
