"""The DiT model and its checkpoints, pinned to facebookresearch/DiT's models.py, train.py and paper.

Large configs are only ever built on torch's meta device (shapes, no memory); the real-weight
round trips use DiT-S/2 and DiT-B/4 with random weights (DiT's own init zeroes the adaLN and
output layers, which would make every output 0 and every comparison vacuous).
"""
from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
import torch

from freedit.export.checkpoint import CheckpointError, infer_config, load_dit, read_state_dict, save_dit
from freedit.export.dit import (
    OFFICIAL_CONFIGS,
    DiT,
    DiTConfig,
    count_parameters,
    official_config,
    sincos_pos_embed_2d,
    timestep_sinusoid,
)

# DiT paper (Peebles & Xie, 2023), Table 1: layers, hidden size, heads, params (M) at 256px.
PAPER = {"S": (12, 384, 6, 33), "B": (12, 768, 12, 130), "L": (24, 1024, 16, 458), "XL": (28, 1152, 16, 675)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP spinning makes forwards ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def meta_dit(config: DiTConfig) -> DiT:
    with torch.device("meta"):
        return DiT(config)


def randomize(model: DiT, seed: int, std: float = 0.02) -> DiT:
    """Random values in every learned tensor (pos_embed keeps its fixed sin-cos table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def sample_inputs(config: DiTConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.tensor([999, 17, 500, 0][:batch])
    y = torch.tensor([3, config.num_classes, 7, 1][:batch])  # includes the null label
    return x, t, y


def outputs(model: DiT, config: DiTConfig):
    with torch.no_grad():
        return model(*sample_inputs(config))


# --------------------------------------------------------------------------------------------
# Configs and parameter counts
# --------------------------------------------------------------------------------------------
def test_twelve_official_configs():
    expected = {f"DiT-{s}/{p}" for s in PAPER for p in (2, 4, 8)}
    assert set(OFFICIAL_CONFIGS) == expected
    for name in expected:
        size, patch = name[4:].split("/")
        depth, hidden, heads, _ = PAPER[size]
        cfg = official_config(name)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, int(patch))
        assert (cfg.input_size, cfg.in_channels, cfg.num_classes) == (32, 4, 1000)
        assert cfg.learn_sigma and cfg.mlp_ratio == 4.0
        assert cfg.class_dropout_prob == 0.1 and cfg.out_channels == 8
    assert official_config("DiT-XL/2", image_size=512).input_size == 64
    with pytest.raises(ValueError, match="DiT-XL/2"):
        official_config("DiT-M/2")
    with pytest.raises(ValueError, match="multiple of 8"):
        official_config("DiT-S/2", image_size=260)


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_parameter_counts_match_paper(name):
    model = meta_dit(official_config(name))
    assert next(model.parameters()).device.type == "meta"
    millions = count_parameters(model) / 1e6
    paper = PAPER[name[4:].split("/")[0]][3]
    assert abs(millions - paper) / paper < 0.01, f"{name}: {millions:.2f}M vs paper {paper}M"


def test_xl2_parameter_count_is_exact():
    # The count DiT's train.py logs for DiT-XL/2 at 256px ("DiT Parameters: 675,129,632").
    assert count_parameters(meta_dit(official_config("DiT-XL/2"))) == 675_129_632


# --------------------------------------------------------------------------------------------
# State-dict layout of official checkpoints
# --------------------------------------------------------------------------------------------
def official_keys(depth: int) -> set[str]:
    keys = {"pos_embed", "y_embedder.embedding_table.weight"}
    for stem in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
                 "final_layer.adaLN_modulation.1"):
        keys |= {f"{stem}.weight", f"{stem}.bias"}
    for i in range(depth):
        for stem in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{stem}.weight", f"blocks.{i}.{stem}.bias"}
    return keys


def test_official_state_dict_keys_and_shapes():
    state = meta_dit(official_config("DiT-S/8")).state_dict()
    assert set(state) == official_keys(12)
    families = re.compile(r"^(pos_embed|x_embedder\.proj\.|t_embedder\.mlp\.[02]\.|y_embedder\.embedding_table\.weight"
                          r"|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)\."
                          r"|final_layer\.(linear|adaLN_modulation\.1)\.)")
    assert all(families.match(k) for k in state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["x_embedder.proj.weight"] == (384, 4, 8, 8)
    assert shapes["t_embedder.mlp.0.weight"] == (384, 256)
    assert shapes["t_embedder.mlp.2.weight"] == (384, 384)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 384)
    assert shapes["pos_embed"] == (1, 16, 384)
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * 384, 384)
    assert shapes["blocks.0.attn.proj.weight"] == (384, 384)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4 * 384, 384)
    assert shapes["blocks.0.mlp.fc2.weight"] == (384, 4 * 384)
    assert shapes["blocks.11.adaLN_modulation.1.weight"] == (6 * 384, 384)
    assert shapes["final_layer.linear.weight"] == (8 * 8 * 8, 384)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * 384, 384)
    # pos_embed is a frozen parameter, as in DiT.
    assert not dict(meta_dit(official_config("DiT-S/8")).named_parameters())["pos_embed"].requires_grad


def test_dit_init_is_adaln_zero():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    model = DiT(cfg)
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    assert not model.final_layer.linear.weight.any() and not model.final_layer.adaLN_modulation[-1].weight.any()
    eps_v, _ = outputs(model.eval(), cfg)
    assert not eps_v.any()


# --------------------------------------------------------------------------------------------
# Embeddings and forward, against independent references
# --------------------------------------------------------------------------------------------
def ref_timestep_embedding(t: list[float], dim: int, max_period: float = 10000.0) -> np.ndarray:
    half = dim // 2
    out = np.zeros((len(t), dim))
    for r, tt in enumerate(t):
        for i in range(half):
            arg = tt * math.exp(-math.log(max_period) * i / half)
            out[r, i] = math.cos(arg)
            out[r, half + i] = math.sin(arg)
    return out


def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos: first half encodes the column (w), second the row (h); sin then cos."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            n = row * grid + col
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                out[n, k] = math.sin(col * omega)
                out[n, quarter + k] = math.cos(col * omega)
                out[n, 2 * quarter + k] = math.sin(row * omega)
                out[n, 3 * quarter + k] = math.cos(row * omega)
    return out


def test_timestep_sinusoid_cos_first():
    t = [0.0, 1.0, 17.0, 500.0, 999.0]
    emb = timestep_sinusoid(torch.tensor(t), 256)
    assert emb.shape == (5, 256) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.numpy(), ref_timestep_embedding(t, 256), atol=3e-4)
    # t = 0: cos half is 1, sin half is 0.
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    odd = timestep_sinusoid(torch.tensor(t), 7)
    assert odd.shape == (5, 7) and not odd[:, -1].any()
    np.testing.assert_allclose(odd[:, :6].numpy(), ref_timestep_embedding(t, 6), atol=3e-4)


@pytest.mark.parametrize("dim, grid", [(384, 16), (64, 4), (1152, 2)])
def test_pos_embed_2d(dim, grid):
    table = sincos_pos_embed_2d(dim, grid)
    assert table.shape == (grid * grid, dim)
    np.testing.assert_allclose(table, ref_pos_embed(dim, grid), atol=1e-12)


def test_model_pos_embed_is_the_fixed_table():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=10)
    model = DiT(cfg)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), ref_pos_embed(64, 4), atol=1e-6)


def _ln(h):
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-6)


def ref_dit_forward(sd: dict, cfg: DiTConfig, x, t, y):
    """DiT's forward from the state dict alone, float64, explicit patches / heads / unpatchify."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda a, stem: a @ sd[f"{stem}.weight"].T + sd[f"{stem}.bias"]  # noqa: E731
    silu = lambda a: a * torch.sigmoid(a)  # noqa: E731
    p, ch, hid, nh = cfg.patch_size, cfg.in_channels, cfg.hidden_size, cfg.num_heads
    b, g = x.shape[0], cfg.input_size // p
    x = x.double()
    patches = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
    h = patches @ sd["x_embedder.proj.weight"].reshape(hid, -1).T + sd["x_embedder.proj.bias"]
    h = h + torch.from_numpy(ref_pos_embed(hid, g))
    temb = torch.from_numpy(ref_timestep_embedding([float(v) for v in t], 256))
    c = lin(silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    hd = hid // nh
    for i in range(cfg.depth):
        mods = lin(silu(c), f"blocks.{i}.adaLN_modulation.1").split(hid, dim=1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, None] for m in mods)
        a = _ln(h) * (1 + scale_a) + shift_a
        qkv = lin(a, f"blocks.{i}.attn.qkv")
        heads_out = []
        for head in range(nh):
            q = qkv[..., head * hd:(head + 1) * hd]
            k = qkv[..., hid + head * hd:hid + (head + 1) * hd]
            v = qkv[..., 2 * hid + head * hd:2 * hid + (head + 1) * hd]
            w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
            heads_out.append(w @ v)
        h = h + gate_a * lin(torch.cat(heads_out, dim=-1), f"blocks.{i}.attn.proj")
        m = lin(_ln(h) * (1 + scale_m) + shift_m, f"blocks.{i}.mlp.fc1")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))
        h = h + gate_m * lin(m, f"blocks.{i}.mlp.fc2")
    shift, scale = lin(silu(c), "final_layer.adaLN_modulation.1").split(hid, dim=1)
    tokens = lin(_ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out_ch = cfg.out_channels
    img = torch.zeros(b, out_ch, g * p, g * p, dtype=torch.float64)
    for gh in range(g):
        for gw in range(g):
            for i in range(p):
                for j in range(p):
                    first = (i * p + j) * out_ch
                    img[:, :, gh * p + i, gw * p + j] = tokens[:, gh * g + gw, first:first + out_ch]
    return img, h


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_matches_reference_and_head(learn_sigma):
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                    num_classes=10, learn_sigma=learn_sigma)
    model = randomize(DiT(cfg), seed=1, std=0.1)
    x, t, y = sample_inputs(cfg, batch=3)
    with torch.no_grad():
        eps_v, feat = model(x, t, y)
        again = model.head(feat, model.conditioning(t, y))
    out_ch = 8 if learn_sigma else 4
    assert eps_v.shape == (3, out_ch, 8, 8) and feat.shape == (3, 16, 64)
    assert torch.equal(again, eps_v)
    ref_out, ref_feat = ref_dit_forward(model.state_dict(), cfg, x, t, y)
    torch.testing.assert_close(eps_v.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feat.double(), ref_feat, rtol=1e-4, atol=1e-4)


