"""Acceptance where users sample: FREE and frozen across step counts, CFG scales, windows and drafters.

    python -m freedit.benchmarks.acceptance_matrix --out benchmarks/results/acceptance_matrix \
        2>&1 | tee -a benchmarks/results/acceptance_matrix_raw.log

For steps x CFG scale x sampler (free, frozen) x L x drafter (new, old): acceptance (overall and
by timestep), mean serial DiT calls per image, NFE speed-up, class accuracy and FD-digits, N
images per entry with fixed labels and seed. The sequential sampler runs the same settings over
several seeds: the spread of its FD-digits and class accuracy is what "within the sequential
sampler's seed-to-seed spread" means for the lossless entries. Each distinct lossless run is also
tested against those seeds (class errors: Fisher exact against the pooled seeds; FD-digits: the
t prediction interval of the seeds), with Holm's correction over the whole matrix, since a
mean +- 2 std band alone lets about 1 exact entry in 20 out by construction.

Resumable: entries already in <out>.json (same N and seed) are skipped, and the JSON is rewritten
after every entry, so an interrupted run continues where it stopped. The frozen sampler uses no
drafter: its entry is computed once and recorded under each drafter label. Writes <out>.json,
<out>.md and <out>.png (NFE speed-up by step count; acceptance by timestep).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from freedit.benchmarks import add_draft_guidance_argument, applied_rules, command_line
from freedit.benchmarks.biased_rules import RULES
from freedit.benchmarks.quality import DigitsClassifier, evaluate
from freedit.benchmarks.two_sample import error_count_test, holm, prediction_t_test
from freedit.benchmarks.lossless_power import digits_pipeline
from freedit.runtime.outputs import write_outputs
from freedit.runtime.pipeline import Pipeline, default_model_dir
from freedit.runtime.schedule import Schedule

#: The issue's targets for lossless FREE with the new drafter at CFG 1.5, at its best L.
TARGETS = {250: 4.5, 100: 2.5, 50: 2.0}
#: CFG 4.0 must reach this share of the CFG 1.5 figure.
CFG4_SHARE = 0.85
#: Family-wise level of the per-run consistency tests against the sequential seeds.
ALPHA = 0.05
#: raw p of each tested figure -> the key of its Holm-adjusted p
TESTED = {"class_accuracy_p": "class_accuracy_holm_p", "fd_digits_p": "fd_digits_holm_p"}
#: new: the shipped drafter, trained across settings; old: the first one (250 steps, CFG 1.5, trained on
#: misaligned targets), kept as drafter_v1.* for the figures recorded with it.
DEFAULT_DRAFTERS = f"new={default_model_dir() / 'drafter.onnx'},old={default_model_dir() / 'drafter_v1.onnx'}"


def _csv(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def labelled_paths(text: str) -> dict[str, Path]:
    out = {}
    for item in _csv(text):
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise ValueError(f"--drafters wants LABEL=PATH items with existing files, got {item!r}")
        out[label] = Path(path)
    return out


#: entries: lossless FREE and frozen; sequential: the reference seeds; biased: FREE under a deliberately
#: biased rule (--rules), run only to show that the consistency screen can fail.
TABLES = ("entries", "sequential", "biased")
#: The matrix runs the per-step verifier, which block-unclipped would leave unchanged.
STEP_RULES = [r for r in RULES if r != "block-unclipped"]


def _key(entry: dict) -> tuple:
    return (entry["steps"], float(entry["cfg_scale"]), entry["sampler"], entry.get("window"), entry.get("drafter"),
            entry.get("seed"), entry.get("rule"))


class Matrix:
    """The JSON report on disk, entry by entry."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old and (old.get("n"), old.get("seed")) != (header["n"], header["seed"]):
            raise SystemExit(f"error: {path} holds N = {old.get('n')}, seed {old.get('seed')}; resuming it needs the "
                             f"same --n and --seed (or give another --out)")
        self.report = {**header, **{table: old.get(table, []) for table in TABLES}}
        self.done = {_key(e) for table in TABLES for e in self.report[table]}

    def has(self, **key) -> bool:
        return _key(key) in self.done

    def merge(self, path: Path) -> int:
        """Take the entries of another run of this matrix (same N and seed) that this one lacks."""
        other = json.loads(path.read_text())
        if (other.get("n"), other.get("seed")) != (self.report["n"], self.report["seed"]):
            raise SystemExit(f"error: {path} holds N = {other.get('n')}, seed {other.get('seed')}; cannot merge it")
        taken = 0
        for table in TABLES:
            for e in other.get(table, []):
                if _key(e) not in self.done:
                    self.report[table].append(e)
                    self.done.add(_key(e))
                    taken += 1
        self.save()
        return taken

    def find(self, **key) -> dict | None:
        """An entry matching ``key`` under any drafter label."""
        return next((e for e in self.report["entries"] if all(e.get(k) == v for k, v in key.items())), None)

    def add(self, table: str, entry: dict) -> None:
        self.report[table].append(entry)
        self.done.add(_key(entry))
        self.save()

    def save(self) -> None:
        # Every recorded seed counts: a later run with fewer --spread-seeds (e.g. for the costly
        # 250-step settings) does not drop the seeds an earlier run recorded.
        self.report["spread"] = sequential_spread(self.report["sequential"])
        self.report["spread_self_check"] = sequential_self_check(self.report["sequential"])
        self.report["consistency"] = consistency(self.report["entries"], self.report["sequential"],
                                                 self.report["biased"])
        write_outputs({self.path: json.dumps(self.report, indent=1).encode()})


