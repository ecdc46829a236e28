"""The reply contract between an edge device and the server: which records, keys and types.

The ClientApp builds its replies from these names and the server's screening
(:mod:`server.federation.strategy`) accepts exactly them, so the two sides cannot drift apart.
A device's reply to a ``train`` message holds:

- ``arrays`` (ArrayRecord): the locally trained model, with the global model's array names,
  shapes and dtypes;
- ``metrics`` (MetricRecord): ``train-loss`` and ``train-accuracy`` (floats) and
  ``num-examples`` (an int: how many private images it trained on);
- ``diversity`` (MetricRecord, only when the server asked for class statistics): see
  :mod:`common.diversity`.

A reply to an ``evaluate`` message holds only ``metrics``: ``eval-loss`` and ``eval-accuracy``
(floats) and ``num-examples`` (an int).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

ARRAYS = "arrays"
METRICS = "metrics"
EXAMPLES = "num-examples"
TRAIN_METRICS = ("train-loss", "train-accuracy")
EVAL_METRICS = ("eval-loss", "eval-accuracy")
MAX_EXAMPLES = 2**40  # a larger claim is not a device's dataset: the reply is dropped


def parse_metrics(record: Mapping, floats: tuple[str, ...]) -> dict[str, float | int]:
    """A reply's ``metrics`` as plain Python numbers; ``ValueError`` says what breaks the contract.

    Exactly the keys ``floats`` + ``num-examples``; the floats finite (an int is accepted as a
    float), accuracies in [0, 1], losses >= 0; ``num-examples`` an int in 1..MAX_EXAMPLES.
    """
    keys = set(record.keys())
    expected = {*floats, EXAMPLES}
    if keys != expected:
        raise ValueError(f"metric keys {sorted(keys)}, expected {sorted(expected)}")
    examples = record[EXAMPLES]
    if isinstance(examples, bool) or not isinstance(examples, int):
        raise ValueError(f"{EXAMPLES} must be an int, got {type(examples).__name__}")
    if not 1 <= examples <= MAX_EXAMPLES:
        raise ValueError(f"{EXAMPLES} {examples} is outside 1..{MAX_EXAMPLES}")
    parsed: dict[str, float | int] = {EXAMPLES: examples}
    for key in floats:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {key!r} must be a finite number, got {value!r}")
        if key.endswith("accuracy") and not 0.0 <= value <= 1.0:
            raise ValueError(f"metric {key!r} {value} is outside [0, 1]")
        if key.endswith("loss") and value < 0:
            raise ValueError(f"metric {key!r} {value} is negative")
        parsed[key] = float(value)
    return parsed
