"""The distillation job service, as a real ``edgedistill serve`` process on 127.0.0.1 (no mocks).

Submit -> watch -> fetch, every refused request with its status code and an unchanged job table,
authentication, a SIGKILL of the service in the middle of a job (the restarted service finishes it
with the artifact an uninterrupted run writes), cancellation, and the Ray executor.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import grpc
import pytest

from common.artifacts import load_distilled_set, read_manifest
from server.service.client import ServiceClient
from server.service.store import JobStore
from server.service.v1 import distill_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
SMALL_DM = {"method": "dm", "dataset": "digits", "ipc": 2, "pipc": 20, "options": {"iterations": "30"}}


class Service:
    """``edgedistill serve`` in its own process; ``address`` once it listens."""

    def __init__(self, state_dir: Path, *extra: str, token: bool = True) -> None:
        self.state_dir, self.extra, self.token_file = state_dir, extra, None
        if token:
            self.token_file = state_dir.parent / f"{state_dir.name}.token"
            self.token_file.write_text(TOKEN)

    def start(self, timeout: float = 120) -> Service:
        command = [sys.executable, "-m", "common.cli", "serve", "--state-dir", str(self.state_dir), "--port", "0"]
        command += [*self.extra, *(["--token-file", str(self.token_file)] if self.token_file else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline, seen = time.time() + timeout, []
        while time.time() < deadline:
            line = self.process.stdout.readline()
            seen.append(line)
            if match := re.search(r"listening on [^ ]+:(\d+)", line):
                self.address = f"127.0.0.1:{match.group(1)}"
                return self
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError("service did not start:\n" + "".join(seen))

    def client(self, token: bool = True) -> ServiceClient:
        return ServiceClient(self.address, token_file=str(self.token_file) if token and self.token_file else "")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for(client: ServiceClient, job_id: str, condition, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(job_id)
        if condition(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never got there: {client.get(job_id)}")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service") / "state").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def digits_model_dir(tmp_path_factory) -> Path:
    from common.cli import main

    out = tmp_path_factory.mktemp("model") / "digits-model"
    assert main(["train", "--dataset", "digits", "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_submit_watch_fetch_a_dm_job_end_to_end(service, tmp_path):
    client = service.client()
    job = client.submit(**SMALL_DM, seed=3, label="e2e")
    assert job.state == pb.QUEUED and job.request.ipc == 2 and job.request.options["iterations"] == "30"
    events = list(client.watch(job.id))
    assert events[-1].state == pb.SUCCEEDED and events[-1].phase == "done"
    progress = [e.iteration for e in events if e.state == pb.RUNNING and e.iterations]
    assert progress == sorted(progress) and progress and progress[-1] <= 30 and events[-1].iteration == 30
    done = client.get(job.id)
    assert done.attempts == 1 and done.finished_at >= done.started_at > 0 and len(done.artifact_sha256) == 64
    path = client.download(job.id, tmp_path / "artifact")
    dset = load_distilled_set(path)
    assert dset.counts() == dict.fromkeys(range(10), 2) and dset.method == "dm"
    manifest = read_manifest(path)
    assert manifest["tensors_sha256"] == done.artifact_sha256 and manifest["job_id"] == job.id
    assert manifest["label"] == "e2e" and manifest["iterations"] == 30 and manifest["pipc"] == 20
    with pytest.raises(Exception, match="already exists"):  # a fetch never overwrites silently
        client.download(job.id, tmp_path / "artifact")


def test_a_job_that_asks_for_evaluation_reports_the_accuracy_evaluate_measures(service, tmp_path):
    import torch

    from common.datasets import load_dataset
    from common.evaluation import PRESETS, evaluate_set

    client = service.client()
    job = client.submit(**SMALL_DM, seed=4, eval_runs=2)
    assert job.request.eval_runs == 2
    events = list(client.watch(job.id))
    assert "evaluating" in [e.phase for e in events] and events[-1].state == pb.SUCCEEDED
    done = client.get(job.id)
    assert 0.3 < done.accuracy <= 1.0  # chance is 0.1
    assert events[-1].metrics["accuracy"] == pytest.approx(done.accuracy) and "test accuracy" in events[-1].message
    path = client.download(job.id, tmp_path / "artifact")
    recorded = read_manifest(path)["evaluation"]["convnet3@300ep"]
    assert recorded["runs"] == 2 and recorded["mean"] == pytest.approx(done.accuracy)
    # the same networks `edgedistill evaluate --quick --runs 2 --seed 4` trains (one thread, as the worker)
    dset, data, threads = load_distilled_set(path), load_dataset("digits"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = evaluate_set(
            dset.images,
            dset.labels,
            data.test,
            data.info,
            runs=2,
            config=PRESETS["quick"],
            seed=4,
            workers=1,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert again.accuracies == pytest.approx(recorded["accuracies"])
    plain = client.submit(**SMALL_DM, seed=4)
    assert wait_for(client, plain.id, lambda j: j.state == pb.SUCCEEDED).accuracy == 0.0  # none asked, none run


def test_a_dkkt_job_runs_on_an_uploaded_global_model(service, digits_model_dir):
    client = service.client()
    ref = client.upload_model(digits_model_dir)
    assert client.upload_model(digits_model_dir).id == ref.id and ref.arch == "convnet3" and ref.dataset == "digits"
    job = client.submit(
        method="dm+dkkt", dataset="digits", ipc=1, pipc=10, global_model=ref.id, options={"iterations": "10"}, seed=1
    )
    done = wait_for(client, job.id, lambda j: j.state not in (pb.QUEUED, pb.RUNNING))
    assert done.state == pb.SUCCEEDED, done.error
    manifest = read_manifest(done.artifact)
    assert manifest["global_model_sha256"] == ref.sha256


def _upload_raw(client: ServiceClient, archive: bytes, sha256: str | None = None, total: int | None = None):
    first = pb.ModelChunk(
        total_bytes=total or len(archive), sha256=sha256 or hashlib.sha256(archive).hexdigest(), data=archive
    )
    return client.call("UploadModel", iter([first]))


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_every_refused_request_gets_its_status_code_and_leaves_the_job_table_unchanged(
    service, digits_model_dir, tmp_path
):
    from common.datasets import DatasetInfo
    from common.modelio import save_model
    from common.models import build_model
    from server.service.models import pack_model

    client = service.client()
    mnist_info = DatasetInfo("mnist", 1, 28, 10, tuple(map(str, range(10))), (0.13,), (0.31,))
    save_model(tmp_path / "mnist-model", build_model("convnet3", 1, 10, 28), mnist_info, {"weight_decay": 5e-4})
    mnist_model = client.upload_model(tmp_path / "mnist-model")  # a valid model, for another dataset
    digits_model = client.upload_model(digits_model_dir)
    before = [j.id for j in client.list(page_size=500).jobs]
    refused = {
        "unknown method": ({**SMALL_DM, "method": "magic"}, "INVALID_ARGUMENT", "unknown method 'magic'"),
        "unknown dataset": ({**SMALL_DM, "dataset": "imagenet"}, "INVALID_ARGUMENT", "unknown dataset"),
        "a server path": ({**SMALL_DM, "dataset": "npz:/etc/passwd"}, "INVALID_ARGUMENT", "paths on the server"),
        "ipc 0": ({**SMALL_DM, "ipc": 0}, "INVALID_ARGUMENT", "ipc must be > 0"),
        "ipc < 0": ({**SMALL_DM, "ipc": -3}, "INVALID_ARGUMENT", "ipc must be > 0"),
        "counts missing a class": ({**SMALL_DM, "ipc": 0, "class_counts": {0: 2}}, "INVALID_ARGUMENT", "each of"),
        "pipc too large": ({**SMALL_DM, "pipc": 5000}, "FAILED_PRECONDITION", "use at most"),
        "pipc < 0": ({**SMALL_DM, "pipc": -1}, "INVALID_ARGUMENT", "pipc must be"),
        "unknown option": ({**SMALL_DM, "options": {"bogus": "1"}}, "INVALID_ARGUMENT", "has no option 'bogus'"),
        "mistyped option": ({**SMALL_DM, "options": {"iterations": "many"}}, "INVALID_ARGUMENT", "needs a int"),
        "out-of-range option": ({**SMALL_DM, "options": {"iterations": "-5"}}, "INVALID_ARGUMENT", ">= 0"),
        "too many eval runs": ({**SMALL_DM, "eval_runs": 6}, "INVALID_ARGUMENT", "eval_runs 6: use 0"),
        "eval runs < 0": ({**SMALL_DM, "eval_runs": -1}, "INVALID_ARGUMENT", "eval_runs -1: use 0"),
        "a service-owned option": ({**SMALL_DM, "options": {"resume": "true"}}, "INVALID_ARGUMENT", "set by the"),
        "dkkt without a model": ({**SMALL_DM, "method": "dm+dkkt"}, "INVALID_ARGUMENT", "needs global_model"),
        "unknown model": ({**SMALL_DM, "method": "dm+dkkt", "global_model": "abc123"}, "NOT_FOUND", "upload it"),
        "hostile model id": ({**SMALL_DM, "method": "dm+dkkt", "global_model": "../x"}, "INVALID_ARGUMENT", "not a"),
        "model of another shape": (
            {**SMALL_DM, "method": "dm+dkkt", "global_model": mnist_model.id},
            "FAILED_PRECONDITION",
            "(1, 28, 10)",
        ),
        "a model for a method without one": (
            {**SMALL_DM, "global_model": digits_model.id},
            "INVALID_ARGUMENT",
            "takes no global model",
        ),
        "oversize label": ({**SMALL_DM, "label": "x" * 300}, "INVALID_ARGUMENT", "at most 256"),
    }
    for name, (fields, code, text) in refused.items():
        with pytest.raises(Exception, match=re.escape(code)) as caught:
            client.submit(**fields)
        assert text in str(caught.value), (name, str(caught.value))
    archive = pack_model(digits_model_dir)
    uploads = {
        "announced size above the limit": (lambda: _upload_raw(client, archive, total=1 << 40), "RESOURCE_EXHAUSTED"),
        "checksum mismatch": (lambda: _upload_raw(client, archive, sha256="0" * 64), "FAILED_PRECONDITION"),
        "a path outside the model": (lambda: _upload_raw(client, _tar({"../evil": b"x"})), "INVALID_ARGUMENT"),
        "not a tar archive": (lambda: _upload_raw(client, b"not a tar" * 100), "INVALID_ARGUMENT"),
        "corrupt weights": (
            lambda: _upload_raw(client, _tar({"model.json": b"{}", "model.safetensors": b"junk"})),
            "INVALID_ARGUMENT",
        ),
    }
    for name, (upload, code) in uploads.items():
        with pytest.raises(Exception, match=code) as caught:
            upload()
        assert code in str(caught.value), name
    for call, code in (
        (lambda: client.get("nope"), "NOT_FOUND"),
        (lambda: client.cancel("nope"), "NOT_FOUND"),
        (lambda: list(client.watch("nope")), "NOT_FOUND"),
        (lambda: client.list(page_size=501), "INVALID_ARGUMENT"),
        (lambda: client.list(page_token="!!"), "INVALID_ARGUMENT"),
        (lambda: client.download("nope", tmp_path / "x"), "NOT_FOUND"),
    ):
        with pytest.raises(Exception, match=code):
            call()
    assert [j.id for j in client.list(page_size=500).jobs] == before
    stored = sorted(p.name for p in (service.state_dir / "models").iterdir())
    assert stored == sorted([mnist_model.id, digits_model.id])  # refused uploads left nothing behind


def test_clients_without_the_token_are_refused_but_health_checks_are_open(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for client in (service.client(token=False), ServiceClient(service.address, token_file=_wrong_token(service))):
        for call in (
            lambda c=client: c.submit(**SMALL_DM),
            lambda c=client: c.list(),
            lambda c=client: list(c.watch("x")),
        ):
            with pytest.raises(Exception, match="UNAUTHENTICATED"):
                call()
    with grpc.insecure_channel(service.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="edgedistill.v1.DistillService"), timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _wrong_token(service) -> str:
    path = service.token_file.with_name("wrong.token")
    path.write_text("not-the-token-0123456789")
    return str(path)


def test_the_service_refuses_to_expose_itself_or_share_its_state(service, tmp_path):
    exposed = subprocess.run(
        [sys.executable, "-m", "common.cli", "serve", "--state-dir", str(tmp_path / "s"), "--host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exposed.returncode == 2 and "is not loopback" in exposed.stderr and "--token-file" in exposed.stderr
    second = subprocess.run(
        [sys.executable, "-m", "common.cli", "serve", "--state-dir", str(service.state_dir), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2 and "used by another edgedistill serve" in second.stderr


def test_cancel_stops_a_running_job_and_the_worker_takes_the_next(service):
    client = service.client()
    long = client.submit(**{**SMALL_DM, "options": {"iterations": "100000"}})
    wait_for(client, long.id, lambda j: j.state == pb.RUNNING and j.iteration >= 10)
    assert client.cancel(long.id).state == pb.CANCELLED
    after = client.submit(**SMALL_DM, seed=5)
    assert wait_for(client, after.id, lambda j: j.state == pb.SUCCEEDED, timeout=300).attempts == 1
    stopped = client.get(long.id)
    assert stopped.state == pb.CANCELLED and stopped.iteration < 100000 and not stopped.artifact
    assert not (service.state_dir / "artifacts" / long.id).exists()


def test_sigkill_of_the_service_mid_job_then_restart_finishes_it_with_the_uninterrupted_artifact(tmp_path):
    request = {**SMALL_DM, "options": {"iterations": "120", "checkpoint_every": "20"}, "seed": 7}
    first = Service(tmp_path / "state").start()
    client = first.client()
    job = client.submit(**request)
    wait_for(client, job.id, lambda j: j.iteration >= 50)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    store = JobStore(tmp_path / "state" / "jobs.db")
    frozen = store.get(job.id)
    time.sleep(3)  # the service's worker died with it: nobody goes on writing progress
    assert store.get(job.id)["iteration"] == frozen["iteration"] and frozen["state"] == "RUNNING"
    second = Service(tmp_path / "state").start()
    try:
        client = second.client()
        done = wait_for(client, job.id, lambda j: j.state in (pb.SUCCEEDED, pb.FAILED))
        assert done.state == pb.SUCCEEDED and done.attempts == 2, done.error
        resumed = read_manifest(done.artifact)
        assert resumed["resumed_from"] >= 40 and resumed["iterations"] == 120
        again = client.submit(**request)  # the same request, never interrupted
        fresh = wait_for(client, again.id, lambda j: j.state in (pb.SUCCEEDED, pb.FAILED))
        assert fresh.state == pb.SUCCEEDED and fresh.attempts == 1
        assert fresh.artifact_sha256 == done.artifact_sha256  # bit for bit the same distilled images
        jobs = client.list().jobs
        assert sorted(j.id for j in jobs) == sorted([job.id, again.id])  # none lost, none duplicated
    finally:
        second.stop()


def test_the_ray_executor_runs_a_job_on_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    service = Service(tmp_path / "state", "--executor", "ray", "--ray-address", "local").start(timeout=240)
    try:
        client = service.client()
        job = client.submit(**{**SMALL_DM, "options": {"iterations": "10"}})
        done = wait_for(client, job.id, lambda j: j.state in (pb.SUCCEEDED, pb.FAILED), timeout=300)
        assert done.state == pb.SUCCEEDED, done.error
        assert done.artifact_sha256 == read_manifest(done.artifact)["tensors_sha256"]
    finally:
        service.stop()


def test_mutual_tls_lets_certified_clients_in_on_any_address_and_keeps_others_out(tmp_path):
    from common.cli import main

    assert main(["certs", "--out", str(tmp_path / "pki"), "--nodes", "0", "--clients", "1"]) == 0
    pki = tmp_path / "pki"
    tls = ["--host", "0.0.0.0", "--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    service = Service(tmp_path / "state", *tls, "--client-ca", str(pki / "ca.crt"), token=False).start()
    try:
        certified = ServiceClient(
            service.address,
            ca_cert=str(pki / "ca.crt"),
            client_cert=str(pki / "client-1.crt"),
            client_key=str(pki / "client-1.key"),
        )
        job = certified.submit(**{**SMALL_DM, "options": {"iterations": "5"}})
        assert wait_for(certified, job.id, lambda j: j.state == pb.SUCCEEDED).attempts == 1
        for stranger in (ServiceClient(service.address, ca_cert=str(pki / "ca.crt")), service.client()):
            with pytest.raises(Exception, match="no job service at|UNAVAILABLE"):
                stranger.list()
    finally:
        service.stop()


def test_a_federation_hands_its_distillation_rounds_to_the_service(service, tmp_path):
    pytest.importorskip("ray")
    from server.federation.run import FederationConfig
    from simulations.simulate import run_simulated_fleet

    config = FederationConfig(
        dataset="digits",
        num_rounds=2,
        min_train_nodes=3,
        min_available_nodes=3,
        pipc="10",
        lr=0.05,
        seed=0,
        out_dir=str(tmp_path / "fed"),
        distill_method="dm+dkkt",
        distill_every=1,
        distill_ipc="2",
        distill_iterations=5,
        distill_options="batch_real=8",
        distill_eval_runs=1,
        distill_eval_epochs=5,
        distill_service=service.address,
        distill_service_token_file=str(service.token_file),
        distill_service_wait=300,
    )
    history = run_simulated_fleet(config, clients=3)
    jobs = {j.id: j for j in service.client().list(page_size=500).jobs}
    for record in history[1:]:
        job = jobs[record["distill_job"]]
        assert job.state == pb.SUCCEEDED and f"round {record['round']}" in job.request.label
        assert 0.0 <= record["distilled_accuracy"] <= 1.0 and "distill_error" not in record
        manifest = read_manifest(record["distilled_artifact"])
        assert manifest["job_id"] == job.id and manifest["real_images_seen"] == 100  # the federation's pipc
        assert manifest["options"]["iterations"] == 5 and "convnet3@5ep" in manifest["evaluation"]
    final = (tmp_path / "fed" / "global-model" / "model.json").read_text()
    assert read_manifest(history[-1]["distilled_artifact"])["global_model_sha256"] in final
