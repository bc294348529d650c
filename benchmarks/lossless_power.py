"""A lossless test whose power is shown in the same run, on the bundled digits DiT.

    python -m freedit.benchmarks.lossless_power --steps 50 --n 512 --out benchmarks/results/lossless_power_50

Independent chains (balanced classes, one seed per group) of four lossless speculative samplers
(FREE with the shipped drafter, frozen, FREE with a deliberately poor drafter, FREE under block
verification), of the sequential sampler, and of FREE under deliberately, slightly biased decide
rules (benchmarks/biased_rules.py: min(1, (q/p)^gamma) for gamma 0.8 / 0.9 / 0.95, a redraw from p
instead of the residual) and under relax. The primary statistic is the transition test
(benchmarks/transition_test.py): every committed transition against the DiT's own, an exact z-test
along the direction of the draft plus a chi-square on |z|^2, Bonferroni-combined. Lossless groups
must pass (p >= 0.01) and biased ones be rejected (p < 0.01) by that one statistic in the same run.
``--final-sample-tests`` adds the two-sample statistics on the final images (within-class energy
distance, classifier test, MMD, label chi-square against a sequential sample), which are far weaker.
tests/test_lossless_power.py asserts it on the CI budget; larger runs are recorded in
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from freedit.benchmarks import add_draft_guidance_argument, applied_rules, command_line
from freedit.benchmarks.biased_rules import RULES
from freedit.benchmarks.quality import DigitsClassifier
from freedit.benchmarks.transition_test import Chains, Reference, recording, test_chains
from freedit.benchmarks.two_sample import classifier_test, energy_test, label_chi2_test, mmd_test
from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend
from freedit.runtime.outputs import check_output_folder, write_outputs
from freedit.runtime.pipeline import Pipeline, default_model_dir
from freedit.runtime.schedule import Schedule

ALPHA = 0.01
PRIMARY = "transition"
LOSSLESS = ("sequential", "free", "frozen", "free-poor", "free-block")
BIASED = ("gamma0.8", "draft-resample")
#: Reported beside the verdict: how small a bias the same statistic still sees.
EXTRA = ("gamma0.9", "gamma0.95", "relax8", "accept-all")
#: One seed per group: every chain is independent of every other.
SEEDS = {"sequential": 11, "free": 22, "frozen": 33, "free-poor": 44, "gamma0.8": 55, "draft-resample": 66,
         "accept-all": 77, "gamma0.9": 88, "gamma0.95": 99, "relax8": 111, "free-block": 122}
#: The first drafter (MODEL_CARD.md): rejected about 3 drafts in 4 at 50 steps, so a slightly biased
#: rule moves its chains far enough for the CI budget to see. The shipped drafter is accepted ~4 in 5
#: there, and the same rules' effect on its chains is much smaller (lossless_power_50_shipped_n512).
FIRST_DRAFTER = default_model_dir() / "drafter_v1.onnx"
#: Weight noise of the poor drafter: acceptance well below the shipped drafter's, rejections everywhere.
POOR_NOISE = 0.05


def poor_drafter(folder: Path, source: Path, noise: float = POOR_NOISE, seed: int = 0) -> Path:
    """The drafter ``source`` (an .onnx with its .safetensors beside it) with Gaussian noise on every
    trainable weight, exported once per source drafter (the file name carries its hash, so a new
    drafter never meets an old cache; needs torch)."""
    import hashlib

    weights = source.with_suffix(".safetensors")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    path = folder / f"drafter_poor_{noise:g}_{seed}_{digest}.onnx"
    if path.is_file():
        return path
    import torch

    from freedit.export.checkpoint import load_dit
    from freedit.export.drafter import load_drafter
    from freedit.export.onnx_export import export_drafter

    drafter = load_drafter(weights, load_dit(default_model_dir() / "digits_dit.safetensors"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    folder.mkdir(parents=True, exist_ok=True)
    export_drafter(drafter.eval(), path)
    return path


def digits_pipeline(drafter: Path, threads: int | None) -> Pipeline:
    model = default_model_dir()
    defaults = json.loads((model / "pipeline.json").read_text())
    backend = OnnxRuntimeBackend({"dit": model / "dit.onnx", "drafter": drafter}, threads=threads)
    return Pipeline(backend, defaults, source=str(drafter))


def _sampler(group: str) -> tuple[str, float, str]:
    """(sampler, relax lambda, verifier) of a group."""
    if group.startswith("relax"):
        return "free-relax", float(group[len("relax"):]), "step"
    sampler = {"sequential": "sequential", "frozen": "frozen"}.get(group, "free")
    return sampler, 0.0, "block" if group.endswith("-block") else "step"


def sample(pipe: Pipeline, group: str, labels: np.ndarray, steps: str, window: int, cfg_scale: float | None,
           seed_offset: int = 0, draft_guidance: str | None = None) -> dict:
    """One group's chains, recorded transition by transition (numpy round maths); ``draft_guidance``:
    guided FREE's rule (Pipeline.generate; None = the model's)."""
    sampler, relax, verifier = _sampler(group)
    rule = RULES[group]() if group in RULES else nullcontext()
    chains = Chains(Schedule.create(steps).num_steps)
    t0 = time.perf_counter()
    with rule, recording(chains):
        result = pipe.generate(labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=SEEDS[group] + seed_offset,
                               batch_size=250, window=window, relax=relax, maths="numpy", progress=True,
                               verifier=verifier, draft_guidance=draft_guidance)
    keep = ("acceptance", "nfe_speedup", "residual_proposals", "residual_cap_hits", "decided")
    return {"chains": chains, "samples": result.samples, "seconds": time.perf_counter() - t0,
            "summary": {**{k: result.summary[k] for k in keep if k in result.summary},
                        **applied_rules(result)}}


def combined_p(test: dict) -> float:
    """Bonferroni over the transition test's two statistics (direction, |z|^2)."""
    return min(1.0, 2 * min(test["direction"]["p_value"], test["norm"]["p_value"]))


