"""The device round end to end without a model: for compute-sanitizer, and as a check of the
device round against the numpy round on cases the digits model does not cover.

    python -m freedit.benchmarks.device_round_probe [--maths numpy,device] [--lib libfreedit_kernels.so]

The engines return fixed random outputs (``FixedOutputBackend``): no torch, no ONNX
Runtime, so a run under compute-sanitizer instruments only the kernels library. The drafter's
outputs differ from the target's, so drafts are both accepted and rejected, and the rejections
take the residual sampler (learned sigma, CFG on 3 of 4 channels as DiT's reference) or the
reflection (fixed variance, no CFG). Ragged batches: more samples than slots, windows capped
near the end. Each case runs on the numpy round and on the device round (plain launches and CUDA
graphs); the device runs must make the numpy run's accept decisions and step counts and give its
samples within fp32 tolerance. Prints one JSON line last; exit status 0 only if every comparison
holds (1 otherwise; 2, with one line, for bad arguments or where the device round cannot run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from freedit.runtime.backends.base import Backend, BoundEngine
from freedit.runtime.contract import ModelInfo

MATHS = ("numpy", "device")
#: (name, model, sampler arguments): the residual path and the reflection path
CASES = (
    ("learned sigma, CFG 1.5, free L=4", ModelInfo(input_size=8, in_channels=4, patch_size=2, hidden_size=16,
                                                   num_classes=10, learn_sigma=True, cfg_mode="reference"),
     {"sampler": "free", "window": 4, "cfg_scale": 1.5}),
    ("learned sigma, CFG 1.5, free-relax L=3 lambda=2", ModelInfo(input_size=8, in_channels=4, patch_size=2,
                                                                 hidden_size=16, num_classes=10, learn_sigma=True,
                                                                 cfg_mode="reference"),
     {"sampler": "free-relax", "window": 3, "relax": 2.0, "cfg_scale": 1.5}),
    ("fixed variance, no CFG, free L=4", ModelInfo(input_size=8, in_channels=1, patch_size=2, hidden_size=16,
                                                   num_classes=10, learn_sigma=False, cfg_mode="all"),
     {"sampler": "free", "window": 4, "cfg_scale": 1.0}),
)
LABELS = (3, 1, 4, 1, 5, 9, 2)
STEPS, BATCH, SEED = 20, 3, 7
DRAFT_ERROR = 0.1  # the drafter's outputs are the target's plus this much noise


class FixedOutputBackend(Backend):
    """Engines that ignore their inputs: every row of every call gets one fixed random output (the
    drafter's is the target's plus noise of ``DRAFT_ERROR``).

    ``memory="cuda"``: bound to device buffers, a call is stream-ordered copies from pinned host
    memory (capturable into CUDA graphs); ``memory="host"``: numpy outputs (and the host emulation
    of the kernels, whose device memory is host memory)."""

    name = "fixed-outputs"

    def __init__(self, info: ModelInfo, max_rows: int, seed: int = 0, memory: str = "host"):
        self._info, self.memory, self.device_id = info, memory, 0
        rng = np.random.default_rng(seed)
        C, H, T, D = info.in_channels, info.input_size, info.num_tokens, info.hidden_size

        def eps_v(eps, v):
            return np.concatenate([eps, v], axis=1) if info.learn_sigma else eps

        # one row for all: the engines' row order (slots, window positions, CFG halves) differs
        # between drafter and target, so per-row values would make every draft a stranger's
        eps = np.repeat(rng.normal(size=(1, C, H, H)), max_rows, axis=0)
        v = np.repeat(rng.uniform(-0.8, 0.8, size=(1, C, H, H)), max_rows, axis=0)
        self.outputs = {
            "dit": {"eps_v": eps_v(eps, v), "feat": rng.normal(size=(max_rows, T, D))},  # passed on, ignored
            # close to the target's but not equal: some drafts pass, some are rejected
            "drafter": {"draft_feat": rng.normal(size=(max_rows, T, D)),
                        "eps_v": eps_v(eps + DRAFT_ERROR * rng.normal(size=eps.shape[1:]),
                                       np.clip(v + DRAFT_ERROR, -1, 1))},
        }
        self.outputs = {e: {n: a.astype(np.float32) for n, a in o.items()} for e, o in self.outputs.items()}

    def engines(self):
        return ("dit", "drafter")

    def info(self, engine):
        return self._info

    def run(self, engine, inputs):
        rows = len(inputs["x"])
        return {name: out[:rows] for name, out in self.outputs[engine].items()}

    def bind(self, engine, inputs, outputs, lane) -> BoundEngine:
        if self.memory == "cuda":
            return _PinnedCopies(self.outputs[engine], outputs, lane)
        return super().bind(engine, inputs, outputs, lane)


class _PinnedCopies(BoundEngine):
    capturable = True

    def __init__(self, values: dict, outputs: dict, lane):
        self.lane, self.copies = lane, []
        for name, dst in outputs.items():
            src = dst.device.pinned(values[name].shape, np.float32)
            src[:] = values[name]
            self.copies.append((dst, src))

    def run(self, rows: int) -> None:
        from freedit.runtime.device import H2D

        for dst, src in self.copies:
            dst.device.copy(dst.ptr, src.ctypes.data, rows * dst.row_bytes, H2D, self.lane.stream)


def outcome(result) -> dict:
    """What must not depend on where the maths ran: accepted drafts per round and serial DiT calls,
    per sample."""
    return {"accepted": [s.get("accepted", []) for s in result.stats],
            "target_calls": [s["target_calls"] for s in result.stats]}


def device_memory(lib: str | None) -> str:
    """Where the device round's engines put their outputs: "cuda" on a GPU, "host" on the host
    emulation of the kernels (where there is one); raises RuntimeError with the reason otherwise."""
    from freedit.runtime import kernels

    try:
        k = kernels.load(lib)
        count, code = k.device_count()
        if count > 0:
            return "cuda"
        why = f"no CUDA GPU (cudaGetDeviceCount returned {code}, {k.error_name(code)})"
    except kernels.KernelsNotFound as exc:
        why = str(exc).splitlines()[0]
    try:
        kernels.load(emulated=True)
    except TypeError:
        raise RuntimeError(f"{why}, and this checkout has no host emulation of the kernels") from None
    except kernels.KernelsNotFound:
        raise RuntimeError(f"{why}, and the host emulation of the kernels is not built") from None
    return "host"


def run_case(info: ModelInfo, args: dict, maths: tuple[str, ...], memory: str = "cuda") -> dict:
    """One case on every maths asked for; the device runs are compared with the numpy run."""
    from freedit.runtime.pipeline import Pipeline

    window = args["window"]
    max_rows = 2 * BATCH * (window + 1)
    runs, out = {}, {"maths": list(maths)}
    defaults = {"steps": STEPS, "cfg_scale": args["cfg_scale"], "window": window,
                "fixed_variance": "small"}
    kw = {k: v for k, v in args.items() if k != "cfg_scale"}
    for kind in maths:
        backend = FixedOutputBackend(info, max_rows, memory="host" if kind == "numpy" else memory)
        pipe = Pipeline(backend, defaults, source="fixed outputs")
        try:
            for graphs in ((None,) if kind == "numpy" else (False, True)):
                label = kind if graphs is None else f"{kind}, {'CUDA graphs' if graphs else 'plain launches'}"
                t0 = time.perf_counter()
                result = pipe.generate(list(LABELS), seed=SEED, batch_size=BATCH, maths=kind,
                                       **({} if graphs is None else {"graphs": graphs}), **kw)
                runs[label] = (result, time.perf_counter() - t0)
        finally:
            pipe.close()
    reference = runs.get("numpy")
    for label, (result, seconds) in runs.items():
        entry = {"seconds": seconds, "acceptance": result.summary["acceptance"],
                 "residual_proposals": result.summary["residual_proposals"],
                 "residual_cap_hits": result.summary["residual_cap_hits"],
                 "mean_target_calls": result.summary["mean_target_calls"]}
        if reference is not None and label != "numpy":
            entry["decisions_equal"] = outcome(result) == outcome(reference[0])
            entry["max_abs_diff"] = float(np.max(np.abs(result.samples - reference[0].samples)))
            entry["samples_close"] = bool(np.allclose(result.samples, reference[0].samples, rtol=1e-4, atol=1e-4))
        out[label] = entry
    return out


def probe(maths: tuple[str, ...] = MATHS, memory: str = "cuda") -> dict:
    """Every case; ``memory``: the device round's engine memory (``device_memory``)."""
    cases = {}
    for name, info, args in CASES:
        cases[name] = run_case(info, args, maths, memory)
    compared = [e for c in cases.values() for e in c.values() if isinstance(e, dict) and "decisions_equal" in e]
    return {"cases": cases, "compared": len(compared), "device_memory": memory if "device" in maths else None,
            "passed": all(e["decisions_equal"] and e["samples_close"] and e["residual_cap_hits"] == 0
                          for e in compared)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freedit.benchmarks.device_round_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--maths", default=",".join(MATHS), help="numpy, device or both (default both)")
    parser.add_argument("--lib", help="the kernels library (default: $FREEDIT_KERNELS_LIB, the package, build/kernels)")
    args = parser.parse_args(argv)
    maths = tuple(m for m in args.maths.split(",") if m)
    bad = [m for m in maths if m not in MATHS]
    if bad or not maths:
        print(f"device_round_probe: unknown maths {bad or '(none given)'}; choose from {', '.join(MATHS)}",
              file=sys.stderr)
        return 2
    if args.lib:
        import os

        os.environ["FREEDIT_KERNELS_LIB"] = args.lib  # the pipeline loads the library by its search path
    from freedit.runtime.kernels import KernelsNotFound

    memory = "host"
    if "device" in maths:
        try:
            memory = device_memory(args.lib)
        except (KernelsNotFound, RuntimeError) as exc:  # no library, no GPU: nothing can be compared
            print(f"device_round_probe: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
    report = probe(maths, memory)
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
