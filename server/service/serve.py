"""``edgedistill serve``: the distillation job service (gRPC) over a durable state directory.

It binds loopback freely; any other address needs TLS *and* a way to tell clients apart (client
certificates signed by ``--client-ca``, or a bearer token from ``--token-file``), otherwise it
refuses to start. Health checking (``grpc.health.v1``, open without credentials so load balancers
can probe it) and server reflection are served beside ``edgedistill.v1.DistillService``. One
service owns a state directory at a time (a lock file says which process); on start it puts the
jobs a dead predecessor left RUNNING back in the queue, where they resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import fcntl
import hmac
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

from common.errors import ConfigError

LOOPBACK = {"127.0.0.1", "::1", "localhost", "[::1]"}
OPEN_METHODS = ("/grpc.health.v1.Health/",)
MESSAGE_LIMIT = 4 << 20  # bytes per message either way (uploads and downloads come in 1 MiB chunks)


def serve_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--state-dir", required=True, help="jobs.db, uploaded models, artifacts, checkpoints, logs")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: needs TLS + auth)")
    parser.add_argument("--port", type=int, default=50051, help="port (0: any free one, printed at start)")
    parser.add_argument("--tls-cert", default="", help="server certificate (PEM)")
    parser.add_argument("--tls-key", default="", help="its private key (PEM)")
    parser.add_argument("--client-ca", default="", help="CA whose client certificates are accepted (mutual TLS)")
    parser.add_argument("--token-file", default="", help="file holding the bearer token clients must send")
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument(
        "--devices", default="auto", help="local executor: one worker per entry, e.g. cpu,cpu or cuda:0,cuda:1"
    )
    parser.add_argument("--ray-address", default="local", help="ray executor: a cluster address, or local")
    parser.add_argument("--ray-slots", type=int, default=1, help="ray executor: jobs running at once")
    parser.add_argument("--ray-gpus", type=float, default=0.0, help="ray executor: GPUs per job (1 on a GPU cluster)")
    parser.add_argument("--data-root", default="", help="where the server's datasets are (default $EDGEDISTILL_DATA)")
    parser.add_argument("--max-upload-mib", type=float, default=256.0, help="largest model upload accepted")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=32, help="more get RESOURCE_EXHAUSTED")


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: {exc.strerror}; write a long random token into it") from None
    if len(token) < 16:
        raise ConfigError(f"--token-file {path}: the token is {len(token)} characters; use at least 16 random ones")
    return token


def check_binding(args: argparse.Namespace) -> None:
    """Refuse what would expose the service: non-loopback without TLS and client authentication."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together; give both (edgedistill certs --out DIR writes them)")
    if args.client_ca and not args.tls_cert:
        raise ConfigError("--client-ca needs --tls-cert/--tls-key: client certificates are checked inside TLS")
    if args.host in LOOPBACK:
        return
    if not args.tls_cert or not (args.client_ca or args.token_file):
        raise ConfigError(
            f"--host {args.host} is not loopback: the service would accept jobs from the network, so it needs "
            "--tls-cert/--tls-key and either --client-ca (mutual TLS) or --token-file; or bind --host 127.0.0.1"
        )


def token_interceptor(token: str):
    """A server interceptor: every call but health checks needs ``authorization: Bearer <token>``."""
    import grpc

    expected = f"Bearer {token}".encode()

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token; pass --token-file")

    refusals = {
        (False, False): grpc.unary_unary_rpc_method_handler(refuse),
        (False, True): grpc.unary_stream_rpc_method_handler(refuse),
        (True, False): grpc.stream_unary_rpc_method_handler(refuse),
        (True, True): grpc.stream_stream_rpc_method_handler(refuse),
    }

    class TokenInterceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            sent = dict(details.invocation_metadata).get("authorization", "")
            if details.method.startswith(OPEN_METHODS) or hmac.compare_digest(sent.encode(), expected):
                return continuation(details)
            handler = continuation(details)
            if handler is None:  # an unknown method stays UNIMPLEMENTED
                return None
            return refusals[(handler.request_streaming, handler.response_streaming)]

    return TokenInterceptor()


def hold_state_dir(root: Path) -> int:
    """An exclusive lock on the state directory for this process's lifetime; one service per directory."""
    root.mkdir(parents=True, exist_ok=True)
    handle = os.open(root / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(handle, 32, 0).decode(errors="replace").strip()
        raise ConfigError(
            f"--state-dir {root} is used by another edgedistill serve (pid {holder or '?'}); stop it or choose another"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, str(os.getpid()).encode(), 0)
    return handle


def build_server(args: argparse.Namespace, layout):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from server.service.api import DistillService
    from server.service.v1 import distill_pb2, distill_pb2_grpc

    interceptors = [token_interceptor(read_token(args.token_file))] if args.token_file else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.max_concurrent_rpcs),
        interceptors=interceptors,
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)],
    )
    service = DistillService(layout, args.data_root, int(args.max_upload_mib * (1 << 20)))
    distill_pb2_grpc.add_DistillServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = distill_pb2.DESCRIPTOR.services_by_name["DistillService"].full_name
    for name in (service_name, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{args.host}:{args.port}"
    if args.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(_read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert"))],
            root_certificates=_read(args.client_ca, "--client-ca") if args.client_ca else None,
            require_client_auth=bool(args.client_ca),
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address} (in use?); choose another --port, or 0 for any free one")
    return server, port


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None


def make_executor(args: argparse.Namespace, layout):
    from server.service.executors import LocalExecutor, RayExecutor

    if args.executor == "ray":
        if args.ray_slots < 1 or args.ray_gpus < 0:
            raise ConfigError("--ray-slots must be >= 1 and --ray-gpus >= 0")
        return RayExecutor(layout, args.ray_address, args.ray_slots, args.ray_gpus, args.data_root)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not devices:
        raise ConfigError("--devices needs at least one entry, e.g. cpu or cuda:0,cuda:1")
    return LocalExecutor(layout, devices, args.data_root)


def serve_main(args: argparse.Namespace) -> int:
    from server.service.runner import ServiceLayout
    from server.service.store import JobStore

    check_binding(args)
    if args.max_upload_mib <= 0 or args.max_concurrent_rpcs < 1:
        raise ConfigError("--max-upload-mib must be > 0 and --max-concurrent-rpcs >= 1")
    if args.data_root and not Path(args.data_root).is_dir():
        raise ConfigError(f"--data-root {args.data_root}: no such directory (e.g. ../shared/data)")
    layout = ServiceLayout(Path(args.state_dir))
    lock = hold_state_dir(layout.root)
    layout.create()
    recovered = JobStore(layout.database).recover()
    grpc_server, port = build_server(args, layout)
    executor = make_executor(args, layout)
    executor.start()
    from server.methods import registry  # noqa: F401  (registers every method now, not in the first request)
    from server.service.validation import warm_dataset_facts

    threading.Thread(target=warm_dataset_facts, args=(args.data_root,), name="warm-datasets", daemon=True).start()
    grpc_server.start()
    auth = "mutual TLS" if args.client_ca else "bearer token" if args.token_file else "none (loopback only)"
    print(
        f"edgedistill serve: listening on {args.host}:{port} (TLS {'on' if args.tls_cert else 'off'}, auth {auth}, "
        f"executor {args.executor}, state {layout.root}); {len(recovered)} interrupted job(s) back in the queue",
        flush=True,
    )
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    print("edgedistill serve: stopping (running jobs resume at the next start)", flush=True)
    grpc_server.stop(grace=5).wait()
    executor.stop()
    os.close(lock)
    return 0
