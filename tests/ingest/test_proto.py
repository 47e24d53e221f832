"""The committed gRPC stubs are what `services/surge.proto` generates (`python -m services.ingest.generate`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ingest import generate

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev tool) regenerates the stubs")

ROOT = Path(generate.__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    for path in fresh:
        committed = ROOT / "services" / "ingest" / path.name
        assert committed.exists(), f"{committed.name} is missing: run python -m services.ingest.generate"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} does not match services/surge.proto: run python -m services.ingest.generate"
        )


def test_stubs_describe_the_three_services() -> None:
    from services.ingest import surge_pb2 as pb

    services = {s.full_name: [m.name for m in s.methods] for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "surge.v1.Ingest": ["Stream"],
        "surge.v1.Study": ["NextSimulation", "ReportFailure"],
        "surge.v1.Predict": ["Predict"],
    }
    stream = pb.DESCRIPTOR.services_by_name["Ingest"].methods_by_name["Stream"]
    assert stream.client_streaming and stream.server_streaming
