"""The ONNX contracts between export and runtime: tensor names, ranks, dtypes and metadata.

A graph that does not match is refused with a ContractError naming the difference, before any
sampling starts. The model config travels inside the ONNX file as metadata (``freedit.config``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

CONFIG_METADATA_KEY = "freedit.config"
CONTRACT_METADATA_KEY = "freedit.contract"
PRECISION_METADATA_KEY = "freedit.precision"  # fp32/fp16/bf16 inside; the I/O below is fp32 always


class ContractError(ValueError):
    """A model file that does not match the contract the runtime expects."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # onnxruntime's spelling, e.g. "tensor(float)"
    rank: int


CONTRACTS: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "dit": (
        (TensorSpec("x", "tensor(float)", 4), TensorSpec("t", "tensor(float)", 1), TensorSpec("y", "tensor(int64)", 1)),
        (TensorSpec("eps_v", "tensor(float)", 4), TensorSpec("feat", "tensor(float)", 3)),
    ),
    "drafter": (
        (TensorSpec("feat", "tensor(float)", 3), TensorSpec("x", "tensor(float)", 4),
         TensorSpec("t", "tensor(float)", 1), TensorSpec("y", "tensor(int64)", 1)),
        # ONNX value names are unique within a graph, so the drafted features cannot reuse "feat".
        (TensorSpec("draft_feat", "tensor(float)", 3), TensorSpec("eps_v", "tensor(float)", 4)),
    ),
    # Latent models: DiT latents (unscaled, as the sampler ends) -> RGB in [-1, 1]; 1/0.18215 is in the graph.
    "vae_decoder": ((TensorSpec("latent", "tensor(float)", 4),), (TensorSpec("image", "tensor(float)", 4),)),
}

#: Inputs a graph may have on top of its contract; the runtime feeds them only where present.
#: ``t_feat``: the original timestep of the drafter's input features (its parent state's), so one
#: drafter can serve every respacing. Drafters exported before it existed have no such input.
OPTIONAL_INPUTS: dict[str, tuple[TensorSpec, ...]] = {
    "drafter": (TensorSpec("t_feat", "tensor(float)", 1),),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a DiT: read from the ONNX metadata."""

    input_size: int
    in_channels: int
    patch_size: int
    hidden_size: int
    num_classes: int
    learn_sigma: bool
    cfg_mode: str

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def null_label(self) -> int:
        return self.num_classes

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def onnx_files(onnx_path) -> list:
    """The .onnx file and the external data files it refers to (sorted): what moves and is checksummed
    as one graph. Reads only the graph (needs the `onnx` package, as export and build do)."""
    import onnx
    from pathlib import Path

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    data = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return [onnx_path, *(onnx_path.parent / d for d in data)]


def onnx_metadata(onnx_path) -> dict[str, str]:
    """The freedit metadata of a graph (config, contract, precision), without loading its weights."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def input_names(kind: str, present) -> tuple[str, ...]:
    """The inputs the runtime feeds a ``kind`` graph: its contract's, plus the optional ones in ``present``."""
    want = [spec.name for spec in CONTRACTS[kind][0]]
    return tuple(want + [spec.name for spec in OPTIONAL_INPUTS.get(kind, ()) if spec.name in set(present)])


def _describe(arg) -> TensorSpec:
    return TensorSpec(arg.name, arg.type, len(arg.shape))


def check_session(kind: str, session, source: str) -> ModelInfo:
    """Check an onnxruntime InferenceSession against contract ``kind``; return the model info."""
    if kind not in CONTRACTS:
        raise ContractError(f"unknown contract {kind!r}; known: {', '.join(CONTRACTS)}")
    want_in, want_out = CONTRACTS[kind]
    optional = OPTIONAL_INPUTS.get(kind, ())
    for role, want, got in (("input", want_in, session.get_inputs()), ("output", want_out, session.get_outputs())):
        have = {a.name: _describe(a) for a in got}
        for spec in want + (optional if role == "input" else ()):
            if spec.name not in have:
                if spec in optional:
                    continue
                raise ContractError(f"{source}: no {role} named {spec.name!r} (has {', '.join(have) or 'none'}); "
                                    f"it is not a freedit '{kind}' model - re-export it with `freedit export`")
            if have[spec.name] != spec:
                h = have[spec.name]
                raise ContractError(f"{source}: {role} {spec.name!r} is {h.dtype} of rank {h.rank}, the '{kind}' "
                                    f"contract needs {spec.dtype} of rank {spec.rank} - re-export it with `freedit export`")
        if role == "input":
            unknown = sorted(set(have) - {spec.name for spec in want + optional})
            if unknown:
                raise ContractError(f"{source}: input(s) {', '.join(map(repr, unknown))} are not in the '{kind}' "
                                    f"contract, so the runtime cannot feed them - re-export it with `freedit export`")
    meta = session.get_modelmeta().custom_metadata_map
    if CONFIG_METADATA_KEY not in meta:
        raise ContractError(f"{source}: no '{CONFIG_METADATA_KEY}' metadata; export it with `freedit export`")
    try:
        info = ModelInfo.from_json(meta[CONFIG_METADATA_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(f"{source}: unreadable '{CONFIG_METADATA_KEY}' metadata ({exc})") from None
    return info
