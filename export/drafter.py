"""FREE's feature-level drafter (DESIGN §3.1): predicts the DiT's top-block features of a state.

    h_hat(x_k) = D(h(x_{k-1}), x_k, t_k, y[, t_{k-1}])

The DiT's patch/position/timestep/label embedders and its final layer are reused frozen, so a
drafted feature yields (eps, v), hence a full draft transition, exactly as the DiT would from those
features. Trainable: a fusion Linear(2H -> H) of [h_parent, embed(x_k)] and ``depth`` adaLN-Zero
blocks. The fusion starts as [I, 0] and the blocks as identity (adaLN-Zero), so an untrained
drafter predicts "the parent's features" and training only improves on that.

``parent_time``: the drafter also gets the parent's original timestep t_{k-1} (the ``t_feat``
input of the ONNX contract), embedded by the frozen timestep embedder and a trainable
SiLU-Linear (zero-initialised) added to the conditioning. With it one drafter knows how far the
features it is given lie from the state it drafts, so it can serve every respacing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from freedit.export.dit import DiT, DiTBlock, DiTConfig

DRAFTER_CONFIG_KEY = "freedit_drafter_config"


@dataclass(frozen=True)
class DrafterConfig:
    depth: int = 1
    # False for drafters trained before the parent's timestep became an input (they load unchanged).
    parent_time: bool = False
    mlp_ratio: float | None = None  # None: the DiT's
    # The target this drafter was trained for: a drafter only fits a DiT of the same shape.
    target_hidden_size: int = 0
    target_num_patches: int = 0
    target_in_channels: int = 0


class Drafter(nn.Module):
    def __init__(self, target: DiT, depth: int = 1, parent_time: bool = False, mlp_ratio: float | None = None):
        super().__init__()
        cfg = target.config
        h = cfg.hidden_size
        self.config = DrafterConfig(depth, parent_time, mlp_ratio, h, cfg.num_patches, cfg.in_channels)
        self.target = [target]  # a list keeps the frozen DiT out of this module's parameters
        self.fusion = nn.Linear(2 * h, h)
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.num_heads, mlp_ratio or cfg.mlp_ratio) for _ in range(depth))
        self.parent_time = nn.Sequential(nn.SiLU(), nn.Linear(h, h)) if parent_time else None
        with torch.no_grad():
            self.fusion.weight.zero_()
            self.fusion.weight[:, :h].copy_(torch.eye(h))
            self.fusion.bias.zero_()
            for block in self.blocks:
                for layer in block.modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.xavier_uniform_(layer.weight)
                        nn.init.zeros_(layer.bias)
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if self.parent_time is not None:  # starts without effect: the drafter of a single respacing
                nn.init.zeros_(self.parent_time[-1].weight)
                nn.init.zeros_(self.parent_time[-1].bias)

    @property
    def dit(self) -> DiT:
        return self.target[0]

    def forward(self, feat: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                t_feat: torch.Tensor | None = None):
        """(parent features [B,T,H], state x [B,C,H,W], t [B], y [B], parent timestep t_feat [B])
        -> (features [B,T,H], eps_v). ``t_feat`` is needed exactly when the drafter has ``parent_time``."""
        c = block_c = self.dit.conditioning(t, y)
        if self.parent_time is not None:
            if t_feat is None:
                raise ValueError("this drafter was trained with the parent's timestep: pass t_feat")
            block_c = c + self.parent_time(self.dit.t_embedder(t_feat))
        elif t_feat is not None:
            raise ValueError("this drafter takes no parent timestep (t_feat); it was trained without one")
        h = self.fusion(torch.cat([feat, self.dit.embed_input(x)], dim=-1))
        for block in self.blocks:
            h = block(h, block_c)
        return h, self.dit.head(h, c)  # the DiT's own head and conditioning: features -> (eps, v) as the DiT would


def check_drafter_fits(config: DrafterConfig, target: DiTConfig, source: str) -> None:
    got = (config.target_hidden_size, config.target_num_patches, config.target_in_channels)
    want = (target.hidden_size, target.num_patches, target.in_channels)
    if got != want:
        raise ValueError(f"{source} was trained for a DiT with hidden size {got[0]}, {got[1]} patches and {got[2]} "
                         f"channels; this DiT has {want[0]}, {want[1]} and {want[2]}")


def save_drafter(drafter: Drafter, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    meta = {DRAFTER_CONFIG_KEY: json.dumps(asdict(drafter.config)), **(extra_metadata or {})}
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.contiguous() for k, v in drafter.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


def load_drafter(path: str | Path, target: DiT) -> Drafter:
    """The drafter at ``path`` for ``target``; a CheckpointError line for a truncated, foreign or mismatched file."""
    from safetensors import safe_open

    from freedit.export.checkpoint import CheckpointError, check_tensor_types

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"drafter weights {path} do not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc)[:200]})") from None
    if DRAFTER_CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} is not a freedit drafter (no '{DRAFTER_CONFIG_KEY}' metadata)")
    try:
        fields = json.loads(meta[DRAFTER_CONFIG_KEY])
        config = DrafterConfig(**fields)
        ints = [k for k in DrafterConfig.__dataclass_fields__ if k not in ("parent_time", "mlp_ratio")]
        if not all(isinstance(getattr(config, k), int) and not isinstance(getattr(config, k), bool) for k in ints) \
                or not 1 <= config.depth <= 64 or not isinstance(config.parent_time, bool) \
                or not (config.mlp_ratio is None or (isinstance(config.mlp_ratio, (int, float))
                                                     and not isinstance(config.mlp_ratio, bool)
                                                     and 0 < config.mlp_ratio <= 64)):
            raise ValueError(f"expected integers (depth 1..64), parent_time true/false, mlp_ratio in (0, 64] or "
                             f"null, got {fields}")
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable '{DRAFTER_CONFIG_KEY}' metadata ({str(exc)[:200]})") from None
    check_drafter_fits(config, target.config, str(path))
    check_tensor_types(state, path)
    drafter = Drafter(target, depth=config.depth, parent_time=config.parent_time, mlp_ratio=config.mlp_ratio)
    expected = drafter.state_dict()
    wrong = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state
                                                   and state[k].shape != expected[k].shape]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{path} does not fit a depth-{config.depth} drafter of this DiT: missing, unexpected "
                              f"or mis-shaped {', '.join(wrong[:3])}{more}")
    drafter.load_state_dict(state, strict=True)
    return drafter.eval()
