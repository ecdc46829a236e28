"""Named crash points for kill-and-resume tests: the whole job is SIGKILLed where a test asks.

``EDGEDISTILL_FAULT="POINT[:DETAIL][@N]"`` kills the process group (``edgedistill simulate``, its
SuperLink, the ServerApp's process, Ray's workers: a crash of the machine, as the job sees it) the
N-th time (default 1) one process reaches :func:`fault_point` with that name (and detail).
Unset, a point costs one dictionary lookup. Points: ``round-start`` (devices about to train),
``aggregation`` (replies screened, before aggregating), ``atomic-write:FILE`` (temp file
written, not yet renamed), ``dir-swap:DIR`` (old directory moved away, new one not yet in place),
``distillation`` (inside a server distillation round), and on a device ``client-train:ROUND``
(the ClientApp's train, in that global round).
tests/test_resume.py kills a real federation at each and checks the resumed run.

``EDGEDISTILL_FAULT_RAISE="POINT[:DETAIL]"`` raises a RuntimeError there instead, every time: a
device that fails a round (its reply becomes an error reply).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "EDGEDISTILL_FAULT"
RAISE_ENV = "EDGEDISTILL_FAULT_RAISE"
_hits: Counter[str] = Counter()


def fault_point(name: str, detail: str = "") -> None:
    if os.environ.get(RAISE_ENV) in (name, f"{name}:{detail}"):
        raise RuntimeError(f"injected fault at {name} {detail}".strip())
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    point, _, wanted_detail = target.partition(":")
    if point != name or (wanted_detail and wanted_detail != detail):
        return
    _hits[target] += 1
    if _hits[target] == int(nth or 1):
        os.killpg(os.getpgrp(), signal.SIGKILL)
