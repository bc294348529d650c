"""Memory a request will need, estimated before any work, against what this process may still get.

The estimates are deliberately coarse upper bounds (states, per-sample statistics, one batched
model call's activations, the written images): they exist to refuse work that cannot fit (a grid of
terabytes, a million images of statistics) in one line up front, not to predict the peak exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

#: Python objects per sample and step in the statistics (decisions, drafted/accepted lists).
STATS_BYTES_PER_STEP = 128
#: Interpreter, libraries and model weights are already resident; this covers allocator slack.
SLACK_BYTES = 256 * 2**20


class MemoryBudgetError(ValueError):
    """A request whose estimated memory exceeds what this machine (or this process's limits) has."""


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), where one is set."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split(":", 2)[2]
        folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """The least of: the machine's MemAvailable, this cgroup's room, and this process's address-space
    limit (RLIMIT_AS) minus what it already maps. None when none of them can be read."""
    room = [_meminfo("MemAvailable")]
    if room[0] is None and hasattr(os, "sysconf"):
        try:
            room[0] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    room.append(_cgroup_room())
    if resource is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            room.append(soft - _own_vm_bytes())
    known = [r for r in room if r is not None]
    return max(0, min(known)) if known else None


def check_fits(need: int, what: str) -> None:
    """Raise MemoryBudgetError when ``need`` bytes (plus slack) exceed what is available."""
    have = available_bytes()
    if have is not None and need + SLACK_BYTES > have:
        raise MemoryBudgetError(f"{what} needs about {gib(need)} of memory, this machine has about {gib(have)} "
                                f"available; ask for fewer images, a smaller batch or scale")


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def sampling_bytes(info, images: int, steps: int, batch_size: int, window: int, guided: bool,
                   activations_on_host: bool = True) -> int:
    """Host memory of a call: states and statistics of every image, plus one batched call of the widest
    kind (a FREE verify: batch * (window + 1) states, two rows each with guidance), its inputs, outputs
    and features, and its activations when the model runs on the CPU (on a GPU they live there)."""
    chw = info.in_channels * info.input_size ** 2
    tokens, hidden = info.num_tokens, info.hidden_size
    per_image = 4 * chw * 6 + steps * STATS_BYTES_PER_STEP
    rows = min(images, batch_size) * (window + 1) * (2 if guided else 1)
    per_row = 4 * (4 * chw + 2 * tokens * hidden)
    if activations_on_host:  # ~10 more hidden-wide tensors (qkv, MLP 4x, residuals) and attention scores
        per_row += 4 * (10 * tokens * hidden + 16 * tokens * tokens)
    return images * per_image + rows * per_row


def image_output_bytes(images: int, height: int, width: int, channels: int, scale: int, per_sample: bool) -> int:
    """The uint8 images, the upscaled copies, the grid and its PNG; the per-sample PNGs when written."""
    scaled = images * (height * scale + 1) * (width * scale + 1) * channels
    return images * height * width * channels + 3 * scaled + (2 * scaled if per_sample else 0)