def test_eval_mode_never_drops_labels():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=10,
                    class_dropout_prob=1.0)
    model = randomize(DiT(cfg), seed=2, std=0.1)
    x, t, _ = sample_inputs(cfg)
    y = torch.tensor([3, 4])
    with torch.no_grad():
        eval_out, _ = model(x, t, y)
        model.train()
        train_out, _ = model(x, t, y)  # p = 1: every label becomes the null class
        null_out, _ = model.eval()(x, t, torch.full_like(y, 10))
    assert not torch.allclose(eval_out, null_out)
    torch.testing.assert_close(train_out, null_out)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["DiT-S/2", "DiT-B/4"])
def official_ckpt(request, tmp_path_factory):
    """A random-weight official-layout model and its plain ``torch.save(state_dict)`` file."""
    name = request.param
    cfg = official_config(name)
    model = randomize(DiT(cfg), seed=11)
    path = tmp_path_factory.mktemp("ckpt") / f"{name.replace('/', '-')}-256x256.pt"
    torch.save(model.state_dict(), path)
    yield name, cfg, model, path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def s2_ckpt(tmp_path_factory):
    cfg = official_config("DiT-S/2")
    model = randomize(DiT(cfg), seed=5)
    path = tmp_path_factory.mktemp("s2") / "DiT-S-2.pt"
    torch.save(model.state_dict(), path)
    return cfg, model, path