def sequential_spread(rows: list[dict]) -> dict:
    """Per (steps, CFG): mean, std (ddof 1), min and max of FD-digits and class accuracy over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['steps']}@{r['cfg_scale']:g}", []).append(r)
    out = {}
    for name, rs in groups.items():
        out[name] = {"seeds": [r["seed"] for r in rs]}
        for metric in ("fd_digits", "class_accuracy"):
            v = np.array([r[metric] for r in rs])
            out[name][metric] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                 "min": float(v.min()), "max": float(v.max())}
    return out


def run_label(entry: dict) -> str:
    """One sampled run: the frozen sampler's entry is listed under every drafter but was run once."""
    drafter = f"/{entry['drafter']}" if entry["sampler"] == "free" else ""
    rule = f"/rule {entry['rule']}" if entry.get("rule") else ""
    return (f"{entry['steps']}/{entry['cfg_scale']:g}/{entry['sampler']}/L={entry['window']}{drafter}{rule}"
            f"/seed {entry['seed']}")


def _errors(row: dict) -> int:
    return round(row["n"] * (1 - row["class_accuracy"]))


def _tested_runs(entries: list[dict], refs: dict[tuple, list[dict]]) -> dict[str, dict]:
    """Raw p of each distinct run (with reference seeds) and its Holm-adjusted p over all of them."""
    runs: dict[str, dict] = {}
    for e in entries:
        ref = refs.get((e["steps"], e["cfg_scale"]), [])
        if len(ref) >= 2 and run_label(e) not in runs:
            runs[run_label(e)] = {
                "class_accuracy_p": error_count_test(_errors(e), e["n"], sum(map(_errors, ref)), sum(r["n"] for r in ref)),
                "fd_digits_p": prediction_t_test(e["fd_digits"], [r["fd_digits"] for r in ref]), "seeds": len(ref)}
    names = [(label, metric) for label in runs for metric in TESTED]
    for (label, metric), q in zip(names, holm([runs[label][m] for label, m in names]) if names else ()):
        runs[label][TESTED[metric]] = float(q)
    return runs


