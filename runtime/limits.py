"""Bounds of every size a call may ask for, and the checks that enforce them (no imports: the CLI
reads them while building its --help, before numpy or a model is loaded).

Values outside a bound are refused before any work with one line saying what was expected. The
bounds are generous for real use; memory is checked separately (runtime/budget.py).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

MAX_IMAGES = 1_000_000  # class labels (images) per call
MAX_BATCH_SIZE = 65_536  # samples in flight per model call
MAX_WINDOW = 64  # FREE's draft window L
MAX_CFG_SCALE = 100.0  # finite, yet far beyond useful guidance (float32 overflows long before 1e39)
MAX_RELAX = 1e6  # free-relax lambda
MAX_THREADS = 256  # CPU threads of a backend (ONNX Runtime crashes on absurd counts)
MAX_SCALE = 64  # nearest-neighbour upscaling of written images
MAX_PIPELINE_JSON_BYTES = 1 << 20


def is_int(value) -> bool:
    """A Python or numpy integer; bools (Python or numpy) are not."""
    return isinstance(value, Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_number(value) -> bool:
    """A Python or numpy real number; bools and strings are not."""
    return isinstance(value, Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_int(what: str, value, lo: int, hi: int) -> int:
    """An integer in [lo, hi], or a ValueError saying what was expected."""
    if not is_int(value) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer >= {lo} and <= {hi:,}, got {value!r}")
    return int(value)


def check_number(what: str, value, lo: float, hi: float, note: str = "") -> float:
    """A finite real number in [lo, hi], or a ValueError saying what was expected."""
    if not is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{what} must be >= {lo:g} and <= {hi:g}{note}, got {value!r}")
    return float(value)
