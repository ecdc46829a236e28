"""Executors: who runs the queued jobs. The job table stays the single source of truth for both.

- ``local`` (default): N worker processes on this machine, one per device, each claiming jobs
  from the table. They die with the service (Linux parent-death signal), so a crashed service
  leaves no orphan writing into its state.
- ``ray``: a dispatcher thread claims jobs and runs each as a Ray task with the resources it
  needs (``num_gpus=1`` on a GPU server), so a team that outgrows one machine points the service
  at its Ray cluster. The tasks write into the same state directory, so on a multi-machine
  cluster it must be on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

from server.service.runner import ServiceLayout, run_job, worker_loop
from server.service.store import JobStore


class LocalExecutor:
    def __init__(self, layout: ServiceLayout, devices: list[str], data_root: str = "") -> None:
        self.layout, self.devices, self.data_root = layout, devices, data_root
        self.processes: list[multiprocessing.Process] = []

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no forked copy of gRPC's threads
        for index, device in enumerate(self.devices):
            process = context.Process(
                target=worker_loop,
                args=(self.layout, f"local-{index}-{device}", self.data_root, device),
                name=f"edgedistill-worker-{index}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _run_on_ray(layout_root: str, job: dict, data_root: str, device: str) -> str:
    return run_job(ServiceLayout(Path(layout_root)), job, data_root, device)


class RayExecutor:
    """Claims jobs while fewer than ``slots`` run; each becomes one Ray task."""

    def __init__(
        self, layout: ServiceLayout, address: str, slots: int, gpus_per_job: float, data_root: str = ""
    ) -> None:
        self.layout, self.address, self.slots, self.gpus = layout, address, slots, gpus_per_job
        self.data_root = data_root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=None if self.address == "local" else self.address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        self._thread = threading.Thread(target=self._dispatch, name="ray-dispatcher", daemon=True)
        self._thread.start()

    def _dispatch(self) -> None:
        import ray

        remote = ray.remote(_run_on_ray).options(num_cpus=1, num_gpus=self.gpus, max_retries=0)
        store, running = JobStore(self.layout.database), []
        device = "cuda" if self.gpus else "cpu"
        while not self._stop.is_set():
            if running:
                _, running = ray.wait(running, num_returns=len(running), timeout=0)
            job = store.claim(f"ray-{self.address}") if len(running) < self.slots else None
            if job is None:
                time.sleep(0.5)
                continue
            running.append(remote.remote(str(self.layout.root), job, self.data_root, device))

    def stop(self) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        ray.shutdown()
