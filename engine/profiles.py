"""Optimization profiles: which row counts each engine is built for.

A FREE round verifies L+1 states per sample in one DiT call, each state 2 rows with CFG (cond,
null), so with B samples in flight the DiT sees up to B*(L+1)*2 rows; a plain step (sequential
sampler, first round) sees B*2. The drafter sees one row per sample and CFG row at each window
position; the VAE decoder one row per finished image. One dynamic profile covers 1..max rows;
optional static profiles (min = opt = max) give CUDA graphs a fixed shape to capture.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BuildSettings:
    batch_sizes: tuple[int, ...] = (1, 8)  # samples in flight per micro-batch
    window: int = 8  # FREE's L
    cfg: bool = True  # two rows per state (classifier-free guidance)
    static_batches: tuple[int, ...] = ()  # sample batch sizes that get exact-shape profiles
    targets: tuple[str, ...] = ()  # compute capabilities, e.g. ("80", "89"); () = the builder's default

    def __post_init__(self):
        for name in ("batch_sizes", "static_batches"):
            values = getattr(self, name)
            if any(not isinstance(b, int) or b < 1 for b in values):
                raise ValueError(f"{name.replace('_', ' ')} must be integers >= 1, got {list(values)}")
        if not self.batch_sizes:
            raise ValueError("at least one batch size is needed")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window L must be an integer >= 1, got {self.window!r}")

    @property
    def rows_per_state(self) -> int:
        return 2 if self.cfg else 1

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "BuildSettings":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Profile:
    name: str
    rows: tuple[int, int, int]  # (min, opt, max) batch dimension
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "rows": list(self.rows), "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def row_counts(graph: str, s: BuildSettings, batch: int) -> tuple[int, ...]:
    """Row counts engine ``graph`` is called with for ``batch`` samples (largest last)."""
    k = s.rows_per_state
    if graph == "dit":
        return (batch * k, batch * (s.window + 1) * k)
    if graph == "drafter":
        return (batch * k,)
    if graph == "vae_decoder":
        return (batch,)
    raise ValueError(f"unknown graph {graph!r}")


def profiles_for(graph: str, s: BuildSettings, input_shapes: dict[str, tuple[int, ...]]) -> list[Profile]:
    """``input_shapes``: each input's shape without the batch dimension (from the ONNX graph)."""
    biggest = max(s.batch_sizes)
    top = max(row_counts(graph, s, biggest))
    opt = row_counts(graph, s, biggest)[-1]
    wanted = [("dynamic", (1, opt, top))]
    statics = sorted({rows for b in s.static_batches for rows in row_counts(graph, s, b)})
    wanted += [(f"static-{rows}", (rows, rows, rows)) for rows in statics]
    return [Profile(name, rows, {n: tuple((r, *shape) for r in rows) for n, shape in input_shapes.items()})
            for name, rows in wanted]
