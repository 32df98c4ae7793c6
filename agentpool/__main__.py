"""Command line: ``python -m agentpool {demo,agent,bench}``."""

from __future__ import annotations

import sys

USAGE = """\
usage: python -m agentpool <command> [options]

commands:
  demo    start two example agents, drive traffic through a pool, print the results
  agent   run an example agent (see: python -m agentpool agent --help)
  bench   round-trip benchmark: pool vs raw uvloop client vs grpcio
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's own ``main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "agent":
        from .server import main_agent as run
    elif command == "bench":
        from .bench import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
