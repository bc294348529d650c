"""DiT weights in the diffusers layout: a pipeline folder (``transformer/``, ``vae/``, ``scheduler/``,
as ``facebook/DiT-XL-2-256`` is laid out) or its ``transformer/`` folder alone.

diffusers stores a DiT as ``DiTTransformer2DModel``; older folders say ``Transformer2DModel`` with
``norm_type: ada_norm_zero``, which diffusers remaps to the same class. Its weights map one to one
onto freedit's DiT (whose names are DiT's own), with three differences handled here:

- q, k and v are three Linears; DiT has one ``qkv`` Linear: they are stacked in that order.
- Every block holds its own copy of the timestep and label embedders (diffusers' conversion copies
  DiT's single embedder into each). freedit keeps one and refuses copies that differ.
- diffusers' timestep sinusoid divides the frequencies by 127 rather than 128, and its MLP LayerNorm
  uses ``norm_eps`` (1e-5, not 1e-6). The DiTConfig records both, so freedit computes what
  diffusers computes for the folder (tests/test_diffusers_format.py checks it against diffusers).

Reading needs neither diffusers nor a network: config.json and safetensors are read directly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from freedit.export.checkpoint import CheckpointError
from freedit.export.dit import DiT, DiTConfig, sincos_pos_embed_2d

DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
#: Config keys that fix the DiT's shape; diffusers fills absent ones from class defaults, freedit refuses to guess.
REQUIRED_KEYS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                 "sample_size", "patch_size", "num_embeds_ada_norm")
#: DiTTransformer2DModel's defaults for the keys that change the computation (diffusers builds that class
#: for both names, so absent keys take these values there too).
DIT_DEFAULTS = {"activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False,
                "norm_eps": 1e-5, "norm_type": "ada_norm_zero", "cross_attention_dim": None}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")
_EMBEDDER = "norm1.emb."
#: What --config / the exported graph's config may pin down; the rest follows the folder.
SHAPE_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                "learn_sigma")  # per-block copy of the timestep + label embedders


def transformer_folder(path: str | Path) -> Path | None:
    """The folder holding the DiT's config.json: ``path/transformer`` or ``path`` itself; None if neither."""
    path = Path(path)
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    return None


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (transformer_folder(path) is not None or (path / "model_index.json").is_file())


