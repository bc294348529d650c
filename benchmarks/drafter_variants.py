"""Drafter variants side by side: acceptance, NFE speed-up and steps per unit of cost.

    python -m freedit.benchmarks.drafter_variants --variants d1=runs/v2_d1,d2=runs/v2_d2 \
        --out benchmarks/results/drafter_variants

Each variant is a `freedit train-drafter` output folder (drafter.safetensors, train_log.json).
Per variant: its cost per call relative to one DiT call (multiply-accumulates of every linear,
convolution and attention product, per image row; and the measured ONNX Runtime CPU time of a
batched call), its mean held-out one-step acceptance per training setting (from train_log.json),
and lossless FREE runs through the Pipeline at the chosen settings. A FREE round costs one
verification (one DiT call on a GPU, whatever the window) plus one drafter call per drafted
position, so the figure to maximise is

    steps per unit of cost = steps / (serial DiT calls + drafter calls x relative drafter cost)

per image. The variant with the most steps per unit of cost over the settings is the one to ship.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from freedit.benchmarks.acceptance_matrix import _write_atomic
from freedit.benchmarks.lossless_power import _pipeline


def macs_per_row(module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward call per batch row: linears, convolutions, attention products."""
    import torch

    from freedit.export.dit import Attention

    total = [0]

    def linear(mod, args, out):
        total[0] += mod.in_features * out.numel() // out.shape[0]

    def conv(mod, args, out):
        k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
        total[0] += k * out.numel() // out.shape[0]

    def attention(mod, args, out):
        tokens, hidden = args[0].shape[1], args[0].shape[2]
        total[0] += 2 * tokens * tokens * hidden  # q k^T and attn v

    hooks = []
    for m in module.modules():
        kind = linear if isinstance(m, torch.nn.Linear) else conv if isinstance(m, torch.nn.Conv2d) else \
            attention if isinstance(m, Attention) else None
        if kind:
            hooks.append(m.register_forward_hook(kind))
    with torch.no_grad():
        module(*inputs)
    for h in hooks:
        h.remove()
    return total[0] // len(inputs[0])


