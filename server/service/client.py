"""``edgedistill jobs``: the command-line client of the job service (and :class:`ServiceClient` for scripts).

    edgedistill jobs submit --method dm --dataset mnist --ipc 10 --pipc 50 --option iterations=1000 --watch
    edgedistill jobs list | watch ID | cancel ID | fetch ID --out DIR

``--global-model DIR`` uploads a model directory first (chunked, with its sha256) and submits
with the id the server returns. Credentials: ``--ca-cert`` for TLS, ``--client-cert`` /
``--client-key`` for mutual TLS, ``--token-file`` for a bearer token (each also from the
environment: ``EDGEDISTILL_SERVER``, ``EDGEDISTILL_CA_CERT``, ``EDGEDISTILL_TOKEN_FILE``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from common.errors import ConfigError, EdgeDistillError

CHUNK_BYTES = 1 << 20
ENDED_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


class ServiceClient:
    """One channel to a job service; every call raises :class:`EdgeDistillError` with the server's message."""

    def __init__(
        self, address: str, ca_cert: str = "", client_cert: str = "", client_key: str = "", token_file: str = ""
    ) -> None:
        import grpc

        from server.service.v1 import distill_pb2_grpc

        if ca_cert or client_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_cert, "--ca-cert") if ca_cert else None,
                private_key=_read(client_key, "--client-key") if client_key else None,
                certificate_chain=_read(client_cert, "--client-cert") if client_cert else None,
            )
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
        token = _read(token_file, "--token-file").decode().strip() if token_file else ""
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = distill_pb2_grpc.DistillServiceStub(self.channel)
        self.address = address

    def call(self, name: str, request, timeout: float | None = 60.0):
        import grpc

        try:
            return getattr(self.stub, name)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc, self.address) from None

    def stream(self, name: str, request) -> Iterator:
        import grpc

        try:
            yield from getattr(self.stub, name)(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.address) from None

    # -------------------------------------------------------------------- the calls
    def upload_model(self, directory: str | Path):
        from server.service.models import chunk_messages, pack_model
        from server.service.v1 import distill_pb2 as pb

        return self.call("UploadModel", chunk_messages(pb.ModelChunk, pack_model(directory), CHUNK_BYTES), timeout=600)

    def submit(self, **fields):
        from server.service.v1 import distill_pb2 as pb

        return self.call("SubmitJob", pb.SubmitJobRequest(**fields))

    def get(self, job_id: str):
        from server.service.v1 import distill_pb2 as pb

        return self.call("GetJob", pb.GetJobRequest(id=job_id))

    def list(self, state: str = "", page_size: int = 50, page_token: str = ""):
        from server.service.v1 import distill_pb2 as pb

        kind = pb.JobState.Value(state) if state else 0
        return self.call("ListJobs", pb.ListJobsRequest(state=kind, page_size=page_size, page_token=page_token))

    def cancel(self, job_id: str):
        from server.service.v1 import distill_pb2 as pb

        return self.call("CancelJob", pb.CancelJobRequest(id=job_id))

    def watch(self, job_id: str) -> Iterator:
        from server.service.v1 import distill_pb2 as pb

        return self.stream("WatchJob", pb.WatchJobRequest(id=job_id))

    def download(self, job_id: str, out: str | Path, overwrite: bool = False) -> Path:
        """Stream a finished job's artifact, check its sha256, unpack it atomically into ``out``."""
        from common.artifacts import load_distilled_set
        from common.fileio import atomic_write_dir
        from server.service.v1 import distill_pb2 as pb

        buffer, total, expected = bytearray(), 0, ""
        for chunk in self.stream("DownloadArtifact", pb.DownloadArtifactRequest(id=job_id)):
            if not buffer and chunk.total_bytes:
                total, expected = chunk.total_bytes, chunk.sha256
            buffer += chunk.data
        if len(buffer) != total or hashlib.sha256(buffer).hexdigest() != expected:
            raise EdgeDistillError(f"the artifact of job {job_id} arrived incomplete or corrupt; fetch it again")
        path = atomic_write_dir(Path(out), lambda into: unpack_archive(bytes(buffer), into), overwrite=overwrite)
        load_distilled_set(path)  # refuses a corrupt artifact before anyone trains on it
        return path