def consistency(entries: list[dict], sequential: list[dict], biased: list[dict] = ()) -> dict:
    """Each distinct lossless run against the sequential seeds of its setting: two-sided p of its class
    errors (Fisher exact, seeds pooled) and of its FD-digits (t prediction interval), then Holm over
    every test in the matrix. Under exactness at most about ALPHA of the raw p fall below ALPHA; a
    bias shows as a Holm-adjusted p below ALPHA. Each biased run is screened as if it were one more
    entry of the matrix ("flagged": the matrix's verdict would then be "no" because of it)."""
    refs: dict[tuple, list[dict]] = {}
    for r in sequential:
        refs.setdefault((r["steps"], r["cfg_scale"]), []).append(r)
    runs = _tested_runs(entries, refs)
    holm_p = [r[TESTED[m]] for r in runs.values() for m in TESTED]
    screened = {}
    for b in biased:
        r = _tested_runs([*entries, b], refs).get(run_label(b))
        if r:
            screened[run_label(b)] = {**r, "flagged": min(r[TESTED[m]] for m in TESTED) < ALPHA}
    return {"alpha": ALPHA, "tests": len(holm_p), "below_alpha": sum(r[m] < ALPHA for r in runs.values() for m in TESTED),
            "expected_below_alpha_at_most": ALPHA * len(holm_p), "min_holm_p": min(holm_p, default=None),
            "consistent": all(q >= ALPHA for q in holm_p), "runs": runs, "biased": screened}


def run_entry(pipe: Pipeline, classifier, labels, verifier: str = "step", **kwargs) -> dict:
    """One run and its figures; ``verifier``: the matrix is per-step verification's, whatever the model's
    default (block_verification.py passes both)."""
    t0 = time.perf_counter()
    result = pipe.generate(labels, progress=True, verifier=verifier, **kwargs)
    metrics = evaluate(result.samples, labels, classifier=classifier)
    s = result.summary
    entry = {"steps": kwargs["steps"], "cfg_scale": float(kwargs["cfg_scale"]), "sampler": kwargs["sampler"],
             "n": len(labels), "acceptance": s.get("acceptance"), "nfe_speedup": s["nfe_speedup"],
             "mean_target_calls": s["mean_target_calls"], "fd_digits": metrics["fd_digits"],
             "class_accuracy": metrics["class_accuracy"], "cpu_seconds": time.perf_counter() - t0,
             **applied_rules(result)}
    if "acceptance_by_step" in s:
        timesteps = Schedule.create(str(kwargs["steps"])).timesteps
        entry["acceptance_by_step"] = {str(k): v for k, v in s["acceptance_by_step"].items()}
        entry["acceptance_by_timestep"] = {str(int(timesteps[int(k)])): v for k, v in s["acceptance_by_step"].items()}
        entry["residual_cap_hits"] = s["residual_cap_hits"]
        entry["residual_proposals"] = s["residual_proposals"]
    return entry


def _log(entry: dict) -> None:
    print(json.dumps({k: v for k, v in entry.items() if not k.startswith("acceptance_by")}), flush=True)