def vae_folder(path: str | Path) -> Path | None:
    """The pipeline's ``vae/`` folder, if it has one."""
    folder = Path(path) / "vae"
    return folder if (folder / "config.json").is_file() else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_config(path: str | Path) -> DiTConfig:
    """The DiTConfig a diffusers transformer config.json describes; CheckpointError naming what does not fit."""
    path = Path(path)
    folder = transformer_folder(path)
    if folder is None:
        others = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file()) if path.is_dir() else []
        raise CheckpointError(f"{path} has no transformer/config.json" +
                              (f" (it has {', '.join(others)}/: not a DiT pipeline)" if others else ""))
    source = folder / "config.json"
    raw = _read_json(source)
    cls = raw.get("_class_name")
    if cls not in DIT_CLASSES:
        raise CheckpointError(f"{source}: _class_name {cls!r} is not a DiT (freedit reads "
                              f"{' or '.join(DIT_CLASSES)} with norm_type 'ada_norm_zero')")
    if cls == "Transformer2DModel" and raw.get("norm_type") != "ada_norm_zero":
        raise CheckpointError(f"{source}: a Transformer2DModel with norm_type {raw.get('norm_type')!r} is not a DiT "
                              f"(DiT's is 'ada_norm_zero')")
    missing = [k for k in REQUIRED_KEYS if raw.get(k) is None]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}: cannot tell the DiT's shape")
    bad = [k for k in REQUIRED_KEYS if isinstance(raw[k], bool) or not isinstance(raw[k], int) or raw[k] < 1]
    if bad:
        raise CheckpointError(f"{source}: {', '.join(f'{k} {raw[k]!r}' for k in bad)} must be positive integers")
    cfg = {**DIT_DEFAULTS, **{k: v for k, v in raw.items() if k in DIT_DEFAULTS and v is not None}}
    unsupported = {"norm_type": ("ada_norm_zero",), "activation_fn": ("gelu-approximate",), "attention_bias": (True,),
                   "norm_elementwise_affine": (False,), "cross_attention_dim": (None,)}
    for key, allowed in unsupported.items():
        if cfg[key] not in allowed:
            raise CheckpointError(f"{source}: {key} {cfg[key]!r} is not DiT's ({allowed[0]!r}); freedit's DiT has "
                                  f"no such variant")
    if not isinstance(cfg["norm_eps"], (int, float)) or not 0 < cfg["norm_eps"] < 1:
        raise CheckpointError(f"{source}: norm_eps {cfg['norm_eps']!r} is not a small positive number")
    c_in, c_out = raw["in_channels"], raw["out_channels"]
    if c_out not in (c_in, 2 * c_in):
        raise CheckpointError(f"{source}: out_channels {c_out} is neither in_channels {c_in} (fixed variance) "
                              f"nor 2 x {c_in} (learned sigma)")
    if raw["sample_size"] % raw["patch_size"]:
        raise CheckpointError(f"{source}: sample_size {raw['sample_size']} is not a multiple of patch_size "
                              f"{raw['patch_size']}")
    return DiTConfig(input_size=raw["sample_size"], patch_size=raw["patch_size"], in_channels=c_in,
                     hidden_size=raw["num_attention_heads"] * raw["attention_head_dim"], depth=raw["num_layers"],
                     num_heads=raw["num_attention_heads"], mlp_ratio=4.0, class_dropout_prob=0.1,
                     num_classes=raw["num_embeds_ada_norm"], learn_sigma=c_out == 2 * c_in, cfg_mode="reference",
                     timestep_freq_shift=1, mlp_norm_eps=float(cfg["norm_eps"]))


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The transformer's tensors (fp32) from safetensors (one file or shards) or a .bin; and the file read."""
    from safetensors import safe_open

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        if not files or not all(f.is_file() for f in files):
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(s for s in shards if not (folder / s).is_file()) or 'none listed'}")
    else:
        found = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
        if not found:
            raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
        files = found[:1]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".bin":
            try:
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
            except Exception as exc:
                raise CheckpointError(f"{f} is not a readable PyTorch state dict ({str(exc).splitlines()[0][:200]})") from None
            continue
        try:
            with safe_open(str(f), framework="pt") as handle:
                state.update({k: handle.get_tensor(k) for k in handle.keys()})
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc})") from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{files[0]} does not hold a state dict of tensors")
    return {k: v.float() for k, v in state.items()}, files[0]


def key_map(config: DiTConfig) -> dict[str, list[str]]:
    """freedit key -> the diffusers keys it is made of (several: stacked along dim 0)."""
    emb = "transformer_blocks.0." + _EMBEDDER
    pairs = {"x_embedder.proj": ["pos_embed.proj"], "t_embedder.mlp.0": [emb + "timestep_embedder.linear_1"],
             "t_embedder.mlp.2": [emb + "timestep_embedder.linear_2"],
             "final_layer.adaLN_modulation.1": ["proj_out_1"], "final_layer.linear": ["proj_out_2"]}
    for i in range(config.depth):
        d = f"transformer_blocks.{i}."
        pairs.update({f"blocks.{i}.adaLN_modulation.1": [d + "norm1.linear"],
                      f"blocks.{i}.attn.qkv": [d + f"attn1.to_{p}" for p in "qkv"],
                      f"blocks.{i}.attn.proj": [d + "attn1.to_out.0"],
                      f"blocks.{i}.mlp.fc1": [d + "ff.net.0.proj"], f"blocks.{i}.mlp.fc2": [d + "ff.net.2"]})
    mapping = {f"{k}.{p}": [f"{s}.{p}" for s in v] for k, v in pairs.items() for p in ("weight", "bias")}
    mapping["y_embedder.embedding_table.weight"] = [emb + "class_embedder.embedding_table.weight"]
    return mapping


