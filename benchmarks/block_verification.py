"""Block verification against per-step verification, side by side on the bundled digits DiT.

    python -m freedit.benchmarks.block_verification --out benchmarks/results/block_verification \
        2>&1 | tee benchmarks/results/block_verification_raw.log

For each setting (steps, CFG scale, sampler, window L) both verifiers (DESIGN §3.3, §3.3.1) run on
the same labels and seed with the shipped drafter: NFE speed-up, acceptance (committed drafts per
drafted), residual proposals per image, FD-digits and class accuracy (N images each), and block's
NFE speed-up over step's. Quality is judged against the sequential sampler's seed-to-seed spread
recorded in benchmarks/results/acceptance_matrix.json (mean +- 2 std or the observed range).

The JSON is rewritten after every entry and entries already in it are skipped, so an interrupted
run continues; parts run in parallel (other --settings, other --out) are joined with --merge, and
--step-from takes the per-step runs the acceptance matrix already made (same drafter, N, seed and
draft guidance) instead of repeating them.
Writes <out>.json, <out>.md and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from freedit.benchmarks import add_draft_guidance_argument, command_line
from freedit.benchmarks.acceptance_matrix import run_entry, within
from freedit.benchmarks.lossless_power import digits_pipeline
from freedit.benchmarks.quality import DigitsClassifier
from freedit.runtime.contract import VERIFIERS
from freedit.runtime.outputs import write_outputs
from freedit.runtime.pipeline import default_model_dir

#: steps:cfg:sampler:L — where users sample, at the windows the acceptance matrix found best.
DEFAULT_SETTINGS = ("250:1.5:free:8,250:1.5:free:12,250:1.5:frozen:8,100:1.5:free:8,100:4:free:8,"
                    "100:1.5:frozen:8,50:1.5:free:4,50:1.5:free:8")
SPREAD = Path(__file__).resolve().parent / "results" / "acceptance_matrix.json"


def parse_settings(text: str) -> list[tuple[int, float, str, int]]:
    out = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            steps, cfg, sampler, window = item.split(":")
            setting = (int(steps), float(cfg), sampler, int(window))
        except ValueError:
            raise SystemExit(f"error: --settings wants steps:cfg:sampler:L items, got {item!r}") from None
        if sampler not in ("free", "frozen") or setting[0] < 2 or setting[3] < 1:
            raise SystemExit(f"error: {item!r}: sampler free or frozen, steps >= 2, L >= 1")
        out.append(setting)
    return out


def _key(e: dict) -> tuple:
    return (e["steps"], float(e["cfg_scale"]), e["sampler"], e["window"], e["verifier"])


def guidance(entry: dict) -> str | None:
    """The draft guidance of a guided FREE entry (drafter where none is recorded: made before the option); None for
    entries that draft no guidance (frozen, or CFG 1)."""
    if entry["sampler"] != "free" or float(entry["cfg_scale"]) == 1.0:
        return None
    return entry.get("draft_guidance", "drafter")


def rules(report: dict) -> set[str]:
    """The draft guidance of a report's guided FREE entries."""
    return {guidance(e) for e in report.get("entries", [])} - {None}


def pairs(entries: list[dict]) -> list[tuple[dict, dict]]:
    """(step entry, block entry) of every setting that has both, by steps, CFG, sampler and L (parts merge in any
    order)."""
    by = {_key(e): e for e in entries}
    return sorted(((e, by[_key(e)[:4] + ("block",)]) for e in entries
                   if e["verifier"] == "step" and _key(e)[:4] + ("block",) in by), key=lambda pair: _key(pair[0])[:4])


def matrix_step_entries(path: Path, drafter: Path, n: int, seed: int, batch_size: int,
                        rule: str) -> dict[tuple, dict]:
    """The per-step entries of an acceptance-matrix JSON that are the runs this report would make: same N, seed,
    batch size, drafter file and draft guidance, no biased rule (the matrix verifies per step), keyed like this
    report's."""
    if not path.is_file():
        raise SystemExit(f"error: --step-from {path} does not exist")
    matrix = json.loads(path.read_text())
    if (matrix.get("n"), matrix.get("seed"), matrix.get("batch_size")) != (n, seed, batch_size):
        raise SystemExit(f"error: {path} holds N = {matrix.get('n')}, seed {matrix.get('seed')}, batch size "
                         f"{matrix.get('batch_size')}; cannot take its per-step entries")
    labels = {label for label, p in matrix.get("drafters", {}).items() if Path(p).name == drafter.name}
    out = {}
    for e in matrix["entries"]:
        if (e["sampler"] == "free" and e["drafter"] not in labels) or guidance(e) not in (None, rule) \
                or "residual_proposals" not in e:  # entries recorded before the count existed cannot fill a row
            continue
        entry = {k: v for k, v in e.items() if k not in ("acceptance_by_step", "drafter", "uses_drafter")}
        entry.update(verifier="step", residual_proposals_per_image=e["residual_proposals"] / n, taken_from=path.name)
        out[_key(entry)] = entry
    return out


