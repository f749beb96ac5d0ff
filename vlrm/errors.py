"""Errors a user can cause and fix; the CLI turns them into a short message and exit 2.
Also the type checks that config values share."""

import math
from typing import Any


def is_real(value: Any) -> bool:
    """An int or float, not a bool (YAML's true/false) and not null; NaN and inf pass."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
    """``is_real`` and neither NaN nor infinite."""
    return is_real(value) and math.isfinite(value)


class ConfigError(ValueError):
    """A configuration value, file or folder is wrong; the message says which and why."""


class TrainingError(RuntimeError):
    """A run cannot go on (e.g. out of memory, non-finite updates); the message says what to
    change. The last checkpoint is intact; the CLI prints the message and exits 1."""
