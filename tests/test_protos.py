"""protos/ and the generated modules next to where they are imported (server/service/v1)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "protos"))
    return generate


def test_committed_generated_modules_match_the_protos():
    pytest.importorskip("grpc_tools", reason='protos/generate.py needs grpcio-tools (pip install -e ".[dev]")')
    check = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_check_notices_a_stale_module(tmp_path, monkeypatch, capsys):
    pytest.importorskip("grpc_tools")
    generate = _generator()
    for path in generate.generate(tmp_path):
        if path.name == "distill_pb2.py":
            path.write_text(path.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(generate, "TARGET", tmp_path)
    assert generate.main(["--check"]) == 1
    assert "distill_pb2.py" in capsys.readouterr().out


def test_the_service_and_its_documented_calls_are_importable():
    from server.service.v1 import distill_pb2, distill_pb2_grpc

    service = distill_pb2.DESCRIPTOR.services_by_name["DistillService"]
    calls = ["SubmitJob", "GetJob", "ListJobs", "WatchJob", "CancelJob", "UploadModel", "DownloadArtifact"]
    assert [m.name for m in service.methods] == calls
    assert hasattr(distill_pb2_grpc, "DistillServiceServicer") and hasattr(distill_pb2_grpc, "DistillServiceStub")
    request = distill_pb2.SubmitJobRequest(method="dm", dataset="digits", ipc=10, options={"iterations": "5"})
    assert distill_pb2.SubmitJobRequest.FromString(request.SerializeToString()) == request