def sequential_self_check(rows: list[dict]) -> dict:
    """The band test applied to the reference itself: each sequential seed against the band of the other seeds
    of its setting (leave one out). An exact sampler's entries fall outside about as often as these do."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["steps"], float(r["cfg_scale"])), []).append(r)
    checked, outside = 0, []
    for (steps, cfg), rs in sorted(groups.items()):
        if len(rs) < 3:  # the others need a std
            continue
        for i, r in enumerate(rs):
            band = next(iter(sequential_spread(rs[:i] + rs[i + 1:]).values()))
            checked += 1
            if not all(within(r[m], band[m]) for m in ("fd_digits", "class_accuracy")):
                outside.append(f"{steps}/{cfg:g}/seed {r['seed']}")
    return {"checked": checked, "outside": len(outside), "outside_seeds": outside}


def within(value: float, band: dict, k: float = 2.0) -> bool:
    """Inside mean +- k std of the sequential seeds, or inside their observed range."""
    return band["mean"] - k * band["std"] <= value <= band["mean"] + k * band["std"] or band["min"] <= value <= band["max"]


def best_free(entries: list[dict], drafter: str, steps: int, cfg: float) -> dict | None:
    rows = [e for e in entries if e["sampler"] == "free" and e["drafter"] == drafter and e["steps"] == steps
            and e["cfg_scale"] == cfg]
    return max(rows, key=lambda e: e["nfe_speedup"]) if rows else None


def markdown(report: dict, stem: str) -> str:
    from scipy.stats import t as student

    entries, spread = report["entries"], report["spread"]
    tests = report["consistency"]  # Matrix.save computed it
    drafters = sorted({e["drafter"] for e in entries})
    lines = [f"# Acceptance matrix: the digits DiT, N = {report['n']} per entry, seed {report['seed']}", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']['platform']}, "
             f"{report['machine']['cpu_count']} CPU cores, ONNX Runtime {report['machine']['onnxruntime']} (CPU)", "",
             "Lossless FREE and the frozen-target baseline across step counts, CFG scales and windows L, with the "
             "new (multi-setting) and the old (250 steps, CFG 1.5) drafter. NFE speed-up = steps / serial DiT calls "
             "per image. The frozen sampler uses no drafter: its rows are one run, listed under both drafters. "
             "\"guidance\": where FREE's guided drafts take their guidance from (`draft_guidance`): parent (the "
             "conditional row drafted, the last verified state's cond - null gap) or drafter (both rows drafted; "
             "entries recorded before the option existed).", "",
             "## Targets (lossless FREE, new drafter, best L in the matrix)", "",
             "| steps | CFG 1.5 best | target | met | CFG 4.0 best | share of CFG 1.5 | met (>= 85%) | old drafter, CFG 1.5 / 4.0 |",
             "|---:|---:|---:|:---:|---:|---:|:---:|---:|"]
    for steps in sorted({e["steps"] for e in entries}):
        a, b = best_free(entries, "new", steps, 1.5), best_free(entries, "new", steps, 4.0)
        oa, ob = best_free(entries, "old", steps, 1.5), best_free(entries, "old", steps, 4.0)
        if not a:
            continue
        target = TARGETS.get(steps)
        share = b["nfe_speedup"] / a["nfe_speedup"] if b else None
        old = " / ".join(f"{o['nfe_speedup']:.2f}x (L={o['window']})" if o else "-" for o in (oa, ob))
        lines.append(f"| {steps} | {a['nfe_speedup']:.2f}x (L={a['window']}) | {f'{target:g}x' if target else '-'} | "
                     f"{('yes' if a['nfe_speedup'] >= target else 'no') if target else '-'} | "
                     + (f"{b['nfe_speedup']:.2f}x (L={b['window']}) | {share:.0%} | {'yes' if share >= CFG4_SHARE else 'no'} | "
                        if b else "- | - | - | ") + f"{old} |")
    lines += ["", "## Sequential seed-to-seed spread", "",
              "| steps | CFG | seeds | FD-digits mean ± std [min, max] | FD-digits 95% prediction interval | "
              "class accuracy mean ± std [min, max] |", "|---:|---:|---:|---|---|---|"]
    for name, s in sorted(spread.items(), key=lambda kv: (int(kv[0].split("@")[0]), float(kv[0].split("@")[1]))):
        steps, cfg = name.split("@")
        fd, acc, k = s["fd_digits"], s["class_accuracy"], len(s["seeds"])
        half = student.ppf(1 - ALPHA / 2, k - 1) * fd["std"] * np.sqrt(1 + 1 / k) if k > 1 else float("nan")
        lines.append(f"| {steps} | {cfg} | {k} | {fd['mean']:.2f} ± {fd['std']:.2f} [{fd['min']:.2f}, "
                     f"{fd['max']:.2f}] | [{fd['mean'] - half:.2f}, {fd['mean'] + half:.2f}] | "
                     f"{acc['mean']:.3f} ± {acc['std']:.3f} [{acc['min']:.3f}, {acc['max']:.3f}] |")
    outside = []
    lines += ["", "## Every entry", "",
              "\"in spread\": FD-digits and class accuracy inside the sequential seeds' mean ± 2 std or their range. "
              "\"p acc.\" / \"p FD\": two-sided p of the run against the sequential seeds of its setting (class errors: "
              "Fisher exact against the pooled seeds; FD-digits: t prediction interval), before Holm's correction.", "",
              "| steps | CFG | sampler | L | drafter | guidance | acceptance | serial DiT calls / image | NFE speed-up | "
              "class acc. | FD-digits | in spread | p acc. | p FD |",
              "|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    order = lambda e: (e["steps"], e["cfg_scale"], e["sampler"], e["window"], drafters.index(e["drafter"]))  # noqa: E731
    for e in sorted(entries, key=order):
        band = spread.get(f"{e['steps']}@{e['cfg_scale']:g}")
        ok = None if band is None else within(e["fd_digits"], band["fd_digits"]) and within(
            e["class_accuracy"], band["class_accuracy"])
        if ok is False:
            outside.append(e)
        guidance = e.get("draft_guidance", "drafter") if e["sampler"] == "free" else ""
        run = tests["runs"].get(run_label(e))
        lines.append(f"| {e['steps']} | {e['cfg_scale']:g} | {e['sampler']} | {e['window']} | {e['drafter']} | "
                     f"{guidance} | {e['acceptance']:.3f} | {e['mean_target_calls']:.1f} | {e['nfe_speedup']:.2f}x | "
                     f"{e['class_accuracy']:.3f} | {e['fd_digits']:.2f} | {'' if ok is None else 'yes' if ok else 'no'} | "
                     + (f"{run['class_accuracy_p']:.3f} | {run['fd_digits_p']:.3f} |" if run else " | |"))
    lines += ["", f"Entries outside the sequential spread: {len(outside)} of {len(entries)}"
              + (": " + ", ".join(f"{e['steps']}/{e['cfg_scale']:g}/{e['sampler']}/L={e['window']}/{e['drafter']}"
                                  for e in outside) if outside else "") + "."]
    own = report.get("spread_self_check")
    if own and own["checked"]:
        lines.append(f"The same band applied to the sequential sampler itself (each seed against the other seeds of "
                     f"its setting): {own['outside']} of {own['checked']} outside ({own['outside'] / own['checked']:.0%}"
                     f", against {len(outside) / max(len(entries), 1):.0%} of the entries above). An exact sampler's "
                     "entries fall outside this band about as often as the reference's own seeds do.")
    lines.append("")
    if tests["tests"]:
        p, label, metric = min((r[m], label, m) for label, r in tests["runs"].items() for m in TESTED)
        lines += ["## Consistency with the sequential sampler, tested", "",
                  f"{len(tests['runs'])} distinct runs, {tests['tests']} tests (class errors and FD-digits of each). "
                  f"Raw p below {ALPHA:g}: {tests['below_alpha']} (an exact sampler gives at most about "
                  f"{tests['expected_below_alpha_at_most']:.1f}: Fisher's test on a handful of errors is conservative, "
                  f"and runs that share a seed and labels are correlated). Smallest raw p: {p:.3f} ({label}, "
                  f"{'class errors' if metric == 'class_accuracy_p' else 'FD-digits'}); Holm-adjusted: "
                  f"{tests['runs'][label][TESTED[metric]]:.3f}. Every run consistent with the "
                  f"sequential sampler at family-wise level {ALPHA:g}: **{'yes' if tests['consistent'] else 'no'}**.", "",
                  "These figures can only see a gross bias (the prediction interval above is the FD-digits shift one "
                  "entry must show); a subtle one is the transition tests' job (lossless_power_*).", ""]
    if tests["biased"]:
        lines += ["### Can the screen fail? FREE under deliberately biased rules", "",
                  "Each run is screened as one more entry of the matrix (benchmarks/biased_rules.py; numpy maths): "
                  "\"flagged\" means its Holm-adjusted p is below the family-wise level, which would turn the verdict "
                  "above to no.", "",
                  "| steps | CFG | L | drafter | rule | acceptance | NFE speed-up | class acc. | FD-digits | p acc. | p FD "
                  "| flagged |", "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
        for b in sorted(report["biased"], key=lambda e: (e["rule"], *order(e))):
            r = tests["biased"].get(run_label(b))
            if r:
                lines.append(f"| {b['steps']} | {b['cfg_scale']:g} | {b['window']} | {b['drafter']} | {b['rule']} | "
                             f"{b['acceptance']:.3f} | {b['nfe_speedup']:.2f}x | {b['class_accuracy']:.3f} | "
                             f"{b['fd_digits']:.2f} | {r['class_accuracy_p']:.2g} | {r['fd_digits_p']:.2g} | "
                             f"{'yes' if r['flagged'] else 'no'} |")
        lines.append("")
    lines.append(f"![NFE speed-up and acceptance]({stem}.png)")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["entries"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    steps = sorted({e["steps"] for e in entries})
    for drafter, style in (("new", "-"), ("old", "--")):
        for cfg, color in ((1.5, "C0"), (4.0, "C3")):
            best = [best_free(entries, drafter, s, cfg) for s in steps]
            xs = [s for s, b in zip(steps, best) if b]
            if xs:
                ax.plot(xs, [b["nfe_speedup"] for b in best if b], style, color=color, marker="o",
                        label=f"free, {drafter} drafter, CFG {cfg:g} (best L)")
    for cfg, color in ((1.5, "C0"), (4.0, "C3")):
        rows = [max((e for e in entries if e["sampler"] == "frozen" and e["steps"] == s and e["cfg_scale"] == cfg),
                    key=lambda e: e["nfe_speedup"], default=None) for s in steps]
        xs = [s for s, r in zip(steps, rows) if r]
        if xs:
            ax.plot(xs, [r["nfe_speedup"] for r in rows if r], ":", color=color, marker="x", label=f"frozen, CFG {cfg:g}")
    ax.plot(sorted(TARGETS), [TARGETS[s] for s in sorted(TARGETS)], "k*", markersize=11, label="target (CFG 1.5)")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels (3x10^1 ...) only clutter it
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("NFE speed-up (steps / serial DiT calls)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for e in entries:  # acceptance by timestep of lossless FREE, L = 8, CFG 1.5
        if e["sampler"] == "free" and e["window"] == 8 and e["cfg_scale"] == 1.5:
            by_t = sorted((int(t), a) for t, a in e["acceptance_by_timestep"].items())
            t, a = np.array(by_t).T
            width = max(1, len(t) // 25)
            smooth = np.convolve(a, np.ones(width) / width, mode="same")
            bx.plot(t, smooth, "-" if e["drafter"] == "new" else "--", label=f"{e['steps']} steps, {e['drafter']}")
    if not bx.lines:
        bx.text(0.5, 0.5, "no free L=8 CFG 1.5 entry yet", ha="center", transform=bx.transAxes)
    bx.set_xlabel("original timestep of the drafted transition (999 = pure noise)")
    bx.set_ylabel("acceptance (free, L = 8, CFG 1.5)")
    bx.invert_xaxis()
    bx.set_ylim(0, 1.02)
    bx.grid(alpha=0.3)
    if bx.lines:
        bx.legend(fontsize=7, ncol=2)
    fig.suptitle("FREE on the digits DiT: where users sample")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images per entry (balanced classes)")
    parser.add_argument("--steps", default="25,50,100,250")
    parser.add_argument("--cfg-scales", default="1.5,4")
    parser.add_argument("--windows", default="2,4,8")
    parser.add_argument("--samplers", default="free,frozen")
    parser.add_argument("--drafters", default=DEFAULT_DRAFTERS, help="LABEL=drafter.onnx, comma separated")
    parser.add_argument("--spread-seeds", type=int, default=5, help="sequential runs per setting (seeds 0..K-1) "
                        "that this invocation makes sure exist")
    parser.add_argument("--seed", type=int, default=0, help="seed of every FREE/frozen entry")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--out", default="benchmarks/results/acceptance_matrix")
    add_draft_guidance_argument(parser)
    parser.add_argument("--rules", default="", help="biased decide rules (benchmarks/biased_rules.py: "
                        f"{', '.join(STEP_RULES)}) to run FREE under at every setting, to show what the consistency "
                        "screen catches; recorded apart from the lossless entries")
    parser.add_argument("--merge", default="", help="JSON files of other runs of this matrix (e.g. parts run in "
                        "parallel with other --samplers/--steps) whose entries are taken in first")
    args = parser.parse_args(argv)
    steps, cfgs, windows = _csv(args.steps, int), _csv(args.cfg_scales, float), _csv(args.windows, int)
    samplers = _csv(args.samplers)  # may be empty: only the sequential spread (or only a merge)
    rules = _csv(args.rules)
    if set(rules) - set(STEP_RULES):
        raise SystemExit(f"error: unknown --rules {sorted(set(rules) - set(STEP_RULES))}; choose from "
                         f"{', '.join(STEP_RULES)}")
    if set(samplers) - {"free", "frozen"} or min(windows) < 1 or min(steps) < 1 or args.n < 2 or args.spread_seeds < 0:
        raise SystemExit("error: samplers are free/frozen, windows and steps >= 1, n >= 2, spread seeds >= 0")
    drafters = labelled_paths(args.drafters)
    pipes = {label: digits_pipeline(path, args.threads) for label, path in drafters.items()}
    import onnxruntime

    out = Path(args.out)
    header = {"command": command_line("freedit.benchmarks.acceptance_matrix", argv),
              "n": args.n, "seed": args.seed, "batch_size": args.batch_size, "spread_seeds": args.spread_seeds,
              "drafters": {k: str(v) for k, v in drafters.items()},
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}}
    matrix = Matrix(Path(f"{out}.json"), header)
    for part in _csv(args.merge):
        print(json.dumps({"merged": part, "entries": matrix.merge(Path(part))}), flush=True)
    classifier = DigitsClassifier.load()
    labels = np.arange(args.n) % 10
    any_pipe = next(iter(pipes.values()))
    # Order: cheap and drafter-independent work first, so a partial run is already useful.
    for s in sorted(steps):
        for cfg in cfgs:
            for seed in range(args.spread_seeds):
                if not matrix.has(steps=s, cfg_scale=cfg, sampler="sequential", window=None, drafter=None, seed=seed):
                    entry = run_entry(any_pipe, classifier, labels, sampler="sequential", steps=s, cfg_scale=cfg,
                                      seed=seed, batch_size=args.batch_size)
                    matrix.add("sequential", {**entry, "seed": seed, "window": None, "drafter": None})
                    _log(matrix.report["sequential"][-1])
    for s in sorted(steps):
        for cfg in cfgs:
            for window in windows:
                for sampler in samplers:
                    todo = [d for d in pipes if not matrix.has(steps=s, cfg_scale=cfg, sampler=sampler, window=window,
                                                               drafter=d, seed=args.seed)]
                    if not todo:
                        continue
                    if sampler == "frozen":  # no drafter involved: one run serves every drafter label
                        entry = matrix.find(steps=s, cfg_scale=cfg, sampler=sampler, window=window, seed=args.seed)
                        entry = entry or run_entry(any_pipe, classifier, labels, sampler=sampler, steps=s,
                                                   cfg_scale=cfg, window=window, seed=args.seed,
                                                   batch_size=args.batch_size)
                        runs = [(d, entry) for d in todo]
                    else:
                        runs = [(d, run_entry(pipes[d], classifier, labels, sampler=sampler, steps=s, cfg_scale=cfg,
                                              window=window, seed=args.seed, batch_size=args.batch_size,
                                              draft_guidance=args.draft_guidance)) for d in todo]
                    for d, entry in runs:
                        matrix.add("entries", {**entry, "window": window, "drafter": d, "seed": args.seed,
                                               "uses_drafter": sampler == "free"})
                        _log(matrix.report["entries"][-1])
    for rule in rules:  # after the matrix itself: these runs are only the screen's power check
        for s, cfg, window, d in ((s, c, w, d) for s in sorted(steps) for c in cfgs for w in windows for d in pipes):
            if not matrix.has(steps=s, cfg_scale=cfg, sampler="free", window=window, drafter=d, seed=args.seed, rule=rule):
                with RULES[rule]():  # the rules override the numpy round's maths
                    entry = run_entry(pipes[d], classifier, labels, sampler="free", steps=s, cfg_scale=cfg,
                                      window=window, seed=args.seed, batch_size=args.batch_size,
                                      draft_guidance=args.draft_guidance, maths="numpy")
                matrix.add("biased", {**entry, "window": window, "drafter": d, "seed": args.seed, "rule": rule})
                _log(matrix.report["biased"][-1])
    matrix.save()
    write_outputs({Path(f"{out}.md"): markdown(matrix.report, out.name).encode()})
    plot(matrix.report, Path(f"{out}.png"))
    print(f"wrote {out}.json, {out}.md, {out}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
