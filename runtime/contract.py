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
DECODER_METADATA_KEY = "freedit.vae"  # the vae_decoder's shapes and latent scale (DecoderInfo), JSON


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
    # Latent models: DiT latents (unscaled, as the sampler ends) -> RGB in [-1, 1]; 1/scaling factor is in the graph.
    "vae_decoder": ((TensorSpec("latent", "tensor(float)", 4),), (TensorSpec("image", "tensor(float)", 4),)),
}

#: Inputs a graph may have on top of its contract; the runtime feeds them only where present.
#: ``t_feat``: the original timestep of the drafter's input features (its parent state's), so one
#: drafter can serve every respacing. Drafters exported before it existed have no such input.
OPTIONAL_INPUTS: dict[str, tuple[TensorSpec, ...]] = {
    "drafter": (TensorSpec("t_feat", "tensor(float)", 1),),
}


#: The fixed variance of a DiT without learned sigma: "large" (log beta, with the posterior variance
#: at the last step) is what facebookresearch/DiT's create_diffusion(learn_sigma=False) samples with;
#: "small" is the clipped posterior variance (log beta tilde). Graphs exported before this field existed
#: carry none and get DiT's default.
FIXED_VARIANCES = ("large", "small")
DEFAULT_FIXED_VARIANCE = "large"
CFG_MODES = ("reference", "all")
#: Relax's score u per draft (DESIGN §3.4): "gap", the distance between the draft's and the DiT's
#: transition means in the DiT's standard deviations (what the exact test's acceptance falls with);
#: "variance", where the DiT's learned variance sits in the schedule's range (the first rule).
RELAX_SCORES = ("gap", "variance")
#: How a round's drafts are verified (DESIGN §3.3): "step", position by position up to the first
#: rejection; "block", the whole window jointly (Sun et al. 2024; for diffusions Soen et al. 2026),
#: which commits at least as many drafts in expectation and is as exact.
VERIFIERS = ("step", "block")
#: Where a guided draft's guidance comes from (DESIGN §3.1): "parent", the gap between the conditional
#: and the null output of the last verified state, with only the conditional row drafted (half the
#: drafter rows; under strong guidance it tracks the DiT better than drafting both rows, whose errors
#: the scale amplifies); "drafter", both rows drafted.
DRAFT_GUIDANCE = ("parent", "drafter")
#: Bounds of the metadata's integers: generous for any DiT, small enough to refuse nonsense before
#: anything is sized from them.
INFO_BOUNDS = {"input_size": (1, 4096), "in_channels": (1, 256), "patch_size": (1, 256), "hidden_size": (1, 65536),
               "num_classes": (1, 1_000_000)}


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
    fixed_variance: str = DEFAULT_FIXED_VARIANCE  # used only when learn_sigma is False

    def __post_init__(self):
        for name, (lo, hi) in INFO_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ContractError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ContractError(f"learn_sigma must be true or false, got {self.learn_sigma!r}")
        if self.cfg_mode not in CFG_MODES:
            raise ContractError(f"cfg_mode must be one of {', '.join(CFG_MODES)}, got {self.cfg_mode!r}")
        if self.fixed_variance not in FIXED_VARIANCES:
            raise ContractError(f"fixed_variance must be one of {', '.join(FIXED_VARIANCES)}, "
                                f"got {self.fixed_variance!r}")
        if self.input_size % self.patch_size:
            raise ContractError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")

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
        """From the ``freedit.config`` metadata; ContractError naming a missing, mistyped or out-of-range field."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError, TypeError) as exc:
            raise ContractError(f"not valid JSON ({str(exc)[:100]})") from None
        if not isinstance(data, dict):
            raise ContractError(f"expected a JSON object, got {type(data).__name__}")
        optional = {"fixed_variance"}
        missing = [k for k in cls.__dataclass_fields__ if k not in data and k not in optional]
        if missing:
            raise ContractError(f"missing {', '.join(missing)}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class DecoderInfo:
    """What the runtime needs to know about a `vae_decoder`: read from its metadata."""

    latent_channels: int
    latent_size: int
    image_size: int
    scaling_factor: float

    @classmethod
    def from_json(cls, text: str, source: str) -> "DecoderInfo":
        try:
            data = json.loads(text)
            info = cls(int(data["latent_channels"]), int(data["latent_size"]), int(data["image_size"]),
                       float(data["scaling_factor"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ContractError(f"{source}: unreadable '{DECODER_METADATA_KEY}' metadata ({exc}); re-export it with "
                                f"`freedit export --vae ...`") from None
        return info


def onnx_files(onnx_path) -> list:
    """The .onnx file and the external data files it refers to (sorted): what moves and is checksummed
    as one graph. Reads only the graph (needs the `onnx` package, as export and build do)."""
    from pathlib import Path

    onnx_path = Path(onnx_path)
    model = load_graph(onnx_path)
    data = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    outside = [d for d in data if Path(d).is_absolute() or ".." in Path(d).parts]
    if outside:  # a graph's weights live beside it; a location outside its folder is refused
        raise ContractError(f"{onnx_path} refers to external data outside its folder: {', '.join(outside[:3])}")
    return [onnx_path, *(onnx_path.parent / d for d in data)]


def load_graph(onnx_path):
    """The graph without its weights; ContractError for a file that is not ONNX (truncated, corrupted)."""
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ContractError(f"{onnx_path} is not a readable ONNX file (truncated or corrupted?): {detail}") from None


def onnx_metadata(onnx_path) -> dict[str, str]:
    """The freedit metadata of a graph (config, contract, precision), without loading its weights."""
    return {p.key: p.value for p in load_graph(onnx_path).metadata_props}


def input_names(kind: str, present) -> tuple[str, ...]:
    """The inputs the runtime feeds a ``kind`` graph: its contract's, plus the optional ones in ``present``."""
    want = [spec.name for spec in CONTRACTS[kind][0]]
    return tuple(want + [spec.name for spec in OPTIONAL_INPUTS.get(kind, ()) if spec.name in set(present)])


