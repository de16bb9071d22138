"""Regenerates the committed gRPC stubs from fleet.proto: python -m fleetserve.protocol.generate [OUT_DIR]."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path(__file__).with_name("fleet.proto")
SRC = PROTO.parents[2]  # .../src, so generated imports read "from fleetserve.protocol import fleet_pb2"


def generate(out_dir: Path) -> list[Path]:
    """Write fleet_pb2.py, fleet_pb2.pyi and fleet_pb2_grpc.py for fleet.proto under ``out_dir``."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = PROTO.relative_to(SRC)
    args = ["protoc", f"-I{SRC}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main([*args, str(rel)]) != 0:
        raise RuntimeError("protoc failed")
    base = out_dir / rel.parent
    return [base / "fleet_pb2.py", base / "fleet_pb2.pyi", base / "fleet_pb2_grpc.py"]


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