def markdown(report: dict, stem: str) -> str:
    spread = report.get("spread", {})
    taken = sorted({e["taken_from"] for e in report["entries"] if "taken_from" in e})
    lines = [f"# Block vs per-step verification: the digits DiT, N = {report['n']} per entry, seed {report['seed']}", "",
             f"Command: `{report['command']}`  ",
             *[f"Part {name}: `{command}`  " for name, command in report.get("parts", {}).items()],
             f"Machine: {report['machine']['platform']}, "
             f"{report['machine']['cpu_count']} CPU cores, ONNX Runtime {report['machine']['onnxruntime']} (CPU)", "",
             f"Drafter: `{Path(report['drafter']).name}`{' (' + report['drafter_note'] + ')' if 'drafter_note' in report else ''}.  ",
             f"Guided FREE's draft guidance: {', '.join(sorted(rules(report))) or 'n/a'}.  ",
             *([f"Per-step rows marked * were taken from {', '.join(taken)}, not rerun: the same runs (labels, "
                "seed, drafter and rule).  "] if taken else []),
             "",
             "Same labels, seed and drafter for both verifiers; NFE speed-up = steps / serial "
             "DiT calls per image (deterministic given the seed, so not a timing). \"in spread\": FD-digits and "
             "class accuracy inside the sequential seeds' mean ± 2 std or range (acceptance_matrix.json); "
             "exact entries fall outside that band about as often as the sequential seeds themselves do "
             "(acceptance_matrix.md), per-step ones included. Exactness is tested per transition instead "
             "(benchmarks/results/lossless_power_*block*).", "",
             "| steps | CFG | sampler | L | verifier | acceptance | serial DiT calls / image | NFE speed-up | block / step "
             "| residual proposals / image | class acc. | FD-digits | in spread |",
             "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for step, block in pairs(report["entries"]):
        for e in (step, block):
            band = spread.get(f"{e['steps']}@{e['cfg_scale']:g}")
            ok = "" if band is None else "yes" if within(e["fd_digits"], band["fd_digits"]) and within(
                e["class_accuracy"], band["class_accuracy"]) else "no"
            ratio = f"{block['nfe_speedup'] / step['nfe_speedup']:.3f}" if e is block else ""
            mark = "*" if "taken_from" in e else ""
            lines.append(f"| {e['steps']} | {e['cfg_scale']:g} | {e['sampler']} | {e['window']} | {e['verifier']}{mark} | "
                         f"{e['acceptance']:.3f} | {e['mean_target_calls']:.1f} | {e['nfe_speedup']:.2f}x | {ratio} | "
                         f"{e['residual_proposals_per_image']:.1f} | {e['class_accuracy']:.3f} | {e['fd_digits']:.2f} | "
                         f"{ok} |")
    return "\n".join(lines + ["", f"![block vs step]({stem}.png)", ""])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = pairs(report["entries"])
    if not got:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(got)), 4.2))
    x = np.arange(len(got))
    for offset, verifier, color in ((-0.2, "step", "C0"), (0.2, "block", "C2")):
        ax.bar(x + offset, [p[verifier == "block"]["nfe_speedup"] for p in got], 0.4, color=color, label=verifier)
    for i, (s, b) in enumerate(got):
        ax.text(i + 0.2, b["nfe_speedup"], f"x{b['nfe_speedup'] / s['nfe_speedup']:.2f}", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(x, [f"{s['steps']} st\nCFG {s['cfg_scale']:g}\n{s['sampler']} L={s['window']}" for s, _ in got],
                  fontsize=7)
    ax.set_ylabel("NFE speed-up (steps / serial DiT calls)")
    ax.set_title(f"Block vs per-step verification, digits DiT, N = {report['n']}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="steps:cfg:sampler:L, comma separated")
    parser.add_argument("--n", type=int, default=256, help="images per entry (balanced classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--spread", default=str(SPREAD), help="the acceptance matrix JSON whose sequential spread "
                        "judges quality")
    parser.add_argument("--merge", default="", help="JSON files of other parts of this run whose entries are taken in")
    parser.add_argument("--drafter", default=str(default_model_dir() / "drafter.onnx"),
                        help="drafter.onnx for the digits DiT (default: the shipped one)")
    parser.add_argument("--out", default="benchmarks/results/block_verification")
    parser.add_argument("--step-from", default="", help="acceptance-matrix JSON whose per-step entries with this "
                        "drafter, N, seed and draft guidance are taken instead of rerun")
    add_draft_guidance_argument(parser)
    args = parser.parse_args(argv)
    drafter = Path(args.drafter)
    if not drafter.is_file():
        raise SystemExit(f"error: --drafter {drafter} does not exist")
    settings = parse_settings(args.settings)
    if args.n < 10:
        raise SystemExit("error: --n must be at least 10 (one image per class)")
    import onnxruntime

    pipe = digits_pipeline(drafter, args.threads)
    rule = args.draft_guidance or pipe.defaults["draft_guidance"]
    out = Path(args.out)
    path = Path(f"{out}.json")
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report and (report.get("n"), report.get("seed")) != (args.n, args.seed):
        raise SystemExit(f"error: {path} holds N = {report.get('n')}, seed {report.get('seed')}; use the same --n and "
                         f"--seed to resume it, or another --out")
    if report and Path(report.get("drafter", "")).name != drafter.name:
        raise SystemExit(f"error: {path} was made with the drafter {report.get('drafter')}; resume it with that "
                         f"--drafter, or use another --out")
    if rules(report) - {rule}:  # one rule per report: its entries are keyed without it
        raise SystemExit(f"error: {path} was made with draft guidance {', '.join(sorted(rules(report)))}; resume it "
                         f"with that --draft-guidance, or use another --out")
    report.update({"command": command_line("freedit.benchmarks.block_verification", argv), "n": args.n, "seed": args.seed,
                   "batch_size": args.batch_size, "drafter": str(drafter), "draft_guidance": args.draft_guidance,
                   "spread": json.loads(Path(args.spread).read_text())["spread"] if Path(args.spread).is_file() else {},
                   "machine": {"python": platform.python_version(), "platform": platform.platform(),
                               "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__}})
    entries = report.setdefault("entries", [])
    done = {_key(e) for e in entries}
    for part in (p for p in args.merge.split(",") if p):
        other = json.loads(Path(part).read_text())
        if (other.get("n"), other.get("seed")) != (args.n, args.seed):
            raise SystemExit(f"error: {part} holds N = {other.get('n')}, seed {other.get('seed')}; cannot merge it")
        if Path(other.get("drafter", "")).name != drafter.name:
            raise SystemExit(f"error: {part} was made with the drafter {other.get('drafter')}; cannot merge it")
        if rules(other) - {rule}:
            raise SystemExit(f"error: {part} was made with draft guidance {', '.join(sorted(rules(other)))}; "
                             "cannot merge it")
        report.setdefault("parts", {})[Path(part).name] = other["command"]
        for e in other["entries"]:
            if _key(e) not in done:
                entries.append(e)
                done.add(_key(e))

    if args.step_from:
        reusable = matrix_step_entries(Path(args.step_from), drafter, args.n, args.seed, args.batch_size, rule)
        for steps, cfg, sampler, window in settings:
            key = (steps, cfg, sampler, window, "step")
            if key in reusable and key not in done:
                entries.append(reusable[key])
                done.add(key)

    def save():
        write_outputs({path: json.dumps(report, indent=1).encode()})

    save()
    classifier = DigitsClassifier.load()
    labels = np.arange(args.n) % 10
    for steps, cfg, sampler, window in settings:
        for verifier in VERIFIERS:
            if (steps, cfg, sampler, window, verifier) in done:
                continue
            entry = run_entry(pipe, classifier, labels, sampler=sampler, steps=steps, cfg_scale=cfg, window=window,
                              seed=args.seed, batch_size=args.batch_size, verifier=verifier, maths="numpy",
                              draft_guidance=args.draft_guidance)
            entry.update(window=window,  # run_entry recorded the verifier applied
                         residual_proposals_per_image=entry["residual_proposals"] / args.n)
            entry.pop("acceptance_by_step", None)
            entries.append(entry)
            done.add(_key(entry))
            save()
            print(json.dumps({k: v for k, v in entry.items() if not k.startswith("acceptance_by")}), flush=True)
    write_outputs({Path(f"{out}.md"): markdown(report, out.name).encode()})
    plot(report, Path(f"{out}.png"))
    print(f"wrote {out}.json, {out}.md, {out}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
