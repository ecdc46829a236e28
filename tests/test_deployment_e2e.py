"""A real deployment on 127.0.0.1: SuperLink with TLS + node authentication on loopback, the fleet
gateway in front of it, two SuperNodes that reach it only through the gateway, ``flwr run``.

Every Flower process runs in its own session (process group) with its own FLWR_HOME under
``tmp_path``, offline settings, and is stopped (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import main
from simulations.simulate import FLOWER_ENV, free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = ("flwr", "flower-superlink", "flower-supernode")


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


class Flower:
    """Starts Flower commands with offline settings and a private FLWR_HOME each; stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def env(self, name: str) -> dict[str, str]:
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "PATH": path}

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        program = [sys.executable, "-m", "common.cli"] if args[0] == "edgedistill" else [str(BIN / args[0])]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*program, *args[1:]],
                cwd=self.root,
                env=self.env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def start_listening(self, name: str, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
        """Start a server process and return once it accepts connections on ``port``."""
        proc, log = self.start(name, *args)
        _wait_for_port(port, proc, log)
        return proc, log

    def run(self, name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.root,
            env=self.env(name),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop_all(self) -> None:
        """SIGTERM to every process group, 15 s grace, then SIGKILL to the groups and to any straggler.

        Stragglers are descendants in sessions of their own (the SuperLink starts its SuperExec so).
        """
        tree = [child for proc in self.procs for child in _descendants(proc.pid)]
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGTERM)
        for pid, started in tree:
            _signal_pid(pid, started, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid, started in tree:
            _signal_pid(pid, started, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing left to stop
        os.killpg(pgid, sig)


def _signal_pid(pid: int, started: str, sig: int) -> None:
    if _start_time(pid) == started:  # still the same process, not a reused pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of the live descendants of ``root`` (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat_file.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if (started := _start_time(pid)) is not None:
            found.append((pid, started))
        todo += children.get(pid, [])
    return found


def test_certs_command_writes_keys_privately_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--nodes", "1", "--host", "edge.example", "--host", "10.0.0.5"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ca.crt", "ca.key", "node-1", "node-1.pub", "server.crt", "server.key"]
    for name in ("ca.key", "server.key", "node-1"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert (out / "node-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    before = (out / "ca.key").read_bytes()
    assert main(["certs", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "ca.key").read_bytes() == before
    assert main(["certs", "--out", str(out), "--overwrite", "--nodes", "0"]) == 0
    assert not (out / "node-1").exists() and (out / "ca.key").read_bytes() != before


def _write_cli_connection(home: Path, name: str, address: str, ca: Path) -> None:
    """The flwr CLI's SuperLink connection ``name`` (``$FLWR_HOME/config.toml``)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )


def _start_superlink(flower: Flower, certs: Path, port: int) -> tuple[subprocess.Popen, Path]:
    return flower.start_listening(
        "superlink",
        port,
        "flower-superlink",
        *("--ssl-ca-certfile", str(certs / "ca.crt")),
        *("--ssl-certfile", str(certs / "server.crt")),
        *("--ssl-keyfile", str(certs / "server.key")),
        "--enable-supernode-auth",
        *("--port", str(port)),
    )


def _start_gateway(flower: Flower, certs: Path, port: int, link_port: int) -> tuple[subprocess.Popen, Path]:
    return flower.start_listening(
        "gateway",
        port,
        *("edgedistill", "fleet-gateway"),
        *("--listen", f"127.0.0.1:{port}", "--superlink", f"127.0.0.1:{link_port}"),
        *("--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key")),
        *("--superlink-ca", str(certs / "ca.crt")),
    )


def _refused_by_gateway(port: int, certs: Path, path: str) -> tuple[int, str]:
    """Status and body of a POST to the gateway at ``path`` (what a device could send)."""
    import httpx

    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    reply = httpx.post(f"https://127.0.0.1:{port}{path}", content=b"\x00", verify=tls, timeout=30)
    return reply.status_code, reply.text


def _start_supernode(flower: Flower, name: str, link: str, certs: Path, key: str, port: int, partition: int):
    return flower.start(
        name,
        "flower-supernode",
        *("--superlink", link),
        *("--root-certificates", str(certs / "ca.crt")),
        *("--auth-supernode-private-key", str(certs / key)),
        *("--port", str(port)),  # the node's own Runtime API; two nodes on one machine need two ports
        *("--node-config", f"partition-id={partition} num-partitions=2"),
    )


@pytest.mark.e2e
def test_devices_behind_the_fleet_gateway_run_two_rounds_and_cannot_reach_the_control_api(tmp_path):
    if missing := [t for t in TOOLS if not (BIN / t).exists()]:
        pytest.skip(f"Flower tools not installed next to {sys.executable}: {', '.join(missing)}")
    from server.federation.gateway import REFUSAL

    certs, out = tmp_path / "certs", tmp_path / "out"
    assert main(["certs", "--out", str(certs), "--nodes", "3"]) == 0
    link_port, gateway_port, *node_ports = free_ports(5)
    link, devices_port = f"127.0.0.1:{link_port}", f"127.0.0.1:{gateway_port}"
    flower = Flower(tmp_path)
    _write_cli_connection(tmp_path / "homes" / "cli", "edge", link, certs / "ca.crt")
    _write_cli_connection(tmp_path / "homes" / "intruder", "edge", devices_port, certs / "ca.crt")
    try:
        _, link_log = _start_superlink(flower, certs, link_port)
        _, gateway_log = _start_gateway(flower, certs, gateway_port, link_port)
        for key in ("node-1.pub", "node-2.pub"):
            reg = flower.run("cli", "flwr", "supernode", "register", str(certs / key), "edge", timeout=60)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        stranger, stranger_log = _start_supernode(
            flower, "unregistered", devices_port, certs, "node-3", node_ports[2], 0
        )
        for i in range(2):
            _start_supernode(flower, f"supernode-{i}", devices_port, certs, f"node-{i + 1}", node_ports[i], i)

        # what a device (or anyone on the devices' network) gets when it calls the Control API
        for path in (
            "/v1/control/start-run",
            "/v1/control/list-runs",
            "/v1/fleet/../control/start-run",
            "/v1/fleet/%2e%2e/control/start-run",
            "/v1/runtime/get-nodes",
            "/health",
        ):
            assert _refused_by_gateway(gateway_port, certs, path) == (403, REFUSAL), path
        intruder = flower.run("intruder", "flwr", "run", str(REPO), "edge", "--stream", timeout=120)
        assert intruder.returncode != 0 and "403" in intruder.stdout + intruder.stderr, intruder.stdout

        config = f"num-rounds=2 min-available-nodes=2 out-dir='{out}' pipc='10'"
        run = flower.run("cli", "flwr", "run", str(REPO), "edge", "--run-config", config, "--stream", timeout=420)
        logs = f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\n{_tail(link_log)}\n{_tail(gateway_log)}"
        assert run.returncode == 0 and (out / "metrics.json").exists(), logs
        history = json.loads((out / "metrics.json").read_text())["history"]
        assert [h["round"] for h in history] == [0, 1, 2]
        assert all(h["clients_ok"] == 2 for h in history[1:])
        assert history[-1]["accuracy"] > 0.3 > history[0]["accuracy"]  # chance is 0.1
        assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3  # the intruder started nothing

        # a node whose key was never registered is refused (through the gateway, by the SuperLink):
        # Flower's exit code 305 and its message, process status 1
        assert stranger.wait(timeout=60) == 1
        refused = _tail(stranger_log, 20000)
        assert "Exit Code: 305" in refused and "Failed to activate SuperNode" in refused, refused[-2000:]
    finally:
        flower.stop_all()


def _ask_gateway(app, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, str]:
    """One ASGI request to the gateway application in this process: ``(status, body text)``."""
    import asyncio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/v1/fleet/ping",
        "raw_path": b"/v1/fleet/ping",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 9092),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


def test_gateway_refuses_a_malformed_or_oversized_body_before_the_superlink(tmp_path):
    from server.federation.gateway import GatewayConfig, build_app

    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--nodes", "0"]) == 0
    (closed_port,) = free_ports(1)  # nothing listens there: a forwarded request fails with 502
    config = GatewayConfig(
        superlink=f"127.0.0.1:{closed_port}",
        certfile=str(certs / "server.crt"),
        keyfile=str(certs / "server.key"),
        superlink_ca=str(certs / "ca.crt"),
        max_body_bytes=16,
    )
    app = build_app(config)
    assert _ask_gateway(app, [(b"content-length", b"12abc")], b"12abc") == (
        400,
        "Content-Length must be a decimal byte count",
    )
    assert _ask_gateway(app, [(b"content-length", b"17")], b"x" * 17)[0] == 413
    # a body that lies about its size is cut off at the limit, not read to the end
    assert _ask_gateway(app, [(b"content-length", b"4")], b"x" * 17)[0] == 413
    assert _ask_gateway(app, [(b"content-length", b"4")], b"xxxx") == (
        502,
        "the SuperLink is unreachable from the fleet gateway",
    )
