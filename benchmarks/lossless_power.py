"""A lossless test whose power is shown in the same run, on the bundled digits DiT.

    python -m freedit.benchmarks.lossless_power --steps 50 --n 2000 --out benchmarks/results/lossless_power_50

Independent samples (balanced classes, one seed per group) of the sequential sampler, of three
lossless speculative samplers (FREE with the shipped drafter, frozen, FREE with a deliberately
poor drafter) and of FREE under deliberately, slightly biased decide rules (benchmarks/biased_rules.py:
min(1, (q/p)^0.8), and a redraw from p instead of the residual) are compared with the sequential
sample on the digits classifier's features. The primary statistic is the within-class energy
distance with a permutation p-value; a classifier two-sample test, the MMD and a label chi-square
are reported beside it. The lossless groups must pass (p >= 0.01) while the biased ones are
rejected (p < 0.01) by the same statistic, on the same reference sample, in the same run.
tests/test_lossless_power.py asserts it on the CI budget; larger runs are recorded in
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from freedit.benchmarks.biased_rules import RULES
from freedit.benchmarks.quality import DigitsClassifier
from freedit.benchmarks.two_sample import classifier_test, energy_test, label_chi2_test, mmd_test
from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend
from freedit.runtime.pipeline import Pipeline, default_model_dir

ALPHA = 0.01
PRIMARY = "energy"
LOSSLESS = ("free", "frozen", "free-poor")
BIASED = ("gamma0.8", "draft-resample")
#: One seed per group: every sample is independent of every other.
SEEDS = {"sequential": 11, "free": 22, "frozen": 33, "free-poor": 44, "gamma0.8": 55, "draft-resample": 66,
         "accept-all": 77}
#: Weight noise of the poor drafter: acceptance well below the shipped drafter's, rejections everywhere.
POOR_NOISE = 0.05


def poor_drafter(folder: Path, noise: float = POOR_NOISE, seed: int = 0) -> Path:
    """The shipped drafter with Gaussian noise on every trainable weight, exported once per shipped
    drafter (the file name carries its hash, so a new drafter never meets an old cache; needs torch)."""
    import hashlib

    model = default_model_dir()
    shipped = hashlib.sha256((model / "drafter.safetensors").read_bytes()).hexdigest()[:12]
    path = folder / f"drafter_poor_{noise:g}_{seed}_{shipped}.onnx"
    if path.is_file():
        return path
    import torch

    from freedit.export.checkpoint import load_dit
    from freedit.export.drafter import load_drafter
    from freedit.export.onnx_export import export_drafter

    drafter = load_drafter(model / "drafter.safetensors", load_dit(model / "digits_dit.safetensors"))
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


def sample(pipe: Pipeline, group: str, n: int, steps: str, window: int, cfg_scale: float | None,
           classifier: DigitsClassifier) -> dict:
    sampler = {"sequential": "sequential", "frozen": "frozen"}.get(group, "free")
    rule = RULES[group]() if group in RULES else nullcontext()
    labels = np.arange(n) % 10
    t0 = time.perf_counter()
    with rule:
        result = pipe.generate(labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=SEEDS[group],
                               batch_size=250, window=window, progress=True)
    keep = ("acceptance", "nfe_speedup", "residual_proposals", "residual_cap_hits", "decided")
    return {"features": classifier.features(result.samples), "predicted": classifier.predict(result.samples),
            "classes": labels, "seconds": time.perf_counter() - t0,
            "summary": {k: result.summary[k] for k in keep if k in result.summary}}


def compare(ref: dict, other: dict, permutations: int) -> dict:
    pair = (ref["features"], other["features"], ref["classes"], other["classes"])
    return {"energy": energy_test(*pair, permutations=permutations),
            "classifier": classifier_test(*pair, permutations=max(100, permutations // 4)),
            "mmd": mmd_test(ref["features"], other["features"], permutations=max(100, permutations // 4)),
            "labels": label_chi2_test(ref["predicted"], other["predicted"])}


def run(steps: str = "50", n: int = 1000, window: int = 4, cfg_scale: float | None = None, permutations: int = 1000,
        groups: tuple[str, ...] = LOSSLESS + BIASED, threads: int | None = None, cache: Path | None = None) -> dict:
    cache = cache or Path(tempfile.gettempdir()) / "freedit_lossless_power"
    classifier = DigitsClassifier.load()
    shipped = digits_pipeline(default_model_dir() / "drafter.onnx", threads)
    poor = digits_pipeline(poor_drafter(cache), threads) if "free-poor" in groups else None
    ref = sample(shipped, "sequential", n, steps, window, cfg_scale, classifier)
    report = {"steps": steps, "n": n, "window": window, "cfg_scale": cfg_scale or shipped.defaults["cfg_scale"],
              "alpha": ALPHA, "primary": PRIMARY, "permutations": permutations, "seeds": SEEDS,
              "poor_drafter_noise": POOR_NOISE, "seconds": {"sequential": ref["seconds"]}, "groups": {}}
    for group in groups:
        got = sample(poor if group == "free-poor" else shipped, group, n, steps, window, cfg_scale, classifier)
        tests = compare(ref, got, permutations)
        report["seconds"][group] = got["seconds"]
        report["groups"][group] = {"lossless": group in LOSSLESS, **got["summary"], "tests": tests,
                                   "rejected": tests[PRIMARY]["p_value"] < ALPHA}
        print(json.dumps({"group": group, **got["summary"], "p": {k: v["p_value"] for k, v in tests.items()},
                          "seconds": round(got["seconds"], 1)}), flush=True)
    report["verdict"] = all(g["rejected"] != g["lossless"] for g in report["groups"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="50")
    parser.add_argument("--n", type=int, default=1000, help="images per group")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's documented scale")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--groups", default=",".join(LOSSLESS + BIASED), help=f"of {', '.join(SEEDS)} but sequential")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/lossless_power_50")
    args = parser.parse_args(argv)
    groups = tuple(g for g in args.groups.split(",") if g)
    bad = [g for g in groups if g not in SEEDS or g == "sequential"]
    if bad:
        raise SystemExit(f"error: unknown group(s) {bad}; choose from {', '.join(g for g in SEEDS if g != 'sequential')}")
    report = run(args.steps, args.n, args.window, args.cfg_scale, args.permutations, groups, args.threads)
    import onnxruntime

    report["command"] = "python -m freedit.benchmarks.lossless_power " + " ".join(sys.argv[1:] if argv is None else argv)
    report["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"verdict": report["verdict"]}), flush=True)
    return 0 if report["verdict"] else 1


if __name__ == "__main__":
    sys.exit(main())
