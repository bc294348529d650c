"""Distil FREE's drafter from a frozen DiT (DESIGN §3.1): ``freedit train-drafter``.

1. Trajectories come from the target's own DDPM sampler, one set per *setting* (a respacing and
   a CFG scale; the settings are every pair of ``spacings`` x ``cfg_scales``, so one drafter
   serves the step counts and guidance scales users sample at); each step stores the state and
   the DiT's real features of its conditional (and, with CFG, null) rows.
2. Loss per drafted position = Smooth-L1 on features + KL(q || p) between the target's and the
   draft's guided transitions (what acceptance depends on: mean and log-variance), or another
   distance between them (``divergence``), unrolled ``unroll`` steps with drafted features fed
   back, weighted towards late (low-noise) steps. Each optimizer step splits its batch over ``settings_per_step`` settings drawn at random.
   With ``parent_time`` the drafter is told the timestep of the features it is given, i.e. how
   large the step it drafts is.
3. Held-out trajectories measure the real quantity: acceptance min(1, q/p) of one draft from the
   real parent, per timestep and per setting, for the drafter and for the training-free frozen
   baseline.
Resumable: ``state.pt`` in the output folder is picked up; trajectories are cached per setting.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from freedit.export.diffusion import TorchSchedule
from freedit.export.dit import DiT
from freedit.export.drafter import Drafter, save_drafter
from freedit.export.resume import ResumeError, load_state, restore, save_state
from freedit.runtime.schedule import Schedule


@dataclass
class DrafterTrainConfig:
    spacings: tuple[str, ...] = ("250",)  # the inference respacings trained for
    cfg_scales: tuple[float, ...] = (1.5,)  # ... and guidance scales (every pair is a setting)
    # How often each guidance scale's settings are drawn, relative to each other (aligned with
    # cfg_scales; None: all alike). Strong guidance amplifies the drafted features' cond - null
    # error by the scale, so its settings can take more of the training budget.
    cfg_weights: tuple[float, ...] | None = None
    trajectories: int = 320  # per setting
    held_out: int = 32  # per setting
    depth: int = 1
    parent_time: bool = True  # the drafter gets its input features' timestep (contract input t_feat)
    mlp_ratio: float | None = None  # the drafter block's MLP width; None: the DiT's
    # Guided drafts as the runtime's draft_guidance "parent" makes them (DESIGN §3.1): only the
    # conditional row is drafted; the guidance gap (cond - null output) is the real parent's.
    parent_guidance: bool = False
    settings_per_step: int = 4  # settings sharing one optimizer step's batch
    # The distance between target and draft transitions the loss minimises per drafted position:
    # "kl" KL(q||p); "sqrt-kl" its square root; "hellinger" the Hellinger distance, which like the
    # rejection rate TV(p, q) it brackets (H^2 <= TV <= sqrt(2) H) saturates at 1, so positions no
    # drafter can match stop dominating the ones it can (KL is unbounded there).
    divergence: str = "kl"
    train_steps: int = 2000
    batch_size: int = 128
    unroll: int = 3
    lr: float = 1e-3
    feature_weight: float = 1.0
    late_weight: float = 2.0  # weight 1 + late_weight * (1 - i / N): late steps count more
    seed: int = 0
    threads: int = 2


@dataclass
class Trajectories:
    x: torch.Tensor  # [M, N+1, C, H, W]: x[:, N] = x_T, x[:, i + 1] = input of transition i, x[:, 0] = the sample
    feat: torch.Tensor  # [M, N, rows, T, H]: feat[:, i] = real features of x[:, i + 1] (rows: cond, null)
    labels: torch.Tensor  # [M]


@dataclass
class Setting:
    """One (respacing, CFG scale) the drafter is trained for, with its train and held-out trajectories."""

    spacing: str
    cfg_scale: float
    sched: TorchSchedule
    train: Trajectories
    held: Trajectories

    @property
    def name(self) -> str:
        return f"{self.spacing}@cfg{self.cfg_scale:g}"


def row_outputs(dit: DiT, feat: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """(conditional, null) eps_v from per-state features [B, rows, T, H] through the frozen head;
    null is None for one row."""
    cond = dit.head(feat[:, 0], dit.conditioning(t, y))
    if feat.shape[1] == 1:
        return cond, None
    return cond, dit.head(feat[:, 1], dit.conditioning(t, torch.full_like(y, dit.config.num_classes)))


def parent_gap(dit: DiT, parent: torch.Tensor, t_parent: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cond - null output of the parent from its real features [B, 2, T, H] at its timesteps."""
    cond, null = row_outputs(dit, parent, t_parent, y)
    return cond - null


