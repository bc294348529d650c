"""Quality of the bundled digits DiT under its sequential sampler, across CFG scales.

    python -m freedit.benchmarks.eval_digits --n 256 --cfg-scales 1,1.5,2,3,4 --out benchmarks/results/digits_sequential

Writes ``<out>.json`` (settings, versions, command, per-scale metrics) and ``<out>.md`` (a table),
and a grid PNG per scale. The "real floor" is FD-digits of N real digits drawn at random, i.e.
what a perfect sampler would score at the same N (FD grows as N shrinks).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from freedit.benchmarks import command_line
from freedit.benchmarks.quality import DigitsClassifier, evaluate
from freedit.runtime.images import save_png
from freedit.runtime.pipeline import Pipeline


def balanced_labels(n: int, num_classes: int = 10) -> np.ndarray:
    return np.arange(n) % num_classes


def real_floor(n: int, classifier: DigitsClassifier, seed: int = 0, repeats: int = 5) -> dict:
    """FD-digits of n real digits (random subsets of all 1797) against the reference statistics."""
    from freedit.export.digits_data import load_digits_split

    images, labels = load_digits_split("all")
    rng = np.random.default_rng(seed)
    fds = [evaluate(images[idx], labels[idx], classifier=classifier)["fd_digits"]
           for idx in (rng.choice(len(images), n, replace=False) for _ in range(repeats))]
    return {"n": n, "fd_digits_mean": float(np.mean(fds)), "fd_digits_std": float(np.std(fds)), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="samples per CFG scale (balanced over the 10 classes)")
    parser.add_argument("--cfg-scales", default="1,1.5,2,3,4", help="comma list of CFG scales")
    parser.add_argument("--steps", default="250", help="DDPM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default=None, help="model directory (default: bundled)")
    parser.add_argument("--out", default="benchmarks/results/digits_sequential", help="output prefix")
    args = parser.parse_args(argv)
    pipe = Pipeline.from_directory(args.model) if args.model else Pipeline.default()
    classifier = DigitsClassifier.load()
    labels = balanced_labels(args.n)
    rows = []
    for scale in [float(s) for s in args.cfg_scales.split(",")]:
        t0 = time.perf_counter()
        # sampler named: the model's default sampler is FREE since pipeline.json gained a drafter
        result = pipe.generate(labels, sampler="sequential", steps=args.steps, cfg_scale=scale, seed=args.seed,
                               batch_size=args.batch_size, progress=True)
        metrics = evaluate(result.samples, labels, classifier=classifier)
        row = {"cfg_scale": scale, "sampler": result.settings["sampler"], "class_accuracy": metrics["class_accuracy"], "fd_digits": metrics["fd_digits"],
               "n": args.n, "seconds": time.perf_counter() - t0}
        rows.append(row)
        save_png(result.grid(ncol=16, scale=2), f"{args.out}_cfg{scale:g}.png")
        print(json.dumps(row), flush=True)
    floor = real_floor(args.n, classifier)
    print(json.dumps({"real_floor": floor}), flush=True)
    import onnxruntime

    report = {"command": command_line("freedit.benchmarks.eval_digits", argv),
              "sampler": "sequential DDPM", "steps": args.steps, "seed": args.seed, "model": pipe.source,
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
              "results": rows, "real_floor": floor}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Digits DiT, sequential DDPM {args.steps} steps, N = {args.n} per scale, seed {args.seed}", "",
             f"Command: `{report['command']}`", "",
             "| CFG scale | class accuracy | FD-digits | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['cfg_scale']:g} | {r['class_accuracy']:.3f} | {r['fd_digits']:.2f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"Real floor (N = {args.n} random real digits vs the reference statistics, {floor['repeats']} draws): "
                  f"FD-digits {floor['fd_digits_mean']:.2f} ± {floor['fd_digits_std']:.2f}."]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
