"""FREE on the bundled digits DiT: NFE speed-up, acceptance and quality, side by side with sequential.

    python -m freedit.benchmarks.free_digits --n 256 --windows 3,6,10 --relax 0.25,0.5,1,2 \
        --out benchmarks/results/free_digits

Every sampler runs on the same class labels and seed. NFE speed-up = steps / serial target calls
per image (each FREE round is one serial DiT call). Writes <out>.json (every figure plus the
command and versions), <out>.md (tables) and <out>_acceptance.png (acceptance by timestep).
CPU wall-clock is recorded too but is not the claim: on a CPU a verify call of L+1 states costs
about L+1 plain calls, so only the serial call count carries over to a GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from freedit.benchmarks import add_draft_guidance_argument, add_verifier_argument, command_line
from freedit.benchmarks.quality import DigitsClassifier, evaluate
from freedit.runtime.pipeline import Pipeline


def run_one(pipe: Pipeline, labels, classifier, **kwargs) -> dict:
    t0 = time.perf_counter()
    result = pipe.generate(labels, progress=True, **kwargs)
    metrics = evaluate(result.samples, labels, classifier=classifier)
    settings = {k: v for k, v in result.settings.items() if k not in ("model", "batch_size")}
    return {**settings, "class_accuracy": metrics["class_accuracy"], "fd_digits": metrics["fd_digits"],
            "wall_seconds": time.perf_counter() - t0, **result.summary}


def plot_acceptance(rows: list[dict], num_steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        by_step = row.get("acceptance_by_step") or {}
        if not by_step:
            continue
        steps = np.array(sorted(int(k) for k in by_step))
        acc = np.array([by_step[k] if k in by_step else by_step[str(k)] for k in steps])
        width = 9  # moving average over respaced steps, for a readable curve
        smooth = np.convolve(acc, np.ones(width) / width, mode="same")
        label = row["sampler"] + (f" L={row['window']}" if "window" in row else "") + (
            f" λ={row['relax']:g}" if row.get("relax") else "")
        ax.plot(steps, smooth, label=label)
    ax.set_xlabel(f"respaced step i (of {num_steps}; {num_steps - 1} = pure noise, 0 = final)")
    ax.set_ylabel("acceptance of drafted transitions")
    ax.set_ylim(0, 1.02)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("FREE on the digits DiT: acceptance by timestep (sampling runs left to right)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images per sampler (balanced classes)")
    parser.add_argument("--steps", default="250")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's documented scale")
    parser.add_argument("--windows", default="3,6,10", help="lossless FREE window lengths L to measure")
    parser.add_argument("--relax", default="0.25,0.5,1,2", help="FREE (relax) lambdas, at the best L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="benchmarks/results/free_digits")
    add_draft_guidance_argument(parser)
    add_verifier_argument(parser)
    args = parser.parse_args(argv)
    pipe = Pipeline.from_directory(args.model) if args.model else Pipeline.default()
    classifier = DigitsClassifier.load()
    labels = np.arange(args.n) % 10
    common = dict(steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size,
                  draft_guidance=args.draft_guidance)  # rows record the rule from result.settings
    rows = [run_one(pipe, labels, classifier, sampler="sequential", **common)]
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "acceptance_by_step"}), flush=True)
    windows = [int(w) for w in args.windows.split(",")]
    for window in windows:
        for sampler in ("free", "frozen"):
            rows.append(run_one(pipe, labels, classifier, sampler=sampler, window=window, verifier=args.verifier,
                                **common))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "acceptance_by_step"}), flush=True)
    lossless = [r for r in rows if r["sampler"] == "free"]
    best = max(lossless, key=lambda r: r["nfe_speedup"])
    for lam in [float(v) for v in args.relax.split(",") if v.strip()]:  # relax verifies per step
        rows.append(run_one(pipe, labels, classifier, sampler="free-relax", window=best["window"], relax=lam, **common))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "acceptance_by_step"}), flush=True)
    import onnxruntime

    seq = rows[0]
    report = {"command": command_line("freedit.benchmarks.free_digits", argv),
              "model": pipe.source, "n": args.n, "steps": args.steps, "cfg_scale": seq["cfg_scale"],
              "best_lossless_window": best["window"], "draft_guidance": args.draft_guidance,
              "verifier": args.verifier,
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
              "results": rows}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    plot_acceptance([r for r in rows if r["sampler"] != "sequential" and (r.get("window") == best["window"])],
                    seq["num_steps"], f"{args.out}_acceptance.png")
    lines = [f"# FREE on the digits DiT: {args.n} images per sampler, DDPM {args.steps} steps, "
             f"CFG {report['cfg_scale']:g}, seed {args.seed}", "", f"Command: `{report['command']}`  ",
             "Guided FREE's draft guidance: " + next((r["draft_guidance"] for r in rows if "draft_guidance" in r), "n/a"),
             "",
             "| sampler | L | λ | verifier | serial target calls / image | NFE speed-up | acceptance | class accuracy | "
             "FD-digits | CPU s / image |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r.get('window', '')} | {r.get('relax', '') if r['sampler'] == 'free-relax' else ''} | "
                     f"{r.get('verifier', '')} | {r['mean_target_calls']:.1f} | {r['nfe_speedup']:.2f}x | "
                     f"{r.get('acceptance', float('nan')):.3f} | {r['class_accuracy']:.3f} | {r['fd_digits']:.2f} | "
                     f"{r['seconds_per_image']:.2f} |")
    lines += ["", f"FD-digits of sequential: {seq['fd_digits']:.2f}; the relaxed settings' FD relative to it: " +
              ", ".join(f"λ={r['relax']:g}: {r['fd_digits'] / seq['fd_digits']:.2f}x" for r in rows
                        if r["sampler"] == "free-relax"), "",
              f"![acceptance by timestep]({Path(args.out).name}_acceptance.png)"]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
