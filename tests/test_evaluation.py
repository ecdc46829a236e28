import pytest
import torch

from common.errors import ConfigError
from common.evaluation import PRESETS, EvalConfig, evaluate_set
from server.methods.registry import distill, make_task


def test_presets_follow_the_protocol():
    paper, quick = PRESETS["paper"], PRESETS["quick"]
    assert (paper.epochs, paper.lr, paper.momentum, paper.weight_decay, paper.batch_size) == (
        1000,
        0.01,
        0.9,
        5e-4,
        256,
    )
    assert quick.epochs == 300 and paper.dsa and paper.lr_decay_at == 0.5
    with pytest.raises(ConfigError):
        EvalConfig(epochs=0)


def test_training_on_ten_digits_per_class_beats_chance_and_is_seeded(digits):
    chosen = distill("random", make_task(digits, 10, seed=0, progress=False))
    config = EvalConfig(epochs=150)
    a = evaluate_set(
        chosen.images, chosen.labels, digits.test, digits.info, runs=2, config=config, seed=5, workers=1, progress=False
    )
    b = evaluate_set(
        chosen.images, chosen.labels, digits.test, digits.info, runs=2, config=config, seed=5, workers=1, progress=False
    )
    assert len(a.accuracies) == 2 and a.accuracies == b.accuracies
    assert a.mean > 0.7  # chance is 0.1
    assert a.accuracies[0] != a.accuracies[1]  # runs use different seeds
    assert a.to_dict()["config"]["dsa_strategy"] == "color_crop_cutout_scale_rotate"  # no flips for digits


def test_parallel_workers_give_the_protocol_result(digits):
    chosen = distill("random", make_task(digits, 2, seed=0, progress=False))
    result = evaluate_set(
        chosen.images,
        chosen.labels,
        digits.test,
        digits.info,
        runs=2,
        config=EvalConfig(epochs=10),
        workers=2,
        progress=False,
    )
    assert len(result.accuracies) == 2 and all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert result.std >= 0 and torch.isfinite(torch.tensor(result.mean))


WORKER_PARENT = """
import sys, time
from common.datasets import load_dataset
from common.evaluation import EvalConfig, evaluate_set
data = load_dataset("digits")
print("started", flush=True)
evaluate_set(data.train.images[:50], data.train.labels[:50], data.test, data.info, runs=2, workers=2,
             config=EvalConfig(epochs=100000), device="cpu", progress=False)
"""


def _children(pid: int) -> set[int]:
    from pathlib import Path

    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found.update(int(p) for p in text.split())
    return found


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_evaluation_workers_exit_when_their_parent_is_killed():
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    parent = subprocess.Popen([sys.executable, "-c", WORKER_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        workers: set[int] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            workers = {p for p in _children(parent.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()}
            time.sleep(0.5)
        assert len(workers) == 2
        time.sleep(2)  # let the workers run their initializer
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.5)
        assert not any(_alive(p) for p in workers), "evaluation workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
