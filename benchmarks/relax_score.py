"""FREE (relax): which score tracks rejection, and what each buys (speed-up against quality).

    python -m freedit.benchmarks.relax_score --steps 250 --n 256 --window 8 --out benchmarks/results/relax_score

1. Correlation: one lossless FREE run records, for every draft decided, each relax score
   (round_numpy.draft_gap, round_numpy.uncertainty) and the exact test's rejection probability
   1 - min(1, q/p); Pearson correlations are reported per band of respaced steps and overall.
2. Curve: for each score and lambda, FREE (relax) on the bundled digits DiT (N images, fixed seed)
   gives the NFE speed-up, FD-digits and class accuracy, beside the sequential sampler and
   lossless FREE from the same seed. Entries are saved as they finish; a rerun skips them.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from freedit.benchmarks import add_draft_guidance_argument, applied_rules, command_line
from freedit.benchmarks.lossless_power import digits_pipeline
from freedit.benchmarks.quality import DigitsClassifier, evaluate
from freedit.runtime.contract import RELAX_SCORES
from freedit.runtime.outputs import check_output_folder, write_outputs
from freedit.runtime.pipeline import default_model_dir
from freedit.runtime.round_numpy import NumpyRoundMaths, draft_gap, uncertainty

BANDS = 10


@contextmanager
def recording_decisions(rows: list):
    """Per draft decided inside the block: (respaced step, gap, variance score, log r)."""
    original = NumpyRoundMaths.decide

    def decide(self, ws, n_rows, lane):
        original(self, ws, n_rows, lane)
        draft = np.flatnonzero(ws["row_pos"][:n_rows] >= 1)
        q, st = draft - 1, ws["row_step"][draft - 1]
        gap = draft_gap(ws["mean_p"][draft], ws["mean_q"][q], ws["log_var_q"][q])
        var = uncertainty(ws["log_var_q"][q], ws.settings.schedule, st)
        rows.append(np.stack([st, gap, var, ws["log_r"][draft]], axis=1))

    NumpyRoundMaths.decide = decide
    try:
        yield rows
    finally:
        NumpyRoundMaths.decide = original


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else None


def correlations(pipe, n: int, steps: str, window: int, seed: int, draft_guidance: str | None = None) -> dict:
    rows: list = []
    with recording_decisions(rows):
        pipe.generate(np.arange(n) % 10, sampler="free", steps=steps, seed=seed, window=window, maths="numpy",
                      progress=True, draft_guidance=draft_guidance, verifier="step")  # relax's per-step test
    a = np.concatenate(rows)
    st, scores = a[:, 0].astype(int), {"gap": a[:, 1], "variance": a[:, 2]}
    reject = 1.0 - np.exp(np.minimum(0.0, a[:, 3]))
    bands = []
    for part in np.array_split(np.unique(st), BANDS):
        if not len(part):  # fewer drafted steps than bands (a short schedule): fewer bands
            continue
        m = np.isin(st, part)
        bands.append({"steps": [int(part[0]), int(part[-1])], "drafts": int(m.sum()),
                      "rejection": float(reject[m].mean()),
                      **{f"mean_{k}": float(v[m].mean()) for k, v in scores.items()},
                      **{f"corr_{k}": _corr(v[m], reject[m]) for k, v in scores.items()}})
    return {"n": n, "drafts": len(a), "overall": {k: _corr(v, reject) for k, v in scores.items()},
            "within_band_mean": {k: float(np.mean([b[f"corr_{k}"] for b in bands if b[f"corr_{k}"] is not None]))
                                 for k in scores},
            "bands": bands}


def curve_entry(pipe, classifier, labels, steps: str, window: int, seed: int, sampler: str, relax: float = 0.0,
                score: str | None = None, draft_guidance: str | None = None) -> dict:
    t0 = time.perf_counter()
    # Relax verifies per step, so its lambda = 0 anchor does too, whatever the model's default verifier.
    kw = (dict(window=window, relax=relax, relax_score=score, draft_guidance=draft_guidance, verifier="step")
          if sampler != "sequential" else {})
    result = pipe.generate(labels, sampler=sampler, steps=steps, seed=seed, progress=True, **kw)
    m = evaluate(result.samples, labels, classifier=classifier)
    s = result.summary
    return {"sampler": sampler, "score": score, "lambda": relax, "acceptance": s.get("acceptance"),
            "nfe_speedup": s["nfe_speedup"], "fd_digits": m["fd_digits"], "class_accuracy": m["class_accuracy"],
            "cpu_seconds": round(time.perf_counter() - t0, 1),
            **applied_rules(result)}


def markdown(report: dict) -> str:
    c = report["correlation"]
    seq = next((e for e in report["curve"] if e["sampler"] == "sequential"), None)
    out = [f"# FREE (relax) scores: {report['steps']} steps, L = {report['window']}, CFG {report['cfg_scale']}, "
           f"N = {report['n']}", "", f"Command: `{report['command']}`  ",
           f"Guided FREE's draft guidance: {report.get('draft_guidance', 'drafter')}", "",
           f"## Correlation with the exact test's rejection probability (lossless FREE, {c['n']} images, "
           f"{c['drafts']} drafts)", "",
           "| respaced steps | drafts | mean rejection | mean gap | corr gap | mean variance score | corr variance |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
    for b in c["bands"]:
        out.append(f"| {b['steps'][0]}-{b['steps'][1]} | {b['drafts']} | {b['rejection']:.3f} | {b['mean_gap']:.3f} | "
                   f"{fmt(b['corr_gap'])} | {b['mean_variance']:.4f} | {fmt(b['corr_variance'])} |")
    out += ["", f"Overall: gap {fmt(c['overall']['gap'])}, variance {fmt(c['overall']['variance'])}; mean of the "
            f"within-band correlations: gap {fmt(c['within_band_mean']['gap'])}, variance "
            f"{fmt(c['within_band_mean']['variance'])}.", "", "## lambda -> speed-up and quality", "",
            "| sampler | score | lambda | acceptance | NFE speed-up | FD-digits | FD / sequential | class accuracy |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(report["curve"], key=lambda e: (e["sampler"] != "sequential", e["score"] or "", e["lambda"])):
        ratio = f"{e['fd_digits'] / seq['fd_digits']:.3f}" if seq else ""
        acc = "" if e["acceptance"] is None else f"{e['acceptance']:.3f}"
        out.append(f"| {e['sampler']} | {e['score'] or ''} | {e['lambda']:g} | {acc} | {e['nfe_speedup']:.2f} | "
                   f"{e['fd_digits']:.2f} | {ratio} | {e['class_accuracy']:.3f} |")
    return "\n".join(out) + "\n"


def plot(report: dict) -> bytes | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    bands = report["correlation"]["bands"]
    mid = [np.mean(x["steps"]) for x in bands]
    for k in RELAX_SCORES:
        a.plot(mid, [np.nan if x[f"corr_{k}"] is None else x[f"corr_{k}"] for x in bands], "o-", label=k)
    a.axhline(0, color="grey", lw=0.8)
    a.set_xlabel("respaced step (band centre)")
    a.set_ylabel("Pearson r with 1 - min(1, q/p)")
    a.set_title("score vs rejection, per step band")
    a.legend()
    seq = next((e for e in report["curve"] if e["sampler"] == "sequential"), None)
    free = [e for e in report["curve"] if e["sampler"] == "free"]
    for k in RELAX_SCORES:
        pts = sorted([e for e in report["curve"] if e["score"] == k and e["sampler"] == "free-relax"] + free,
                     key=lambda e: e["nfe_speedup"])
        if pts:
            b.plot([e["nfe_speedup"] for e in pts], [e["fd_digits"] for e in pts], "o-", label=f"relax, {k}")
            for e in pts:
                b.annotate(f"{e['lambda']:g}", (e["nfe_speedup"], e["fd_digits"]), fontsize=7)
    if seq:
        b.axhspan(seq["fd_digits"], 1.1 * seq["fd_digits"], color="green", alpha=0.15, label="sequential .. +10%")
    b.set_xlabel("NFE speed-up (serial DiT calls)")
    b.set_ylabel("FD-digits (lower is better)")
    b.set_title("lambda curve (labels: lambda)")
    if b.get_legend_handles_labels()[0]:  # a partial run may have no curve yet
        b.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated numbers, got {text!r}") from None
    if any(not np.isfinite(v) or v <= 0 for v in values):
        raise SystemExit(f"error: lambdas must be positive, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="250")
    parser.add_argument("--n", type=int, default=256, help="images per curve entry")
    parser.add_argument("--corr-n", type=int, default=64, help="images of the correlation run")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap-lambdas", default="0.25,0.5,1,2")
    parser.add_argument("--variance-lambdas", default="8,16,32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/relax_score", help="writes OUT.json, OUT.md, OUT.png")
    add_draft_guidance_argument(parser)
    args = parser.parse_args(argv)
    lambdas = {"gap": _floats(args.gap_lambdas), "variance": _floats(args.variance_lambdas)}
    out = Path(args.out)
    check_output_folder(out.parent)
    path = Path(f"{out}.json")
    pipe = digits_pipeline(default_model_dir() / "drafter.onnx", args.threads)
    header = {"steps": args.steps, "n": args.n, "window": args.window, "seed": args.seed,
              "cfg_scale": pipe.defaults["cfg_scale"],
              # resolved, so that a rerun skips only entries made with the same rule (older runs: drafter)
              "draft_guidance": args.draft_guidance or pipe.defaults["draft_guidance"]}
    report = json.loads(path.read_text()) if path.is_file() else {}
    recorded = {"draft_guidance": "drafter", **report}  # runs from before the option used the drafter rule
    if report and any(recorded.get(k) != v for k, v in header.items()):
        raise SystemExit(f"error: {path} holds a run with other settings; choose another --out")
    report.update(header)
    report["command"] = command_line("freedit.benchmarks.relax_score", argv)
    report.setdefault("curve", [])

    def save():
        files = {path: json.dumps(report, indent=1).encode()}
        if "correlation" in report:
            files[Path(f"{out}.md")] = markdown(report).encode()
            png = plot(report)
            if png:
                files[Path(f"{out}.png")] = png
        write_outputs(files)

    if "correlation" not in report:
        report["correlation"] = correlations(pipe, args.corr_n, args.steps, args.window, args.seed + 1,
                                             args.draft_guidance)
        save()
        print(json.dumps({"correlation": report["correlation"]["within_band_mean"]}), flush=True)
    classifier = DigitsClassifier.load()
    labels = np.arange(args.n) % 10
    todo = [("sequential", 0.0, None), ("free", 0.0, None)] + [("free-relax", lam, k) for k in RELAX_SCORES
                                                                 for lam in lambdas[k]]
    for sampler, lam, score in todo:
        if any(e["sampler"] == sampler and e["lambda"] == lam and e["score"] == score for e in report["curve"]):
            continue
        entry = curve_entry(pipe, classifier, labels, args.steps, args.window, args.seed, sampler, lam, score,
                            args.draft_guidance)
        report["curve"].append(entry)
        save()
        print(json.dumps(entry), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
