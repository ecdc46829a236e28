"""Regenerate the Python modules of ``protos/`` where they are imported: ``server/service/v1/``.

    python protos/generate.py            # write them
    python protos/generate.py --check    # exit 1 if the committed ones differ (tests run this)

Needs ``grpcio-tools`` below 1.82 (the dev extra pins it: newer ones need protobuf 7, which
flwr 1.41 refuses). protoc names the gRPC module's import after the proto's package path
(``from edgedistill.v1 import distill_pb2``); it is rewritten to the package it lives in.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
SOURCES = ["edgedistill/v1/distill.proto"]
TARGET = ROOT / "server" / "service" / "v1"
PACKAGE = "server.service.v1"


def generate(into: Path) -> list[Path]:
    """Compile every proto into ``into``; returns the written modules."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            ["protoc", f"-I{PROTOS}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
            + [str(PROTOS / s) for s in SOURCES]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        written = []
        into.mkdir(parents=True, exist_ok=True)
        for source in SOURCES:
            stem = Path(source).with_suffix("")
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                made = Path(tmp) / f"{stem}{suffix}"
                proto_package = stem.parent.as_posix().replace("/", ".")
                text = made.read_text().replace(f"from {proto_package} import", f"from {PACKAGE} import")
                out = into / made.name
                out.write_text(text)
                written.append(out)
        return written


def _same(committed: Path, fresh: Path) -> bool:
    return committed.exists() and committed.read_bytes() == fresh.read_bytes()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed modules instead of writing")
    args = p.parse_args(argv)
    if not args.check:
        for path in generate(TARGET):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh if not _same(TARGET / p.name, p)]
    if stale:
        names = ", ".join(stale)
        print(f"stale generated modules in {TARGET}: {names}; run python protos/generate.py")
        return 1
    print("generated modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
