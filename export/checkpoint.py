"""Loading DiT weights: official ``.pt`` checkpoints, train.py's ``{"ema": ...}``, our safetensors,
diffusers folders (export/diffusers_format.py).

Every failure is a ``CheckpointError`` whose message names the file and what does not match.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from freedit.export.dit import OFFICIAL_CONFIGS, DiT, DiTConfig

#: (depth, hidden size) -> heads of the official configs, the only sizes whose head count is known.
OFFICIAL_HEADS = {(c["depth"], c["hidden_size"]): c["num_heads"] for c in OFFICIAL_CONFIGS.values()}

CONFIG_KEY = "freedit_config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the chosen config."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], DiTConfig | None]:
    """The raw state dict of a checkpoint file and, for our safetensors, its embedded config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
        check_tensor_types(state, path)
        if CONFIG_KEY not in meta:
            return state, None
        try:
            return state, DiTConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        except (ValueError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: unreadable '{CONFIG_KEY}' metadata ({str(exc)[:200]})") from None
    try:
        # train.py checkpoints carry an argparse.Namespace; allow it and nothing else executable.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]  # an empty file: EOFError, no text
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): "
                              f"{detail}") from None
    heads = None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        # DiT's train.py: sample with the EMA weights, as sample.py does; its args name the config.
        heads = OFFICIAL_CONFIGS.get(getattr(obj.get("args"), "model", None), {}).get("num_heads")
        obj = obj["ema"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    check_tensor_types(obj, path)
    return obj, (infer_config(obj, num_heads=heads) if heads else None)


def check_tensor_types(state: dict[str, torch.Tensor], path) -> None:
    """DiT weights are floating point; integer or boolean tensors would be cast silently on loading."""
    bad = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items() if not v.is_floating_point()]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{path} holds non-floating-point weights: {', '.join(bad[:3])}{more}; "
                              f"a DiT checkpoint has float32/float16/bfloat16 tensors only")


def infer_config(state: dict[str, torch.Tensor], **overrides) -> DiTConfig:
    """Recover a DiTConfig from tensor shapes (patch, channels, hidden, depth, classes, size)."""
    try:
        hidden, in_ch, patch, _ = state["x_embedder.proj.weight"].shape
        num_patches = state["pos_embed"].shape[1]
        out_dim = state["final_layer.linear.weight"].shape[0]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a DiT state dict: missing {exc.args[0]}") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    # The weights do not record the head count (qkv is [3H, H] for any split): take it from the caller,
    # or from the official config of this depth and width; anything else would be a guess.
    heads = overrides.pop("num_heads", None) or OFFICIAL_HEADS.get((depth, hidden))
    if heads is None:
        raise CheckpointError(f"cannot tell the number of attention heads of a DiT with depth {depth} and hidden "
                              f"size {hidden} (not an official DiT size, and the file does not say): give it "
                              f"(--num-heads), or use a checkpoint that records its config")
    grid = int(round(num_patches**0.5))
    learn_sigma = out_dim == 2 * in_ch * patch * patch
    fields = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                  num_heads=heads, num_classes=rows - 1, class_dropout_prob=0.1, learn_sigma=learn_sigma)
    try:
        return DiTConfig(**{**fields, **overrides})
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def check_state_dict(model: DiT, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming the missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label} {len(items)}: {', '.join(items[:3])}{more}")
    cfg = model.config
    raise CheckpointError(f"{source} does not fit DiT config (depth {cfg.depth}, hidden {cfg.hidden_size}, "
                          f"patch {cfg.patch_size}, input {cfg.input_size}): " + "; ".join(parts))


def load_dit(path: str | Path, config: DiTConfig | None = None, num_heads: int | None = None) -> DiT:
    """A DiT in eval mode with the checkpoint's weights. Without a config: the file's own or inferred
    (``num_heads`` where the file cannot tell). A folder is read as a diffusers DiT
    (export/diffusers_format.py). The config is checked against the tensors' shapes on the meta
    device first, so a config that does not fit (say hidden 65536) never allocates anything."""
    if Path(path).is_dir():
        from freedit.export.diffusers_format import load_diffusers_dit

        return load_diffusers_dit(path, config)
    state, embedded = read_state_dict(path)
    try:
        config = config or embedded or infer_config(state, num_heads=num_heads)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    with torch.device("meta"):
        check_state_dict(DiT(config, initialize=False), state, str(path))
    model = DiT(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_dit(model: DiT, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
    """Our format: safetensors with the config as JSON metadata (written to a temp name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict()), **(extra_metadata or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """A DiT with random weights that exercise every path: DiT's init, then small random values where
    DiT's init puts zeros (adaLN-Zero, final layer), which would otherwise make every output zero."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any():
                param.normal_(std=0.02)
    return model.eval()


def save_official(model: DiT, path: str | Path) -> None:
    """The official checkpoint format (DiT-XL-2-256x256.pt): a bare state dict saved by torch.save."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(model.state_dict(), str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
