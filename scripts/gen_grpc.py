"""Regenerate agentpool/grpc/agent_v2_pb2.py (+ .pyi) from agentpool/grpc/agent_v2.proto.

Run from the repository root with grpcio-tools installed (``pip install grpcio-tools``):
``python scripts/gen_grpc.py``. The committed modules were made with grpcio-tools 1.85.1
(its bundled protoc writes protobuf gencode 7.35.1), so they load with protobuf >= 7.35.1, < 8
(the ``grpc`` extra's pin); regenerate with an older grpcio-tools to support older protobuf
runtimes. Only message classes
are generated: the client and the servicer bind the service's method paths themselves, so
no ``*_pb2_grpc`` module (and no import of grpc from the stubs) is needed.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    rc = protoc.main(
        [
            "protoc",
            f"-I{root}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            str(root / "agentpool" / "grpc" / "agent_v2.proto"),
        ]
    )
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