def _limited(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{label} {len(items)}: {', '.join(items[:3])}{more}"


def map_state_dict(state: dict[str, torch.Tensor], model: DiT, source: str) -> dict[str, torch.Tensor]:
    """diffusers tensors -> freedit's state dict for ``model``; CheckpointError naming (in diffusers' names)
    every missing, unexpected and mis-shaped tensor, and any per-block embedder copy that differs."""
    expected = model.state_dict()
    mapping = key_map(model.config)
    want: dict[str, tuple[int, ...]] = {}
    for ours, theirs in mapping.items():
        shape = tuple(expected[ours].shape)
        for key in theirs:
            want[key] = (shape[0] // len(theirs), *shape[1:])
    copies = {k: "transformer_blocks.0." + _EMBEDDER + k.split(_EMBEDDER, 1)[1]
              for k in state if k.startswith("transformer_blocks.") and _EMBEDDER in k and not k.startswith("transformer_blocks.0.")}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want and k not in copies and k != "pos_embed.pos_embed"]
    unexpected += [k for k, first in copies.items() if first not in want]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {s}" for k, s in want.items()
              if k in state and tuple(state[k].shape) != s]
    if missing or unexpected or shapes:
        parts = [_limited(label, items) for label, items in (("missing", missing), ("unexpected", unexpected),
                                                             ("shape mismatch", shapes)) if items]
        cfg = model.config
        raise CheckpointError(f"{source} does not fit its config.json (depth {cfg.depth}, hidden {cfg.hidden_size}, "
                              f"patch {cfg.patch_size}, sample size {cfg.input_size}): " + "; ".join(parts))
    for key, first in copies.items():
        if not torch.equal(state[key], state[first]):
            raise CheckpointError(f"{source}: {key} differs from block 0's copy; freedit's DiT, like DiT, has one "
                                  f"timestep and label embedder shared by all blocks")
    if "pos_embed.pos_embed" in state:  # diffusers keeps it as a non-persistent buffer; a saved one must be DiT's
        grid = int(math.isqrt(model.config.num_patches))
        fixed = torch.from_numpy(sincos_pos_embed_2d(model.config.hidden_size, grid)).float()[None]
        if state["pos_embed.pos_embed"].shape != fixed.shape or not torch.allclose(state["pos_embed.pos_embed"], fixed, atol=1e-5):
            raise CheckpointError(f"{source}: pos_embed.pos_embed is not DiT's fixed 2-D sin-cos embedding")
    out = {k: torch.cat([state[s] for s in theirs]) if len(theirs) > 1 else state[theirs[0]]
           for k, theirs in mapping.items()}
    out["pos_embed"] = expected["pos_embed"]
    return out


def check_scheduler(path: str | Path) -> None:
    """freedit samples with DiT's linear schedule; refuse a pipeline whose scheduler says otherwise."""
    cfg_path = Path(path) / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        return
    raw = _read_json(cfg_path)
    want = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    for key, value in want.items():
        got = raw.get(key, value)
        same = math.isclose(got, value, rel_tol=1e-6) if isinstance(value, float) and isinstance(got, (int, float)) \
            else got == value
        if not same:
            raise CheckpointError(f"{cfg_path}: {key} {got!r} is not DiT's ({value!r}); freedit samples with DiT's "
                                  f"linear 1e-4..0.02 schedule over 1000 steps")
    if raw.get("trained_betas") is not None or raw.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{cfg_path}: trained_betas or a prediction_type other than 'epsilon'; freedit's DiT "
                              f"predicts epsilon on DiT's schedule")


def load_diffusers_dit(path: str | Path, config: DiTConfig | None = None) -> DiT:
    """A DiT in eval mode from a diffusers folder. ``config``, if given, must describe the same DiT."""
    path = Path(path)
    inferred = read_config(path)
    if config is not None:
        diff = [f"{k} {getattr(inferred, k)!r} vs {getattr(config, k)!r}" for k in SHAPE_FIELDS
                if getattr(inferred, k) != getattr(config, k)]
        if diff:
            raise CheckpointError(f"{path}: the folder's DiT is not the one asked for ({'; '.join(diff)} asked)")
    check_scheduler(path)
    folder = transformer_folder(path)
    state, source = read_weights(folder)
    model = DiT(inferred)
    model.load_state_dict(map_state_dict(state, model, str(source)), strict=True)
    return model.eval()
