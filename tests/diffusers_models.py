"""Random-weight diffusers folders for the tests (no network: built here and saved with save_pretrained)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: diffusers' DiTTransformer2DModel arguments of the official configs (heads x head dim = hidden).
DIFFUSERS_CONFIGS = {
    "DiT-S/2": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
    "DiT-B/4": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12, patch_size=4),
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, patch_size=2),
}


def random_diffusers_dit(name: str, image_size: int = 256, seed: int = 0, tie_embedders: bool = True, **overrides):
    """A DiTTransformer2DModel whose every weight is random (not DiT's zero init, which would make the
    output zero). Every block's copy of the timestep/label embedder equals block 0's, as in every
    diffusers DiT folder (diffusers' conversion copies DiT's one embedder into each block);
    ``tie_embedders=False`` leaves them independent, which freedit must refuse."""
    from diffusers import DiTTransformer2DModel

    args = dict(in_channels=4, out_channels=8, sample_size=image_size // 8, num_embeds_ada_norm=1000,
                **DIFFUSERS_CONFIGS[name])
    args.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**args).eval()
        with torch.no_grad():
            for param in model.parameters():  # about unit-scale activations and outputs
                fan_in = param[0].numel() if param.ndim > 1 else 1
                param.normal_(0.0, fan_in ** -0.5 if param.ndim > 1 else 0.1)
            if tie_embedders:
                state = model.state_dict()
                for key, value in state.items():
                    if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
                        value.copy_(state["transformer_blocks.0.norm1.emb." + key.split(".norm1.emb.", 1)[1]])
    return model


def save_pipeline_folder(folder: Path, transformer, vae=None, scheduler: dict | None = None) -> Path:
    """A pipeline folder as diffusers lays it out: transformer/ (+ vae/, scheduler/, model_index.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(str(folder / "transformer"))
    if vae is not None:
        vae.save_pretrained(str(folder / "vae"))
    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "prediction_type": "epsilon", **(scheduler or {})}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    return folder


def random_vae(width: int = 8, **overrides):
    """The SD VAE's layout at base width ``width`` (random weights, freedit's `--vae random:W`)."""
    from diffusers import AutoencoderKL

    from freedit.export.vae import random_config

    with torch.random.fork_rng():
        torch.manual_seed(1)
        return AutoencoderKL(**{**random_config(f"random:{width}"), **overrides}).eval()


def diffusers_forward(model, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(x), timestep=torch.as_tensor(t), class_labels=torch.as_tensor(y)).sample


#: Timesteps from both ends of the schedule and labels including the null class (1000) of CFG.
TIMESTEPS = np.array([0, 1, 37, 500, 999, 250], dtype=np.float32)
LABELS = np.array([0, 207, 999, 1000, 1000, 5], dtype=np.int64)


def onnx_vs_diffusers(model_dir, model, image_size: int) -> float:
    """Max |dit.onnx - diffusers| over ε and variance channels, relative to max(1, max |diffusers|)."""
    import onnxruntime as ort

    x = np.random.default_rng(7).normal(size=(len(TIMESTEPS), 4, image_size // 8, image_size // 8)).astype(np.float32)
    got = ort.InferenceSession(str(model_dir / "dit.onnx")).run(["eps_v"], {"x": x, "t": TIMESTEPS, "y": LABELS})[0]
    want = diffusers_forward(model, x, TIMESTEPS, LABELS).numpy()
    assert got.shape == want.shape == (len(TIMESTEPS), 8, image_size // 8, image_size // 8)
    assert want[:, :4].std() > 0.3 and want[:, 4:].std() > 0.3  # unit-scale outputs: the tolerance means something
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