def final_sample_tests(ref: dict, other: dict, permutations: int) -> dict:
    pair = (ref["features"], other["features"], ref["classes"], other["classes"])
    return {"energy": energy_test(*pair, permutations=permutations),
            "classifier": classifier_test(*pair, permutations=max(100, permutations // 4)),
            "mmd": mmd_test(ref["features"], other["features"], permutations=max(100, permutations // 4)),
            "labels": label_chi2_test(ref["predicted"], other["predicted"])}


def run(steps: str = "50", n: int = 512, window: int = 4, cfg_scale: float | None = None,
        groups: tuple[str, ...] = LOSSLESS + BIASED, threads: int | None = None, cache: Path | None = None,
        final_tests: bool = False, permutations: int = 1000, seed_offset: int = 0, drafter: Path | None = None,
        draft_guidance: str | None = None) -> dict:
    """``drafter``: every speculative group's (the poor one is made from it); default the shipped one.
    ``draft_guidance``: guided FREE's rule for every FREE group (None = the model's).
    The test's direction is that drafter's proposal too (under that rule), where a biased rule errs."""
    cache = cache or Path(tempfile.gettempdir()) / "freedit_lossless_power"
    model = default_model_dir()
    drafter = Path(drafter or model / "drafter.onnx")
    pipe = digits_pipeline(drafter, threads)
    poor = digits_pipeline(poor_drafter(cache, drafter), threads) if "free-poor" in groups else None
    cfg = float(cfg_scale or pipe.defaults["cfg_scale"])
    rule = draft_guidance or pipe.defaults["draft_guidance"]  # the direction drafts as the FREE groups do
    reference = Reference(model, drafter, pipe.info, cfg, threads=threads, parent_guidance=rule == "parent")
    schedule = Schedule.create(steps)
    labels = np.arange(n) % 10
    classifier = DigitsClassifier.load() if final_tests else None
    if final_tests and "sequential" not in groups:
        groups = ("sequential", *groups)
    report = {"steps": steps, "n": n, "window": window, "cfg_scale": cfg, "drafter": drafter.name,
              "draft_guidance": draft_guidance, "alpha": ALPHA,
              "primary": PRIMARY,
              "seeds": {g: SEEDS[g] + seed_offset for g in groups}, "poor_drafter_noise": POOR_NOISE, "groups": {}}
    finals = {}
    for group in groups:
        got = sample(poor if group == "free-poor" else pipe, group, labels, steps, window, cfg, seed_offset,
                     draft_guidance)
        t0 = time.perf_counter()
        test = test_chains(reference, schedule, got["chains"], labels)
        test["p_value"] = combined_p(test)
        entry = {"lossless": group in LOSSLESS, **got["summary"], "seconds": round(got["seconds"], 1),
                 "test_seconds": round(time.perf_counter() - t0, 1), "transition": test,
                 "rejected": test["p_value"] < ALPHA}
        if classifier is not None:
            finals[group] = {"features": classifier.features(got["samples"]),
                             "predicted": classifier.predict(got["samples"]), "classes": labels}
            if group != "sequential":
                entry["final_sample_tests"] = final_sample_tests(finals["sequential"], finals[group], permutations)
        report["groups"][group] = entry
        print(json.dumps({"group": group, **got["summary"], "p": test["p_value"], "z": round(test["direction"]["z"], 2),
                          "seconds": entry["seconds"]}), flush=True)
    judged = [g for g in report["groups"] if g in LOSSLESS + BIASED]
    report["verdict"] = all(report["groups"][g]["rejected"] != report["groups"][g]["lossless"] for g in judged)
    return report


def summary_files(report: dict, out: Path) -> dict[Path, bytes]:
    """out.md (table) and out.png (mean projection by step, per group; needs matplotlib)."""
    rows = ["| group | lossless | acceptance | NFE speed-up | transitions | direction z | sum z² p | p (combined) | rejected |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, g in report["groups"].items():
        t = g["transition"]
        rows.append(f"| {name} | {g['lossless']} | {g.get('acceptance') or 0:.3f} | {g.get('nfe_speedup') or 1:.2f} | "
                    f"{t['transitions']} | {t['direction']['z']:.2f} | {t['norm']['p_value']:.3g} | {t['p_value']:.3g} | "
                    f"{g['rejected']} |")
    biased = [g for g in report["groups"] if g in BIASED]
    extra = [g for g in report["groups"] if g not in BIASED and g not in LOSSLESS]
    rules = ", ".join(sorted({g["draft_guidance"] for g in report["groups"].values() if "draft_guidance" in g}))
    text = [f"# Transition test: {report['steps']} steps, L = {report['window']}, CFG {report['cfg_scale']}, "
            f"N = {report['n']} chains per group", "", f"Command: `{report.get('command', '')}`", "",
            f"Drafter: {report.get('drafter', 'drafter.onnx')}"
            + (f" ({report['drafter_note']})" if report.get("drafter_note") else "") + f"; guided FREE's draft "
            f"guidance: {rules or 'n/a'}", "",
            "Every committed transition is compared with the DiT's own transition from its committed parent "
            "(benchmarks/transition_test.py); alpha = 0.01. Verdict (lossless groups pass"
            + (f", {' / '.join(biased)} rejected" if biased else "") + f"): **{report['verdict']}**"
            + (f"; {' / '.join(extra)} reported beside it." if extra else "."), "", *rows, ""]
    if any("final_sample_tests" in g for g in report["groups"].values()):
        text += ["Final-sample two-sample tests against the sequential group (p-values):", "",
                 "| group | energy | classifier | MMD | labels |", "|---|---:|---:|---:|---:|"]
        for name, g in report["groups"].items():
            if "final_sample_tests" in g:
                f = g["final_sample_tests"]
                text.append(f"| {name} | " + " | ".join(f"{f[k]['p_value']:.3g}" for k in ("energy", "classifier", "mmd",
                                                                                             "labels")) + " |")
        text.append("")
    files = {Path(f"{out}.md"): "\n".join(text).encode()}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, g in report["groups"].items():
        by = g["transition"]["mean_projection_by_step"]
        steps = np.array(sorted(int(k) for k in by))
        ax.plot(steps, [by[str(k)] if str(k) in by else by[k] for k in steps], label=name,
                ls="-" if g["lossless"] else "--", lw=1.2)
    band = 2 / np.sqrt(report["n"])
    ax.axhspan(-band, band, color="grey", alpha=0.2, label="null +- 2 SE (one step)")
    ax.set_xlabel("respaced step (T - 2 ... 1; sampling runs right to left)")
    ax.set_ylabel("mean of z . e (N(0, 1 / N) if exact)")
    ax.invert_xaxis()
    ax.set_yscale("symlog", linthresh=0.25)  # the redraw rule's late-step bias dwarfs the rest
    ax.set_title(f"Transition test, {report['steps']} steps, L = {report['window']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    files[Path(f"{out}.png")] = png.getvalue()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="50")
    parser.add_argument("--n", type=int, default=512, help="chains (images) per group")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's documented scale")
    parser.add_argument("--groups", default=",".join(LOSSLESS + BIASED), help=f"comma-separated, of {', '.join(SEEDS)}")
    parser.add_argument("--final-sample-tests", action="store_true",
                        help="also the two-sample tests on the final images (adds a sequential group)")
    parser.add_argument("--permutations", type=int, default=1000, help="of the final-sample tests")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every group's seed (an independent "
                        "repeat of a run)")
    parser.add_argument("--drafter", type=Path, default=None,
                        help="the speculative groups' drafter .onnx (its .safetensors beside it); default: the shipped one")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/lossless_power_50", help="writes OUT.json, OUT.md, OUT.png")
    add_draft_guidance_argument(parser)
    args = parser.parse_args(argv)
    groups = tuple(g for g in args.groups.split(",") if g)
    bad = [g for g in groups if g not in SEEDS]
    if bad or not groups or args.n < 10:
        raise SystemExit(f"error: unknown group(s) {bad}; choose from {', '.join(SEEDS)}" if bad or not groups
                         else "error: --n must be at least 10 (one chain per class)")
    if args.drafter is not None and not args.drafter.is_file():
        raise SystemExit(f"error: --drafter {args.drafter}: no such file")
    if args.drafter is not None and "free-poor" in groups and not args.drafter.with_suffix(".safetensors").is_file():
        raise SystemExit(f"error: the free-poor group is made from {args.drafter.with_suffix('.safetensors')}, "
                         "which does not exist")
    out = Path(args.out)
    check_output_folder(out.parent)
    report = run(args.steps, args.n, args.window, args.cfg_scale, groups, args.threads,
                 final_tests=args.final_sample_tests, permutations=args.permutations, seed_offset=args.seed_offset,
                 drafter=args.drafter, draft_guidance=args.draft_guidance)
    import onnxruntime

    report["command"] = command_line("freedit.benchmarks.lossless_power", argv)
    report["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    write_outputs({Path(f"{out}.json"): json.dumps(report, indent=1).encode(), **summary_files(report, out)})
    print(json.dumps({"verdict": report["verdict"]}), flush=True)
    return 0 if report["verdict"] else 1


if __name__ == "__main__":
    sys.exit(main())
