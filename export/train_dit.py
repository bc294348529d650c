"""Train the bundled digits DiT: class-conditional, learned sigma, label dropout for CFG.

Reproduce the shipped weights with ``freedit train-dit --out runs/digits`` (defaults below).
Resumable: a ``state.pt`` in the output folder is picked up and training continues from it.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
from tqdm import tqdm

from freedit.export.checkpoint import save_dit
from freedit.export.diffusion import TorchSchedule, hybrid_loss
from freedit.export.digits_data import IMAGE_SIZE, NUM_CLASSES, load_digits_split
from freedit.export.dit import DiT, DiTConfig
from freedit.export.resume import load_state, restore, save_state
from freedit.runtime.schedule import Schedule

#: DiT-shaped (12 blocks, so a one-block drafter costs about a tenth of a call) but small enough
#: to train on a 2-core CPU: 16x16x1 images in 4x4 patches -> 16 tokens of width 96.
DIGITS_CONFIG = DiTConfig(input_size=IMAGE_SIZE, patch_size=4, in_channels=1, hidden_size=96, depth=12,
                          num_heads=4, num_classes=NUM_CLASSES, class_dropout_prob=0.1, learn_sigma=True,
                          cfg_mode="all")


@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 200
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    save_every: int = 500


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_digits_dit(out_dir: str | Path, cfg: TrainConfig, model_config: DiTConfig = DIGITS_CONFIG) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, labels = load_digits_split("train")
    data_x, data_y = torch.from_numpy(images), torch.from_numpy(labels)
    model = DiT(model_config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = TorchSchedule(Schedule.create())
    gen = torch.Generator().manual_seed(cfg.seed)
    start, log = 0, []
    state_path = out_dir / "state.pt"
    if state_path.exists() or state_path.is_symlink():
        state = load_state(state_path, {"model": dict, "ema": dict, "opt": dict, "generator": torch.Tensor,
                                        "step": int, "log": list})

        def load():
            model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
            gen.set_state(state["generator"])

        restore(state_path, "digits DiT", load)
        start, log = state["step"], state["log"]
    model.train()
    t0 = time.time() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train DiT", unit="step")
    running = None
    for step in bar:
        idx = torch.randint(0, len(data_x), (cfg.batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        terms = hybrid_loss(model, sched, data_x[idx], data_y[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - cfg.ema_decay)
        values = {k: float(v.detach()) for k, v in terms.items()}
        running = values if running is None else {k: 0.98 * running[k] + 0.02 * values[k] for k in values}
        bar.set_postfix(loss=f"{running['loss']:.4f}", mse=f"{running['mse']:.4f}")
        done = step + 1
        if done % 100 == 0:
            log.append({"step": done, **running, "lr": lr_at(step, cfg), "seconds": time.time() - t0})
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_state(state_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                    "generator": gen.get_state(), "step": done, "log": log})
    weights = out_dir / "digits_dit.safetensors"
    save_dit(ema.eval(), weights, {"train_config": json.dumps(asdict(cfg))})
    (out_dir / "train_log.json").write_text(json.dumps({"train_config": asdict(cfg), "model_config": model_config.to_dict(),
                                                         "log": log}, indent=1))
    return weights