def unpack_archive(data: bytes, into: Path) -> None:
    """Extract regular files only, each strictly inside ``into`` (no links, no absolute or ``..`` names)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or member.name.startswith("/") or ".." in parts or not parts:
                raise EdgeDistillError(f"the artifact archive holds {member.name!r}, which is not a plain file path")
            target = into.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None


def _error(exc, address: str) -> EdgeDistillError:
    import grpc

    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return EdgeDistillError(f"no job service at {address} ({exc.details()}); start one with edgedistill serve")
    return EdgeDistillError(f"{code.name}: {exc.details()}")


# ------------------------------------------------------------------------------ the CLI
def jobs_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--server", default=os.environ.get("EDGEDISTILL_SERVER", "127.0.0.1:50051"))
    parser.add_argument("--ca-cert", default=os.environ.get("EDGEDISTILL_CA_CERT", ""), help="TLS: the server's CA")
    parser.add_argument("--client-cert", default="", help="mutual TLS: this client's certificate")
    parser.add_argument("--client-key", default="", help="mutual TLS: its key")
    parser.add_argument("--token-file", default=os.environ.get("EDGEDISTILL_TOKEN_FILE", ""))
    actions = parser.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="queue a distillation job (uploads --global-model first)")
    submit.add_argument("--method", required=True)
    submit.add_argument("--dataset", required=True)
    submit.add_argument("--ipc", default="10", help="images per class, or ragged 'class:count,...'")
    submit.add_argument("--pipc", type=int, default=0, help="public images per class (0: all the server holds)")
    submit.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option")
    submit.add_argument("--global-model", default="", help="model directory to upload, or an uploaded model id")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--label", default="")
    submit.add_argument(
        "--eval-runs", type=int, default=0, help="then test this many fresh ConvNet-3 on it (quick protocol, <= 5)"
    )
    submit.add_argument("--watch", action="store_true", help="then watch it to the end")
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", default="", choices=["", *("QUEUED", "RUNNING"), *ENDED_STATES])
    listing.add_argument("--limit", type=int, default=20)
    for name, text in (("watch", "progress until the job ends"), ("cancel", "cancel a queued or running job")):
        actions.add_parser(name, help=text).add_argument("id")
    fetch = actions.add_parser("fetch", help="download a finished job's artifact")
    fetch.add_argument("id")
    fetch.add_argument("--out", required=True)
    fetch.add_argument("--overwrite", action="store_true")


def jobs_main(args: argparse.Namespace) -> int:
    client = ServiceClient(args.server, args.ca_cert, args.client_cert, args.client_key, args.token_file)
    if args.action == "submit":
        job = client.submit(**submit_fields(args, client))
        print(f"submitted {job.id} ({job.request.method} on {job.request.dataset}); state QUEUED", flush=True)
        return watch_job(client, job.id) if args.watch else 0
    if args.action == "list":
        from common.report import markdown_table

        page = client.list(args.state, page_size=max(1, min(args.limit, 500)))
        rows = [
            [
                j.id,
                _state(j.state),
                j.request.method,
                j.request.dataset,
                f"{j.iteration}/{j.iterations}",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(j.submitted_at)),
                j.request.label,
            ]
            for j in page.jobs
        ]
        print(markdown_table(["id", "state", "method", "dataset", "progress", "submitted", "label"], rows))
        return 0
    if args.action == "watch":
        return watch_job(client, args.id)
    if args.action == "cancel":
        print(f"{args.id}: {_state(client.cancel(args.id).state)}")
        return 0
    path = client.download(args.id, args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def submit_fields(args: argparse.Namespace, client: ServiceClient) -> dict:
    options = {}
    for item in args.option:
        if "=" not in item:
            raise ConfigError(f"--option {item!r}: use NAME=VALUE, e.g. iterations=1000")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = value.strip()
    fields = {
        "method": args.method,
        "dataset": args.dataset,
        "pipc": args.pipc,
        "options": options,
        "seed": args.seed,
        "priority": args.priority,
        "label": args.label,
        "eval_runs": args.eval_runs,
    }
    if args.ipc.strip().isdigit():
        fields["ipc"] = int(args.ipc)
    else:
        try:
            fields["class_counts"] = {int(c): int(n) for c, n in (p.split(":") for p in args.ipc.split(","))}
        except ValueError:
            raise ConfigError(f"--ipc {args.ipc!r}: use an integer or 'class:count,...' like 0:5,1:12") from None
    if args.global_model:
        if Path(args.global_model).is_dir():
            ref = client.upload_model(args.global_model)
            print(f"uploaded {args.global_model} as model {ref.id} ({ref.arch}, {ref.dataset})", flush=True)
            fields["global_model"] = ref.id
        else:
            fields["global_model"] = args.global_model
    return fields


def watch_job(client: ServiceClient, job_id: str) -> int:
    """A progress bar until the job ends; exit code 0 only if it SUCCEEDED."""
    from tqdm.auto import tqdm

    bar, event = None, None
    for event in client.watch(job_id):
        if event.iterations and bar is None:
            bar = tqdm(total=event.iterations, desc=job_id, dynamic_ncols=True, file=sys.stdout)
        if bar is not None:
            bar.n = event.iteration
            bar.set_postfix({"loss": f"{event.loss:.4g}", "eta": f"{event.eta_seconds:.0f}s"}, refresh=True)
    if bar is not None:
        bar.close()
    state = _state(event.state) if event is not None else "UNKNOWN"
    print(f"{job_id}: {state}{': ' + event.message if event is not None and event.message else ''}", flush=True)
    return 0 if state == "SUCCEEDED" else 1


def _state(value: int) -> str:
    from server.service.v1 import distill_pb2 as pb

    return pb.JobState.Name(value)
