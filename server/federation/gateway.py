"""``edgedistill fleet-gateway``: the devices' only way into the federation.

Flower 1.41's SuperLink serves the Fleet API (``/v1/fleet/*``, what SuperNodes call), the Control
API (``/v1/control/*``: start runs, which pushes code to every device; stop runs; read logs) and
the runtime API on one HTTP port, and open-source Flower does not authenticate the Control API.
So the SuperLink listens on loopback only, and this gateway, a TLS-terminating reverse proxy, is
what the devices' network reaches: it forwards a request only when its path is a Fleet API route
(``/v1/fleet/`` + a lowercase route name) and refuses everything else with 403 and
:data:`REFUSAL`, before anything reaches the SuperLink. SuperNode authentication is untouched:
the signed headers pass through and the SuperLink checks them.

Built on Starlette, uvicorn and httpx, which Flower's SuperLink itself runs on.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

FLEET_ROUTE = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
REFUSAL = (
    "refused by the edgedistill fleet gateway: only the Fleet API (/v1/fleet/*) is open to devices; "
    "the Control API is served on the SuperLink's own address"
)
# headers that describe one hop, not the request (RFC 9110 s.7.6.1), and the ones httpx/uvicorn set
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, its TLS identity, and the SuperLink it forwards to."""

    superlink: str  # host:port of the SuperLink's HTTP API (keep it on loopback or a private network)
    certfile: str  # the certificate devices check (signed by the CA they were given)
    keyfile: str
    superlink_ca: str  # CA that signed the SuperLink's certificate
    listen: str = "0.0.0.0:9092"
    max_body_bytes: int = 256 * 2**20  # a Fleet request carries at most one model's weights
    timeout: float = 120.0

    def __post_init__(self) -> None:
        for label, path in (("--ssl-certfile", self.certfile), ("--ssl-keyfile", self.keyfile)):
            if not Path(path).is_file():
                raise ConfigError(f"{label} {path}: no such file (edgedistill certs --out DIR writes server.crt/.key)")
        if not Path(self.superlink_ca).is_file():
            raise ConfigError(f"--superlink-ca {self.superlink_ca}: no such file (the CA that signed the SuperLink)")
        host_port(self.listen, "--listen")
        host_port(self.superlink, "--superlink")
        if self.max_body_bytes < 1 or self.timeout <= 0:
            raise ConfigError("--max-body-mib and --timeout must be > 0")


def host_port(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {address!r}: give HOST:PORT, e.g. 127.0.0.1:9093")
    return host.strip("[]"), int(port)


def is_fleet_route(method: str, path: str) -> bool:
    """A Fleet API call: POST or GET to ``/v1/fleet/<route>`` (no dot segments, escapes or extra parts)."""
    return method in ("POST", "GET") and FLEET_ROUTE.fullmatch(path) is not None


def build_app(config: GatewayConfig):
    """The Starlette application: every path goes to :func:`forward` or is refused."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    upstream = httpx.AsyncClient(
        base_url=f"https://{config.superlink}",
        verify=ssl.create_default_context(cafile=config.superlink_ca),
        timeout=config.timeout,
    )

    async def forward(request: Request) -> Response:
        path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        if not is_fleet_route(request.method, path) or request.url.query:
            return PlainTextResponse(REFUSAL, status_code=403)
        too_large = PlainTextResponse("request body too large for the fleet gateway", status_code=413)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit():
            return PlainTextResponse("Content-Length must be a decimal byte count", status_code=400)
        if int(declared) > config.max_body_bytes:
            return too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                return too_large
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            reply = await upstream.request(request.method, path, content=bytes(body), headers=headers)
        except httpx.HTTPError:
            return PlainTextResponse("the SuperLink is unreachable from the fleet gateway", status_code=502)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(reply.content, status_code=reply.status_code, headers=kept)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await upstream.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve(config: GatewayConfig) -> None:
    import uvicorn

    host, port = host_port(config.listen, "--listen")
    uvicorn.run(
        build_app(config),
        host=host,
        port=port,
        ssl_certfile=config.certfile,
        ssl_keyfile=config.keyfile,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
    )


def fleet_gateway_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--listen", default="0.0.0.0:9092", help="HOST:PORT the devices connect to")
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink (bound to loopback)")
    parser.add_argument("--ssl-certfile", required=True, help="the gateway's certificate (e.g. CERTS/server.crt)")
    parser.add_argument("--ssl-keyfile", required=True, help="its private key (e.g. CERTS/server.key)")
    parser.add_argument("--superlink-ca", required=True, help="CA of the SuperLink's certificate (e.g. CERTS/ca.crt)")
    parser.add_argument("--max-body-mib", type=float, default=256.0, help="largest request forwarded (MiB)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the SuperLink")


def fleet_gateway_main(args: argparse.Namespace) -> int:
    config = GatewayConfig(
        superlink=args.superlink,
        certfile=args.ssl_certfile,
        keyfile=args.ssl_keyfile,
        superlink_ca=args.superlink_ca,
        listen=args.listen,
        max_body_bytes=int(args.max_body_mib * 2**20),
        timeout=args.timeout,
    )
    print(f"fleet gateway on {config.listen} -> SuperLink {config.superlink} (Fleet API only)", flush=True)
    serve(config)
    return 0