def test_plain_state_dict_round_trip(official_ckpt):
    name, cfg, model, path = official_ckpt
    loaded = load_dit(path)  # config inferred from the tensors
    assert loaded.config == cfg and not loaded.training
    x_out = outputs(model, cfg)
    y_out = outputs(loaded, cfg)
    assert torch.equal(x_out[0], y_out[0]) and torch.equal(x_out[1], y_out[1])
    assert outputs(model, cfg)[0].abs().max() > 0  # the comparison is not vacuous


def test_train_py_checkpoint_uses_ema(official_ckpt, tmp_path):
    name, cfg, ema_model, _ = official_ckpt
    ema = ema_model.state_dict()
    live = {k: v + 0.5 for k, v in ema.items()}  # the non-EMA weights differ everywhere
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-4, weight_decay=0)
    args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model=name, image_size=256,
                              num_classes=1000, epochs=1400, global_batch_size=256, global_seed=0, vae="ema",
                              num_workers=4, log_every=100, ckpt_every=50_000)
    path = tmp_path / "0400000.pt"
    torch.save({"model": live, "ema": ema, "opt": opt.state_dict(), "args": args}, path)
    del live
    loaded = load_dit(path, cfg)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    ref = outputs(ema_model, cfg)
    got = outputs(loaded, cfg)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    path.unlink()