def draft_output(dit: DiT, drafted: torch.Tensor, t, y, cfg_scale: float, gap: torch.Tensor | None) -> torch.Tensor:
    """Guided eps_v of drafted features: both rows drafted, or (``gap`` given) the conditional row
    only, with the null row the parent's gap implies (runtime/round_numpy.draft_step)."""
    if gap is None:
        return guided_output(dit, drafted, t, y, cfg_scale)
    cond, _ = row_outputs(dit, drafted[:, :1], t, y)
    return dit.cfg_combine(cond, cond - gap, cfg_scale)


def guided_output(dit: DiT, feat: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Guided eps_v from per-state features [B, rows, T, H] through the frozen head (rows: cond, null)."""
    cond, null = row_outputs(dit, feat, t, y)
    return cond if null is None else dit.cfg_combine(cond, null, cfg_scale)


@torch.no_grad()
def collect_trajectories(dit: DiT, sched: TorchSchedule, count: int, cfg_scale: float, seed: int,
                         batch: int = 160) -> Trajectories:
    cfg = dit.config
    n = sched.schedule.num_steps
    rows = 2 if cfg_scale != 1.0 else 1
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % cfg.num_classes
    xs = torch.empty(count, n + 1, cfg.in_channels, cfg.input_size, cfg.input_size)
    feats = torch.empty(count, n, rows, cfg.num_patches, cfg.hidden_size, dtype=torch.float16)
    bar = tqdm(total=count * n, desc="collect trajectories", unit="step", leave=False)
    for lo in range(0, count, batch):
        y = labels[lo:lo + batch]
        b = len(y)
        x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        xs[lo:lo + b, n] = x
        for i in reversed(range(n)):
            t = sched.timesteps[torch.full((b,), i)]
            yy = torch.cat([y, torch.full_like(y, cfg.num_classes)]) if rows == 2 else y
            out, feat = dit(torch.cat([x] * rows), torch.cat([t] * rows), yy)
            feats[lo:lo + b, i] = torch.stack(feat.chunk(rows), dim=1).half()
            eps_v = guided_output(dit, torch.stack(feat.chunk(rows), dim=1), t, y, cfg_scale)
            mean, log_var = sched.transition(x, eps_v, torch.full((b,), i))
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=g)
            xs[lo:lo + b, i] = x
            bar.update(b)
    bar.close()
    return Trajectories(xs, feats, labels)


def gaussian_kl(mean_q, log_var_q, mean_p, log_var_p) -> torch.Tensor:
    """KL(q || p) per row for diagonal Gaussians, summed over elements."""
    kl = 0.5 * (log_var_p - log_var_q + (torch.exp(log_var_q) + (mean_q - mean_p) ** 2) * torch.exp(-log_var_p) - 1.0)
    return kl.flatten(1).sum(1)


def bhattacharyya(mean_q, log_var_q, mean_p, log_var_p) -> torch.Tensor:
    """Bhattacharyya distance -log integral sqrt(p q) per row for diagonal Gaussians, summed over elements."""
    var_q, var_p = torch.exp(log_var_q), torch.exp(log_var_p)
    mix = 0.5 * (var_q + var_p)
    d = 0.125 * (mean_q - mean_p) ** 2 / mix + 0.5 * torch.log(mix) - 0.25 * (log_var_q + log_var_p)
    return d.flatten(1).sum(1)


def transition_divergence(kind: str, mean_q, log_var_q, mean_p, log_var_p) -> torch.Tensor:
    """The per-row loss term of ``DrafterTrainConfig.divergence``."""
    if kind == "kl":
        return gaussian_kl(mean_q, log_var_q, mean_p, log_var_p)
    if kind == "sqrt-kl":
        return torch.sqrt(gaussian_kl(mean_q, log_var_q, mean_p, log_var_p).clamp(min=0.0) + 1e-6)
    if kind == "hellinger":
        return torch.sqrt(-torch.expm1(-bhattacharyya(mean_q, log_var_q, mean_p, log_var_p)).clamp(min=0.0) + 1e-6)
    raise ValueError(f"unknown divergence {kind!r}; choose kl, sqrt-kl or hellinger")


def transition_input(traj: Trajectories, sched: TorchSchedule, m: torch.Tensor, i: torch.Tensor):
    """(state, timestep, label) of transition i of trajectories m: the state whose real features are feat[m, i]."""
    return traj.x[m, i + 1], sched.timesteps[i], traj.labels[m]


def unrolled_loss(drafter: Drafter, setting: Setting, cfg: DrafterTrainConfig, m: torch.Tensor,
                  i0: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Draft positions i0, i0-1, ... (unroll steps) from the real parent features at i0 + 1.

    The sampler drafts only noisy transitions (step >= 1; the last one is the DiT's mean), so a
    chain stops at step 1: positions below it carry no weight."""
    dit, traj, sched = drafter.dit, setting.train, setting.sched
    n = sched.schedule.num_steps
    feat = traj.feat[m, i0 + 1].float()  # the parent's real features
    gap = None
    if cfg.parent_guidance and feat.shape[1] == 2:  # the window's guidance gap: the real parent's
        gap = parent_gap(dit, feat, sched.timesteps[i0 + 1], traj.labels[m]).detach()
        feat = feat[:, :1]
    total, logs = 0.0, {"feature": 0.0, "kl": 0.0}
    for k in range(cfg.unroll):
        live = (i0 - k >= 1).float()
        i = (i0 - k).clamp(min=1)
        x, t, y = transition_input(traj, sched, m, i)
        feat = draft_features(drafter, feat, x, t, y, sched.timesteps[i + 1])
        real = traj.feat[m, i].float()
        eps_p = draft_output(dit, feat, t, y, setting.cfg_scale, gap)
        with torch.no_grad():
            eps_q = guided_output(dit, real, t, y, setting.cfg_scale)
            mean_q, lv_q = sched.transition(x, eps_q, i)
        mean_p, lv_p = sched.transition(x, eps_p, i)
        weight = live * (1.0 + cfg.late_weight * (1.0 - i.float() / n))
        feature = F.smooth_l1_loss(feat, real[:, :feat.shape[1]], reduction="none").flatten(1).mean(1)
        kl = gaussian_kl(mean_q, lv_q, mean_p, lv_p)
        distance = kl if cfg.divergence == "kl" else transition_divergence(cfg.divergence, mean_q, lv_q, mean_p, lv_p)
        total = total + (weight * (cfg.feature_weight * feature + distance)).mean()
        alive = live.sum().clamp(min=1.0)
        logs["feature"] += float((feature.detach() * live).sum() / alive) / cfg.unroll
        logs["kl"] += float((kl.detach() * live).sum() / alive) / cfg.unroll
    return total / cfg.unroll, logs


def draft_features(drafter: Drafter, parent: torch.Tensor, x, t, y, t_parent) -> torch.Tensor:
    """Per-state parent features [B, rows, T, H] (computed at timesteps ``t_parent``) -> drafted
    features of state x, same layout."""
    rows = parent.shape[1]
    yy = torch.cat([y, torch.full_like(y, drafter.dit.config.num_classes)]) if rows == 2 else y
    t_feat = torch.cat([t_parent] * rows) if drafter.config.parent_time else None
    h, _ = drafter(torch.cat([parent[:, r] for r in range(rows)]), torch.cat([x] * rows), torch.cat([t] * rows), yy,
                   t_feat)
    return torch.stack(h.chunk(rows), dim=1)


def _log_normal(x, mean, log_var):
    return (-0.5 * ((x - mean) ** 2 * torch.exp(-log_var) + log_var + math.log(2 * math.pi))).flatten(1).sum(1)


@torch.no_grad()
def held_out_acceptance(dit: DiT, drafter: Drafter | None, traj: Trajectories, sched: TorchSchedule, cfg_scale: float,
                        bins: int = 10, draws: int = 4, seed: int = 1, parent_guidance: bool = False) -> dict:
    """Mean acceptance min(1, q/p) of one draft from the real parent, per respaced step and in bins.

    ``drafter=None`` measures the frozen-target baseline (the parent's real output reused);
    ``parent_guidance``: guided drafts draft the conditional row only (DrafterTrainConfig).
    """
    g = torch.Generator().manual_seed(seed)
    n = sched.schedule.num_steps
    per_step = np.zeros(n - 2)
    m = torch.arange(len(traj.labels))
    # Drafted transitions: noisy (step >= 1; step 0 is the DiT's mean) and with a parent (step <= n - 2).
    for step in range(1, n - 1):
        i = torch.full_like(m, step)
        x, t, y = transition_input(traj, sched, m, i)
        parent = traj.feat[m, i + 1].float()
        if drafter is not None:
            gap = parent_gap(dit, parent, sched.timesteps[i + 1], y) if parent_guidance and parent.shape[1] == 2 else None
            drafted = draft_features(drafter, parent if gap is None else parent[:, :1], x, t, y, sched.timesteps[i + 1])
            eps_p = draft_output(dit, drafted, t, y, cfg_scale, gap)
        else:  # frozen: the parent's real output (its own timestep) drives this step's transition
            eps_p = guided_output(dit, parent, sched.timesteps[i + 1], y, cfg_scale)
        eps_q = guided_output(dit, traj.feat[m, i].float(), t, y, cfg_scale)
        mean_q, lv_q = sched.transition(x, eps_q, i)
        mean_p, lv_p = sched.transition(x, eps_p, i)
        for _ in range(draws):
            xt = mean_p + torch.exp(0.5 * lv_p) * torch.randn(mean_p.shape, generator=g)
            log_r = _log_normal(xt, mean_q, lv_q) - _log_normal(xt, mean_p, lv_p)
            per_step[step - 1] += float(torch.exp(torch.clamp(log_r, max=0.0)).mean()) / draws
    edges = np.linspace(1, n - 1, min(bins, n - 2) + 1).astype(int)
    binned = [float(per_step[a - 1:b - 1].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return {"mean": float(per_step.mean()), "by_step": per_step.tolist(), "bins": binned, "bin_edges": edges.tolist()}


def check_trajectories(traj: Trajectories, dit: DiT, num_steps: int, count: int, cfg_scale: float, path: Path) -> None:
    """Reused trajectories must be the ones these settings would collect (count, steps, rows, shapes)."""
    c = dit.config
    rows = 2 if cfg_scale != 1.0 else 1
    want = {"x": (count, num_steps + 1, c.in_channels, c.input_size, c.input_size),
            "feat": (count, num_steps, rows, c.num_patches, c.hidden_size), "labels": (count,)}
    got = {k: tuple(getattr(traj, k).shape) for k in want}
    if got != want:
        diff = "; ".join(f"{k} {got[k]} vs {want[k]}" for k in want if got[k] != want[k])
        raise ResumeError(f"{path} holds trajectories for other settings ({diff}: trajectories, held-out, steps, "
                          f"CFG or DiT changed); delete it (or choose another --out) to collect new ones")


def load_settings(dit: DiT, out_dir: Path, cfg: DrafterTrainConfig) -> list[Setting]:
    """Every (respacing, CFG scale) pair with its trajectories, collected once and cached per setting
    (loaded weights-only and checked against the setting, export/resume.py)."""
    settings = []
    pairs = [(spacing, float(scale)) for spacing in cfg.spacings for scale in cfg.cfg_scales]
    for index, (spacing, scale) in enumerate(pairs):
        sched = TorchSchedule(Schedule.create(spacing))
        count, seed = cfg.trajectories + cfg.held_out, cfg.seed + 1000 * index
        path = out_dir / f"trajectories_{spacing}_cfg{scale:g}.pt"
        if path.exists() or path.is_symlink():
            saved = load_state(path, {"x": torch.Tensor, "feat": torch.Tensor, "labels": torch.Tensor, "seed": int})
            traj = Trajectories(saved["x"], saved["feat"], saved["labels"])
            check_trajectories(traj, dit, sched.schedule.num_steps, count, scale, path)
            if saved["seed"] != seed:
                raise ResumeError(f"{path} holds trajectories for other settings (seed {saved['seed']} vs {seed}); "
                                  f"delete it (or choose another --out) to collect new ones")
        else:
            traj = collect_trajectories(dit, sched, count, scale, seed)
            save_state(path, {**asdict(traj), "seed": seed})
        split = cfg.trajectories
        settings.append(Setting(spacing, scale, sched,
                                Trajectories(traj.x[:split], traj.feat[:split], traj.labels[:split]),
                                Trajectories(traj.x[split:], traj.feat[split:], traj.labels[split:])))
    return settings


def setting_weights(cfg: DrafterTrainConfig) -> torch.Tensor | None:
    """Each setting's draw weight, in load_settings' order (spacing-major); None when all are alike."""
    weights = cfg.cfg_weights
    if weights is None:
        return None
    if len(weights) != len(cfg.cfg_scales) or min(weights) <= 0:
        raise ValueError(f"{list(weights)} must be positive, one per CFG scale {list(cfg.cfg_scales)}")
    if len(set(weights)) == 1:
        return None
    return torch.tensor([float(w) for _ in cfg.spacings for w in weights])


def draw_settings(total: int, weights: torch.Tensor | None, count: int, gen: torch.Generator) -> list[int]:
    """``count`` distinct settings of ``total`` for one optimizer step: uniform (a permutation, as the
    drafters trained before weights existed were) or drawn in proportion to the weights."""
    if weights is None:
        return torch.randperm(total, generator=gen)[:count].tolist()
    return torch.multinomial(weights, count, replacement=False, generator=gen).tolist()


def train_drafter(dit: DiT, out_dir: str | Path, cfg: DrafterTrainConfig) -> Path:
    """Collect (or reload) trajectories, train, evaluate, and write drafter.safetensors + train_log.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dit = dit.eval().requires_grad_(False)
    settings = load_settings(dit, out_dir, cfg)
    drafter = Drafter(dit, depth=cfg.depth, parent_time=cfg.parent_time, mlp_ratio=cfg.mlp_ratio)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_path, start, log = out_dir / "state.pt", 0, []
    if state_path.exists() or state_path.is_symlink():
        state = load_state(state_path, {"drafter": dict, "opt": dict, "generator": torch.Tensor, "step": int,
                                        "log": list})

        def load():
            drafter.load_state_dict(state["drafter"]), opt.load_state_dict(state["opt"])
            gen.set_state(state["generator"])

        restore(state_path, "drafter", load)
        start, log = state["step"], state["log"]
    t0 = time.time() - (log[-1]["seconds"] if log else 0.0)
    per_step = min(cfg.settings_per_step, len(settings))
    draw_weights = setting_weights(cfg)
    sub_batch = max(1, cfg.batch_size // per_step)
    bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, desc="train drafter", unit="step")
    for step in bar:
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.train_steps)))
        loss, terms = 0.0, {"feature": 0.0, "kl": 0.0}
        for s in draw_settings(len(settings), draw_weights, per_step, gen):
            n = settings[s].sched.schedule.num_steps
            m = torch.randint(0, cfg.trajectories, (sub_batch,), generator=gen)
            # first drafted step i0 in [1, n - 2]: a noisy transition whose parent i0 + 1 exists
            i0 = torch.randint(1, n - 1, (sub_batch,), generator=gen)
            part, part_terms = unrolled_loss(drafter, settings[s], cfg, m, i0)
            loss = loss + part / per_step
            for key in terms:
                terms[key] += part_terms[key] / per_step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", kl=f"{terms['kl']:.3f}")
        if (step + 1) % 100 == 0:
            log.append({"step": step + 1, "loss": float(loss.detach()), **terms, "seconds": time.time() - t0})
        if (step + 1) % 500 == 0 or step + 1 == cfg.train_steps:
            save_state(state_path, {"drafter": drafter.state_dict(), "opt": opt.state_dict(),
                                    "generator": gen.get_state(), "step": step + 1, "log": log})
    drafter.eval()
    evaluation = {s.name: {"drafter": held_out_acceptance(dit, drafter, s.held, s.sched, s.cfg_scale,
                                                          parent_guidance=cfg.parent_guidance),
                           "frozen": held_out_acceptance(dit, None, s.held, s.sched, s.cfg_scale)}
                  for s in tqdm(settings, desc="held-out acceptance", leave=False)}
    path = out_dir / "drafter.safetensors"
    save_drafter(drafter, path, {"train_config": json.dumps(asdict(cfg))})
    (out_dir / "train_log.json").write_text(json.dumps({"train_config": asdict(cfg), "log": log,
                                                        "held_out_acceptance": evaluation}, indent=1))
    return path
