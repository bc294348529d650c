"""Drafting one micro-batch while verifying another: what it buys, and the timeline that shows it.

    python -m freedit.benchmarks.overlap_timeline --n 40 --steps 100 --repeats 3 \
        --out benchmarks/results/overlap_digits_cpu

FREE (lossless, bundled digits DiT, ONNX Runtime) with the same samples in flight either as one
batch of B or as two micro-batches of B/2 overlapped (runtime/overlap.py). The configurations are
interleaved over repeats so drift hits both equally; the wall-clock ratio is taken per repeat.
Images are checked to be identical. Writes <out>.json, <out>.md, <out>_timeline.png and
<out>_raw.log.
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
from freedit.runtime.pipeline import Pipeline


def plot_timeline(events: list[dict], path: str, title: str, until: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = ["decide", "verify", "draft"]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    fig, ax = plt.subplots(figsize=(11, 2.8))
    for lane_index, lane in enumerate(lanes):
        for e in events:
            if e["lane"] != lane or (until is not None and e["start"] > until):
                continue
            ax.broken_barh([(e["start"], e["end"] - e["start"])], (lane_index - 0.4, 0.8),
                           facecolors=colors[e["micro_batch"] % len(colors)], edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(lanes)), ["decide (host)", "verify stream", "draft stream"])
    ax.set_xlabel("seconds since the run started")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors[:2]]
    ax.legend(handles, ["micro-batch 0", "micro-batch 1"], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="images per configuration")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per engine call")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--out", default="benchmarks/results/overlap_digits_cpu")
    add_draft_guidance_argument(ap)
    add_verifier_argument(ap)
    args = ap.parse_args(argv)
    pipe = Pipeline.from_directory(Pipeline.default().source, backend=args.backend, threads=args.threads)
    labels = [i % 10 for i in range(args.n)]
    configs = {"one batch of B": dict(batch_size=args.n, micro_batches=1),
               "two micro-batches of B/2": dict(batch_size=(args.n + 1) // 2, micro_batches=2)}
    kw = dict(sampler="free", steps=args.steps, seed=0, window=args.window, draft_guidance=args.draft_guidance,
              verifier=args.verifier)
    pipe.generate(labels[:4], **{**kw, "steps": 10})  # warm-up, not recorded
    runs = {name: [] for name in configs}
    samples, timeline = {}, None
    log = []
    for rep in range(args.repeats):
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            result = pipe.generate(labels, **kw, **cfg)
            wall = time.perf_counter() - t0
            runs[name].append({"wall_s": wall, **{k: v for k, v in result.summary.items() if isinstance(v, (int, float))}})
            samples.setdefault(name, result.samples)
            if cfg["micro_batches"] == 2 and timeline is None:
                timeline = result.timeline
            line = f"repeat {rep} {name}: {wall:.2f} s, {result.summary['mean_target_calls']:.1f} serial calls/image"
            print(line, file=sys.stderr, flush=True)
            log.append(line)
    names = list(configs)
    identical = bool(np.array_equal(samples[names[0]], samples[names[1]]))
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[names[0]], runs[names[1]])]
    record = {
        "command": command_line("freedit.benchmarks.overlap_timeline", argv),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "gpu": "none"},
        # settings: the rules asked for (null: the model's); draft_guidance, verifier: those applied
        "settings": {**vars(args), **kw}, "draft_guidance": result.settings.get("draft_guidance"),
        "verifier": result.settings["verifier"],
        "runs": runs, "identical_images": identical,
        "speedup_per_repeat": ratios, "median_speedup": float(np.median(ratios)), "timeline": timeline,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    Path(f"{out}_raw.log").write_text("\n".join(log) + "\n")
    plot_timeline(timeline, f"{out}_timeline.png",
                  f"FREE L={args.window}, two micro-batches of {(args.n + 1) // 2}, {args.backend} "
                  f"({args.threads} thread/call)", until=None)
    med = {n: float(np.median([r["wall_s"] for r in runs[n]])) for n in names}
    two = runs[names[1]]
    md = [f"# Overlapped micro-batches: FREE on the digits DiT ({args.backend}, CPU)", "",
          f"Guided FREE's draft guidance: {record['draft_guidance'] or 'n/a'}; verifier: {record['verifier']}.", "",
          f"Command: `{record['command']}`. Raw log: `{out.name}_raw.log`. Timeline: `{out.name}_timeline.png`.", "",
          "| configuration | median wall s | draft busy s | verify busy s | draft/verify overlap s |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {n} | {med[n]:.2f} | " + (" | ".join(f"{np.median([r.get(k, 0) for r in runs[n]]):.2f}"
           for k in ("draft_busy_s", "verify_busy_s", "draft_verify_overlap_s"))) + " |" for n in names]
    md += ["", "Wall-clock speed-up of overlapping, per repeat (same run, interleaved): "
           + ", ".join(f"{r:.2f}x" for r in ratios) + f"; median {np.median(ratios):.2f}x. "
           f"Images identical: {identical}. Draft time hidden behind verification: "
           f"{np.median([r['draft_verify_overlap_s'] for r in two]):.2f} s of "
           f"{np.median([r['draft_busy_s'] for r in two]):.2f} s."]
    Path(f"{out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