def test_safetensors_round_trip_embeds_config(tmp_path):
    # A config infer_config could not guess (unusual head count, CFG on all channels, odd class count).
    cfg = DiTConfig(input_size=12, patch_size=2, in_channels=3, hidden_size=96, depth=3, num_heads=3,
                    num_classes=7, learn_sigma=True, cfg_mode="all")
    model = randomize(DiT(cfg), seed=3, std=0.1)
    path = tmp_path / "tiny.safetensors"
    save_dit(model, path, extra_metadata={"note": "test"})
    assert path.is_file() and not (tmp_path / "tiny.safetensors.tmp").exists()
    state, embedded = read_state_dict(path)
    assert embedded == cfg and set(state) == set(model.state_dict())
    loaded = load_dit(path)
    assert loaded.config == cfg
    a, b = outputs(model, cfg), outputs(loaded, cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Without the embedded config the head count is not in the weights: refused, not guessed.
    with pytest.raises(CheckpointError, match="cannot tell the number of attention heads .* hidden size 96"):
        infer_config(state)


def test_safetensors_round_trip_official(s2_ckpt, tmp_path):
    cfg, model, _ = s2_ckpt
    path = tmp_path / "s2.safetensors"
    save_dit(model, path)
    loaded = load_dit(path)
    assert loaded.config == cfg
    assert torch.equal(outputs(model, cfg)[0], outputs(loaded, cfg)[0])


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
@pytest.mark.parametrize("image_size", [256, 512])
def test_infer_config_recovers_official(name, image_size):
    cfg = official_config(name, image_size=image_size)
    assert infer_config(meta_dit(cfg).state_dict()) == cfg


def test_infer_config_fixed_sigma_and_overrides():
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=128, depth=2, num_heads=2,
                    num_classes=10, learn_sigma=False)
    state = meta_dit(cfg).state_dict()
    assert infer_config(state, num_heads=2) == cfg
    assert infer_config(state, num_heads=2, cfg_mode="all").cfg_mode == "all"


# --------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------
def test_wrong_config_names_mismatching_tensor(s2_ckpt):
    _, _, path = s2_ckpt
    with pytest.raises(CheckpointError) as info:
        load_dit(path, official_config("DiT-B/2"))
    msg = str(info.value)
    assert str(path) in msg and "shape mismatch" in msg
    assert "x_embedder.proj.weight: checkpoint (384, 4, 2, 2) vs model (768, 4, 2, 2)" in msg


def test_truncated_checkpoint(s2_ckpt, tmp_path):
    _, _, path = s2_ckpt
    data = path.read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(cut)


def test_text_file_and_missing_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_dit(text)
    bad_st = tmp_path / "notes.safetensors"
    bad_st.write_text("neither is this")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_dit(bad_st)
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_dit(missing)
    assert "nope.pt" in str(info.value)
    with pytest.raises(CheckpointError, match="has no transformer/config.json"):
        load_dit(tmp_path)  # a folder is read as a diffusers DiT; this one is not


def test_missing_and_unexpected_keys(tmp_path):
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    state = randomize(DiT(cfg), seed=4).state_dict()
    no_bias = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    torch.save(no_bias, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"missing 1: blocks\.1\.mlp\.fc2\.bias"):
        load_dit(tmp_path / "a.pt", cfg)
    with pytest.raises(CheckpointError, match=r"missing 1: blocks\.1\.mlp\.fc2\.bias"):
        load_dit(tmp_path / "a.pt", num_heads=4)  # inferred config (heads given), same answer
    no_pos = {k: v for k, v in state.items() if k != "pos_embed"}
    torch.save(no_pos, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_dit(tmp_path / "b.pt")
    extra = {**state, "blocks.0.attn.bogus": torch.zeros(1)}
    torch.save(extra, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"unexpected 1: blocks\.0\.attn\.bogus"):
        load_dit(tmp_path / "c.pt", cfg)
    torch.save({"step": 3, "weights": [1, 2]}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_dit(tmp_path / "d.pt", cfg)


class _NotAllowed:
    """A pickled object of an arbitrary class must not be unpickled (weights_only)."""


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"pos_embed": torch.zeros(1)}, "payload": _NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_dit(path)
