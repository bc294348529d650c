"""freedit: FREE speculative sampling for Diffusion Transformers.

Subcommands follow the pipeline: train-dit (export side, torch) -> export (ONNX) -> generate
(runtime, no torch). Every command checks its inputs before working and fails with one line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def parse_labels(text: str) -> list[int]:
    """'0-9', '3,5,7', '4' or a mix such as '0-2,7' -> list of ints."""
    labels: list[int] = []
    for part in text.split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        try:
            labels += list(range(int(bounds[1]), int(bounds[2]) + 1)) if bounds else [int(part)]
        except ValueError:
            raise UsageError(f"--classes {text!r}: expected integers such as '0-9' or '1,4,7'") from None
    return labels


def _generate(args: argparse.Namespace) -> int:
    from freedit.runtime.images import check_writable, make_grid, save_png
    from freedit.runtime.pipeline import Pipeline

    labels = [y for y in parse_labels(args.classes) for _ in range(args.per_class)]
    if args.per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {args.per_class}")
    steps = int(args.steps) if args.steps is not None and args.steps.lstrip("-").isdigit() else args.steps
    out = check_writable(args.out)
    if args.samples_dir:
        Path(args.samples_dir).mkdir(parents=True, exist_ok=True)
        check_writable(Path(args.samples_dir) / "x.png")
    if args.stats:
        check_writable(args.stats)
    pipe = Pipeline.from_directory(args.model, threads=args.threads) if args.model else Pipeline.default(threads=args.threads)
    result = pipe.generate(labels, sampler=args.sampler, steps=steps, cfg_scale=args.cfg_scale, seed=args.seed,
                           batch_size=args.batch_size, window=args.window, relax=args.relax,
                           progress=not args.no_progress)
    save_png(make_grid(result.images, ncol=args.per_class if args.per_class > 1 else min(10, len(labels)),
                       scale=args.scale), out)
    if args.samples_dir:
        for stat, image in zip(result.stats, result.images):
            save_png(make_grid(image[None], 1, pad=0, scale=args.scale),
                     Path(args.samples_dir) / f"{stat['sample']:05d}_class{stat['label']}.png")
    if args.stats:
        tmp = Path(str(args.stats) + ".tmp")
        tmp.write_text(json.dumps({"settings": result.settings, "summary": result.summary, "samples": result.stats}, indent=1))
        tmp.replace(args.stats)
    print(summary_line(out, args.classes, result))
    return 0


def summary_line(out, classes: str, result) -> str:
    s, m = result.settings, result.summary
    sampler = s["sampler"]
    if "window" in s:
        sampler += f" L={s['window']}" + (f" lambda={s['relax']:g}" if s["sampler"] == "free-relax" else "")
    line = (f"wrote {out}: {m['images']} images of classes {classes}, {sampler}, {s['steps']} steps, "
            f"cfg {s['cfg_scale']:g}, seed {s['seed']}: {m['mean_target_calls']:.1f} serial target calls/image "
            f"(NFE speed-up {m['nfe_speedup']:.2f}x)")
    if "acceptance" in m:
        line += (f", acceptance {m['acceptance']:.3f} ({m['accepted']}/{m['decided']} drafts), residual proposals "
                 f"{m['residual_proposals']}, cap hits {m['residual_cap_hits']}")
    return line + f", {m['seconds']:.1f} s ({m['seconds_per_image'] * 1e3:.0f} ms/image, {s['backend']})"


def _export(args: argparse.Namespace) -> int:
    from freedit.export.checkpoint import load_dit
    from freedit.export.dit import official_config
    from freedit.export.onnx_export import export_dit

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = official_config(args.config, args.image_size) if args.config else None
    t0 = time.perf_counter()
    print(f"loading {args.checkpoint} ...", file=sys.stderr)
    model = load_dit(args.checkpoint, config)
    drafter = None
    if args.drafter:
        from freedit.export.drafter import load_drafter

        drafter = load_drafter(args.drafter, model)  # refuses a drafter trained for another DiT
    print(f"exporting dit to {out_dir / 'dit.onnx'} (opset {args.opset}, fp32, dynamic batch) ...", file=sys.stderr)
    report = export_dit(model, out_dir / "dit.onnx", opset=args.opset)
    errors = ", ".join(f"{k} {v:.1e}" for k, v in report.max_abs_error.items())
    print(f"wrote {out_dir / 'dit.onnx'} in {time.perf_counter() - t0:.1f} s; ONNX Runtime vs PyTorch max rel. error: {errors}")
    if drafter is not None:
        from freedit.export.onnx_export import export_drafter

        report = export_drafter(drafter, out_dir / "drafter.onnx", opset=args.opset)
        errors = ", ".join(f"{k} {v:.1e}" for k, v in report.max_abs_error.items())
        print(f"wrote {out_dir / 'drafter.onnx'}; ONNX Runtime vs PyTorch max rel. error: {errors}")
    return 0


def _train_drafter(args: argparse.Namespace) -> int:
    from freedit.export.checkpoint import load_dit
    from freedit.export.train_drafter import DrafterTrainConfig, train_drafter

    if args.unroll < 1:
        raise UsageError(f"--unroll must be at least 1, got {args.unroll}")
    cfg = DrafterTrainConfig(steps=args.steps, cfg_scale=args.cfg_scale, trajectories=args.trajectories,
                             held_out=args.held_out, depth=args.depth, train_steps=args.train_steps,
                             batch_size=args.batch_size, unroll=args.unroll, lr=args.lr, seed=args.seed,
                             threads=args.threads)
    path = train_drafter(load_dit(args.dit), args.out, cfg)
    print(f"wrote {path}")
    return 0


def _train_dit(args: argparse.Namespace) -> int:
    from freedit.export.train_dit import TrainConfig, train_digits_dit

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    path = train_digits_dit(args.out, cfg)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freedit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = sub.add_parser("generate", formatter_class=fmt, help="sample images (default: the bundled digits DiT, CPU)",
                       description="Sample class-conditional images and write a PNG grid (one row per class).")
    g.add_argument("--classes", default="0-9", help="class labels: a range '0-9', a list '1,4,7' or a mix")
    g.add_argument("--per-class", type=int, default=8, help="images per class label")
    g.add_argument("--sampler", default=None, help="free (lossless FREE, the default with a drafter), free-relax "
                   "(tempered accept test), frozen (training-free drafter), sequential (DDPM, one DiT call per step) "
                   "or ddim (eta 0)")
    g.add_argument("--window", type=int, default=None, help="FREE's draft window L, >= 1 (default: the model's)")
    g.add_argument("--relax", type=float, default=None, help="FREE (relax) lambda >= 0; 0 = lossless (default: the model's)")
    g.add_argument("--steps", default=None, help="step count (e.g. 250) or DiT spacing ('ddim50', '10,20,30'); "
                   "default: the model's, 250 for the bundled model")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale, >= 0 (1 = off); "
                   "default: the model's documented scale")
    g.add_argument("--seed", type=int, default=0, help="random seed; same seed => same images")
    g.add_argument("--batch-size", type=int, default=None, help="samples in flight per DiT call (default: the model's, 64)")
    g.add_argument("--out", default="freedit_samples.png", help="PNG grid to write")
    g.add_argument("--samples-dir", default=None, help="also write one PNG per sample into this folder")
    g.add_argument("--stats", default=None, help="write settings, summary and per-sample statistics as JSON here")
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the written images")
    g.add_argument("--model", default=None, help="model directory with dit.onnx (default: the bundled digits DiT)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (default: up to 8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    e = sub.add_parser("export", formatter_class=fmt, help="export a DiT checkpoint to ONNX (needs the torch extra)",
                       description="Export a DiT (official .pt, train.py checkpoint or our safetensors) to ONNX per the "
                                   "'dit' contract, checked against PyTorch with ONNX Runtime.")
    e.add_argument("--checkpoint", required=True, help="DiT-XL-2-256x256.pt, a train.py checkpoint or .safetensors")
    e.add_argument("--config", default=None, help="official config name such as DiT-XL/2 (default: inferred from the file)")
    e.add_argument("--image-size", type=int, default=256, help="image size for an official config (latent = size / 8)")
    e.add_argument("--out", required=True, help="output model directory (dit.onnx)")
    e.add_argument("--drafter", default=None, help="drafter.safetensors from `freedit train-drafter` (exports drafter.onnx)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    e.set_defaults(func=_export)

    t = sub.add_parser("train-dit", formatter_class=fmt, help="train the bundled digits DiT (needs the torch extra)",
                       description="Train the class-conditional digits DiT on scikit-learn's digits (resumable).")
    t.add_argument("--out", default="runs/digits", help="output folder (state.pt, digits_dit.safetensors, train_log.json)")
    t.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=256, help="images per step")
    t.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warm-up, then cosine decay)")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    t.set_defaults(func=_train_dit)

    d = sub.add_parser("train-drafter", formatter_class=fmt, help="distil FREE's drafter from a DiT (torch extra)",
                       description="Collect trajectories from the DiT's own sampler and train the feature drafter "
                                   "(resumable; logs held-out acceptance per timestep).")
    d.add_argument("--dit", required=True, help="the frozen target: our .safetensors or an official .pt")
    d.add_argument("--out", default="runs/drafter", help="output folder (trajectories.pt, state.pt, drafter.safetensors)")
    d.add_argument("--steps", default="250", help="inference step count the drafter is trained for")
    d.add_argument("--cfg-scale", type=float, default=1.5, help="inference CFG scale the drafter is trained for")
    d.add_argument("--trajectories", type=int, default=320, help="training trajectories")
    d.add_argument("--held-out", type=int, default=32, help="held-out trajectories for the acceptance report")
    d.add_argument("--depth", type=int, default=1, help="drafter transformer blocks")
    d.add_argument("--train-steps", type=int, default=2000, help="optimizer steps")
    d.add_argument("--batch-size", type=int, default=128, help="drafted positions per step")
    d.add_argument("--unroll", type=int, default=3, help="steps unrolled with drafted features fed back")
    d.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    d.set_defaults(func=_train_drafter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from freedit.runtime.contract import ContractError

    known = (UsageError, ValueError, FileNotFoundError, ContractError, PermissionError, IsADirectoryError)
    try:
        return args.func(args)
    except known as exc:
        print(f"freedit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"freedit {args.command}: error: {exc.name} is not installed; this command needs "
              f"`pip install 'freedit[torch]'`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"freedit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
