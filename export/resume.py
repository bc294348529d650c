"""Training resume state (``state.pt``): saved atomically, loaded without running any pickled code.

``torch.load(..., weights_only=True)`` only rebuilds tensors, dicts, lists, tuples, strings and
numbers, which is all a resume state holds (weights, optimizer state, generator state, step, log).
A file that needs anything else (a crafted pickle that would call a function) is refused, and so is
a file that loads but is not the state this trainer wrote; both in one line (exit 2 on the CLI).
"""
from __future__ import annotations

from pathlib import Path

import torch

from freedit.errors import FreeditError


class ResumeError(FreeditError):
    """A resume state that cannot be used: not a state file, unsafe, or written by another trainer."""


def save_state(path: str | Path, state: dict) -> None:
    """Write through a temporary name, so an interrupted save keeps the previous state."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: str | Path, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """The state at ``path``, checked to hold ``fields`` (name -> expected type); ResumeError otherwise."""
    path = Path(path)
    hint = "delete it (or choose another --out) to start afresh"
    if not path.is_file():
        raise ResumeError(f"resume state {path} is not a regular file; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, others for truncated or foreign files
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ResumeError(f"refusing resume state {path}: not a plain weights-only training state ({detail}); "
                          f"{hint}") from None
    if not isinstance(state, dict):
        raise ResumeError(f"resume state {path} holds a {type(state).__name__}, not a training state; {hint}")
    missing = [k for k in fields if k not in state]
    wrong = [f"{k} is {type(state[k]).__name__}" for k, want in fields.items()
             if k in state and not isinstance(state[k], want)]
    if missing or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
        raise ResumeError(f"resume state {path} was not written by this trainer ({'; '.join(parts)}); {hint}")
    return state


def restore(path: str | Path, what: str, load) -> None:
    """Run ``load()`` (load_state_dict calls); a state that does not fit the model is one ResumeError line."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ResumeError(f"resume state {path} does not fit this {what} ({detail}); delete it (or choose another "
                          f"--out) to start afresh") from None