def _describe(arg) -> TensorSpec:
    return TensorSpec(arg.name, arg.type, len(arg.shape))


def expected_dims(kind: str, info: ModelInfo) -> dict[str, tuple]:
    """Every tensor's dimensions after the batch (None: not fixed by the contract)."""
    s, tokens = info.input_size, (info.num_tokens, info.hidden_size)
    state, out = (info.in_channels, s, s), (info.out_channels, s, s)
    if kind == "dit":
        return {"x": state, "t": (), "y": (), "eps_v": out, "feat": tokens}
    if kind == "drafter":
        return {"feat": tokens, "x": state, "t": (), "y": (), "draft_feat": tokens, "eps_v": out}
    return {"latent": state, "image": (3, None, None)}


def _check_dims(kind: str, info: ModelInfo, args, source: str) -> None:
    """Batch dimension dynamic, the others as the metadata says (a symbolic one is accepted)."""
    want = expected_dims(kind, info)
    for arg in args:
        if arg.name not in want or not arg.shape:
            continue
        batch, *rest = arg.shape
        if isinstance(batch, int):
            raise ContractError(f"{source}: {arg.name!r} has a fixed batch dimension {batch}; the runtime needs a "
                                f"dynamic one - re-export it with `freedit export`")
        fixed = tuple(d if isinstance(d, int) else None for d in rest)
        if any(f is not None and w is not None and f != w for f, w in zip(fixed, want[arg.name])):
            shown = "x".join("?" if d is None else str(d) for d in fixed)
            need = "x".join("?" if d is None else str(d) for d in want[arg.name])
            raise ContractError(f"{source}: {arg.name!r} is [batch, {shown}], its metadata ({CONFIG_METADATA_KEY}) "
                                f"needs [batch, {need}] - re-export it with `freedit export`")


def check_session(kind: str, session, source: str) -> ModelInfo | DecoderInfo:
    """Check an onnxruntime InferenceSession against contract ``kind``; return the model (or decoder) info."""
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
    if kind == "vae_decoder":  # no DiT config: the decoder describes its own shapes
        if DECODER_METADATA_KEY not in meta:
            raise ContractError(f"{source}: no '{DECODER_METADATA_KEY}' metadata; re-export it with `freedit export --vae ...`")
        return DecoderInfo.from_json(meta[DECODER_METADATA_KEY], source)
    if CONFIG_METADATA_KEY not in meta:
        raise ContractError(f"{source}: no '{CONFIG_METADATA_KEY}' metadata; export it with `freedit export`")
    try:
        info = ModelInfo.from_json(meta[CONFIG_METADATA_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(f"{source}: unreadable '{CONFIG_METADATA_KEY}' metadata ({exc})") from None
    _check_dims(kind, info, [*session.get_inputs(), *session.get_outputs()], source)
    return info
