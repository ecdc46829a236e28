"""Typed values from text: command-line flags, Flower run-config strings, ``NAME=VALUE`` options."""

from __future__ import annotations

from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")


def from_text(kind: type, value: Any) -> Any:
    """``value`` as ``kind`` (the type of a dataclass field's default); non-text values pass through ``kind``.

    Raises ValueError when the text does not parse; callers turn it into a one-line ConfigError.
    """
    if isinstance(value, str) and kind is bool:
        return value.strip().lower() in TRUE_WORDS
    return kind(value)
