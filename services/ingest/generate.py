"""Regenerate the Python stubs of ``services/surge.proto`` (needs ``grpcio-tools``, a dev tool).

    python -m services.ingest.generate

The stubs are committed; ``tests/ingest/test_proto.py`` checks that they match the ``.proto``.
The proto is mapped to the virtual path ``services/ingest/surge.proto`` so that the generated
``surge_pb2_grpc.py`` imports ``services.ingest.surge_pb2`` (a package import, not a top-level one).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "services" / "surge.proto"
STUBS = ("surge_pb2.py", "surge_pb2_grpc.py", "surge_pb2.pyi")


def generate(out_root: Path, proto: Path = PROTO) -> list[Path]:
    """Write the stubs under ``out_root/services/ingest/``; returns their paths."""
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / "services" / "ingest").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-Iservices/ingest={proto.parent}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"services/ingest/{proto.name}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    return [out_root / "services" / "ingest" / name for name in STUBS]


def main() -> int:
    for p in generate(ROOT):
        print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