def measured_seconds_per_row(pipe, engine: str, rows: int = 256, repeats: int = 7) -> float:
    """Median ONNX Runtime time of one call on ``rows`` random rows, per row."""
    from freedit.runtime.adaptive import measure_cost_curve

    curve = measure_cost_curve(pipe.backend, pipe.info, rows // 2, 1, guided=True, repeats=repeats)
    return (curve.verify_seconds[0] if engine == "dit" else curve.draft_seconds) / rows


def evaluate_variant(name: str, folder: Path, settings: list[tuple[int, float]], windows: list[int], n: int,
                     threads: int | None, cache: Path) -> dict:
    import torch

    from freedit.export.checkpoint import load_dit
    from freedit.export.drafter import load_drafter
    from freedit.export.onnx_export import dit_inputs, export_drafter
    from freedit.runtime.pipeline import default_model_dir

    dit = load_dit(default_model_dir() / "digits_dit.safetensors").eval()
    drafter = load_drafter(folder / "drafter.safetensors", dit)
    onnx = cache / f"{name}.onnx"
    export_drafter(drafter, onnx)
    example = dit_inputs(dit, 4, 0, with_feat=True, with_parent_time=drafter.config.parent_time)
    draft_macs = macs_per_row(drafter, tuple(example.values()))
    dit_macs = macs_per_row(dit, tuple(v for k, v in example.items() if k in ("x", "t", "y")))
    pipe = _pipeline(onnx, threads)
    seconds = {e: measured_seconds_per_row(pipe, e) for e in ("dit", "drafter")}
    log = json.loads((folder / "train_log.json").read_text()) if (folder / "train_log.json").is_file() else {}
    held = {k: v["drafter"]["mean"] for k, v in log["held_out_acceptance"].items()} \
        if "train_config" in log and "spacings" in log["train_config"] else {}
    out = {"variant": name, "folder": str(folder), "config": json.loads(json.dumps(drafter.config.__dict__)),
           "trainable_parameters": sum(p.numel() for p in drafter.parameters()),
           "macs_per_row": draft_macs, "dit_macs_per_row": dit_macs, "relative_cost_macs": draft_macs / dit_macs,
           "relative_cost_cpu": seconds["drafter"] / seconds["dit"], "held_out_acceptance": held,
           "train_seconds": log["log"][-1]["seconds"] if log.get("log") else None, "runs": []}
    labels = np.arange(n) % 10
    for steps, cfg in settings:
        for window in windows:
            t0 = time.perf_counter()
            s = pipe.generate(labels, sampler="free", steps=steps, cfg_scale=cfg, window=window, seed=0,
                              batch_size=64, progress=True).summary
            drafter_calls = s["drafted"] / n  # one drafter call per drafted position and image
            cost = s["mean_target_calls"] + drafter_calls * out["relative_cost_macs"]
            run = {"steps": steps, "cfg_scale": cfg, "window": window, "acceptance": s["acceptance"],
                   "nfe_speedup": s["nfe_speedup"], "mean_target_calls": s["mean_target_calls"],
                   "drafter_calls_per_image": drafter_calls, "steps_per_cost": steps / cost,
                   "cpu_seconds": time.perf_counter() - t0}
            out["runs"].append(run)
            print(json.dumps({"variant": name, **run}), flush=True)
    best = {}
    for r in out["runs"]:
        k = f"{r['steps']}@{r['cfg_scale']:g}"
        best[k] = max(best.get(k, 0.0), r["steps_per_cost"])
    out["best_steps_per_cost"] = best
    out["mean_best_steps_per_cost"] = float(np.mean(list(best.values())))
    return out


def markdown(report: dict) -> str:
    lines = ["# Drafter variants: acceptance and steps per unit of cost (digits DiT)", "",
             f"Command: `{report['command']}`  ", f"N = {report['n']} images per run, seed 0, lossless FREE.", "",
             "Relative cost = one drafter call / one DiT call per image row (multiply-accumulates; measured ONNX Runtime "
             "CPU time beside it). Steps per unit of cost = steps / (serial DiT calls + drafter calls x relative cost), "
             "per image, at the best window of each setting.", "",
             "| variant | depth | MLP ratio | parent time | trainable params | relative cost (MACs) | relative cost (CPU) "
             "| mean held-out acceptance | " + " | ".join(f"steps/cost {k}" for k in report["variants"][0]["best_steps_per_cost"])
             + " | mean |", "|---|---:|---:|:---:|---:|---:|---:|---:|" + "---:|" * (len(report["variants"][0]["best_steps_per_cost"]) + 1)]
    for v in report["variants"]:
        c = v["config"]
        held = np.mean(list(v["held_out_acceptance"].values())) if v["held_out_acceptance"] else float("nan")
        lines.append(f"| {v['variant']} | {c['depth']} | {c.get('mlp_ratio') or 4:g} | {'yes' if c.get('parent_time') else 'no'} | "
                     f"{v['trainable_parameters']:,} | {v['relative_cost_macs']:.3f} | {v['relative_cost_cpu']:.3f} | "
                     f"{held:.3f} | " + " | ".join(f"{x:.2f}" for x in v["best_steps_per_cost"].values())
                     + f" | {v['mean_best_steps_per_cost']:.2f} |")
    lines += ["", "| variant | steps | CFG | L | acceptance | NFE speed-up | drafter calls / image | steps per unit of cost |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in report["variants"]:
        for r in v["runs"]:
            lines.append(f"| {v['variant']} | {r['steps']} | {r['cfg_scale']:g} | {r['window']} | {r['acceptance']:.3f} | "
                         f"{r['nfe_speedup']:.2f}x | {r['drafter_calls_per_image']:.1f} | {r['steps_per_cost']:.2f} |")
    best = max(report["variants"], key=lambda v: v["mean_best_steps_per_cost"])
    lines += ["", f"Most steps per unit of cost: **{best['variant']}** ({best['mean_best_steps_per_cost']:.2f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="NAME=FOLDER, comma separated")
    parser.add_argument("--settings", default="250@1.5,100@1.5,50@4", help="STEPS@CFG, comma separated")
    parser.add_argument("--windows", default="4,8")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/drafter_variants")
    args = parser.parse_args(argv)
    variants = [v.split("=", 1) for v in args.variants.split(",") if v]
    for item in variants:
        if len(item) != 2 or not (Path(item[1]) / "drafter.safetensors").is_file():
            raise SystemExit(f"error: --variants wants NAME=FOLDER with FOLDER/drafter.safetensors, got {'='.join(item)!r}")
    settings = [(int(s.split("@")[0]), float(s.split("@")[1])) for s in args.settings.split(",") if s]
    windows = [int(w) for w in args.windows.split(",") if w]
    cache = Path(tempfile.mkdtemp(prefix="freedit_variants_"))
    report = {"command": "python -m freedit.benchmarks.drafter_variants " + " ".join(sys.argv[1:] if argv is None else argv),
              "n": args.n, "machine": {"python": platform.python_version(), "platform": platform.platform()},
              "variants": [evaluate_variant(name, Path(folder), settings, windows, args.n, args.threads, cache)
                           for name, folder in variants]}
    _write_atomic(Path(f"{args.out}.json"), json.dumps(report, indent=1))
    _write_atomic(Path(f"{args.out}.md"), markdown(report))
    print(f"wrote {args.out}.json and {args.out}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
