"""``python -m agentpool``: the same command line as the ``agentpool`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m agentpool"))
