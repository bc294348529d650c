"""What each step of the GPU campaign measures (benchmarks/gpu_campaign.py runs them, each in its
own process, and docs/GPU.md says what every figure means).

A step is a function ``step(ctx) -> {"status", "reason", "figures"}`` on a :class:`Context`: the
campaign's options, a work folder shared by the steps, and what earlier steps found. With
``ctx.rehearsal`` (the dry run) a GPU step runs the same code on the CPU backends at tiny sizes,
so a typo cannot cost the GPU lease; its figures then mean nothing and are not reported.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freedit.benchmarks.device_round_probe import outcome

REPO = Path(__file__).resolve().parents[1]
#: The digits runs: labels (sample i has label i), seed, and the sampler configurations compared.
LABELS = tuple(range(8))
SEED = 0
CONFIGS = (
    ("sequential", {"sampler": "sequential"}),
    ("free L=4 step", {"sampler": "free", "window": 4, "verifier": "step"}),  # both verifiers, whatever the default
    ("free L=8 block", {"sampler": "free", "window": 8, "verifier": "block"}),
    ("free-relax L=8 λ=8", {"sampler": "free-relax", "window": 8, "relax": 8.0}),
)
#: Images per configuration and repeat at each batch size (the same seed gives the same sample i
#: whatever the batch, so both batch sizes are compared with one CPU reference).
IMAGES = {1: 2, 8: 8}
#: The recorded CPU bench whose lossless FREE L=8 run gives the digits acceptance profile a(t).
ACCEPTANCE_SOURCE = REPO / "benchmarks" / "results" / "bench_digits_cpu" / "bench.json"
SANITIZER_EXIT = 86  # compute-sanitizer --error-exitcode: what it returns when it found errors


@dataclass
class Context:
    options: dict
    work: Path
    results: dict = field(default_factory=dict)  # step name -> its entry in campaign.json, so far
    rehearsal: bool = False
    kernels_lib: str | None = None

    def pick(self, gpu, rehearsal):
        """The GPU run's value, or the rehearsal's tiny one."""
        return rehearsal if self.rehearsal else gpu

    def figures(self, step: str) -> dict:
        entry = self.results.get(step) or {}
        return entry.get("figures") or {}

    @property
    def steps(self) -> int:
        return int(self.options["steps"])


def result(status: str, reason: str, **figures) -> dict:
    return {"status": status, "reason": reason, "figures": figures}


# ---- helpers ---------------------------------------------------------------------------------
def run_streamed(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """Run a program, echoing its output line by line (into the campaign's raw.log), and return
    (exit status, output)."""
    print("$ " + " ".join(argv), flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, cwd=cwd, bufsize=1)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines)


def json_block(text: str) -> dict | None:
    """The last JSON object a program printed (one line, or indented over several), ignoring the
    lines other tools interleave (compute-sanitizer's start with '=========')."""
    lines = [line for line in text.splitlines() if not line.startswith("=========")]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            for j in range(len(lines), i, -1):
                try:
                    return json.loads("\n".join(lines[i:j]))
                except json.JSONDecodeError:
                    continue
    return None


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, else where the CUDA toolkit installs it ($CUDA_HOME, /usr/local/cuda)."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            for sub in ("bin", "compute-sanitizer"):
                path = Path(home) / sub / name
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    return None


def _tool(name: str, version_pattern: str | None = None) -> dict | None:
    """{path, version} of a tool, or None where it is not installed."""
    path = find_tool(name)
    if path is None:
        return None
    return {"path": path, "version": _first_line([path, "--version"], version_pattern)}


def _first_line(argv: list[str], pattern: str | None = None) -> str | None:
    """A program's first output line (the last one matching ``pattern``), or None where it is not installed."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if pattern:
        lines = [line for line in lines if re.search(pattern, line)] or lines
    return lines[-1] if pattern else (lines[0] if lines else None)


def _versions() -> dict:
    from importlib import metadata

    names = ("numpy", "scipy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "cuda-bindings", "cuda-python",
             "cupy-cuda13x", "cupy-cuda12x", "tensorrt", "tensorrt-cu13", "tensorrt-rtx-cu13", "safetensors",
             "nvidia-ml-py", "triton")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _gpu_properties() -> tuple[dict | None, str]:
    """(GPU 0's properties, or None; why not)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        return None, "cuda-python (cuda.bindings) is not installed, so the GPU cannot be queried"
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return None, f"no CUDA GPU: cudaGetDeviceCount returned {int(err)} ({rt.cudaGetErrorName(err)[1].decode()})"
    err, props = rt.cudaGetDeviceProperties(0)
    _, driver = rt.cudaDriverGetVersion()
    _, runtime = rt.cudaRuntimeGetVersion()
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\0"), "count": int(count), "compute_capability": f"{props.major}.{props.minor}",
            "arch": f"{props.major}{props.minor}", "memory_mib": int(props.totalGlobalMem) // 2**20,
            "multiprocessors": int(props.multiProcessorCount), "l2_mib": int(props.l2CacheSize) / 2**20,
            "cuda_driver_api": int(driver), "cuda_runtime_api": int(runtime)}, ""


# ---- 1. the machine -------------------------------------------------------------------------------
def machine(ctx: Context) -> dict:
    gpu, why = _gpu_properties()
    smi = _first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                       "--format=csv,noheader"])
    if gpu is not None and smi:
        parts = [p.strip() for p in smi.split(",")]
        gpu["driver"] = parts[1] if len(parts) > 1 else None
    figures = {"gpu": gpu, "gpu_reason": why or None, "nvidia_smi": smi, "versions": _versions()}
    figures["torch_cuda"] = False
    if gpu is not None and "torch" in figures["versions"]:
        import torch

        figures["torch_cuda"] = bool(torch.cuda.is_available())
        figures["torch_cuda_version"] = torch.version.cuda
        figures["torch_device"] = torch.cuda.get_device_name(0) if figures["torch_cuda"] else None
    try:
        import onnxruntime

        figures["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        figures["onnxruntime_providers"] = []
    figures["tools"] = {"nvcc": _tool("nvcc", r"release"), "cmake": _tool("cmake"), "ninja": _tool("ninja"),
                        "compute-sanitizer": _tool("compute-sanitizer", r"[Vv]ersion"),
                        "ncu": _tool("ncu", r"[Vv]ersion"), "cuobjdump": _tool("cuobjdump", r"[Vv]ersion")}
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    figures.update(cpu=cpu, cpu_count=os.cpu_count(), platform=platform.platform(),
                   git_revision=_first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]))
    if gpu is None:
        return result("ok", why, **figures)
    return result("ok", f"{gpu['name']}, compute capability {gpu['compute_capability']}, driver "
                        f"{gpu.get('driver') or '?'}, CUDA runtime {gpu['cuda_runtime_api']}", **figures)


# ---- 2. the kernels library -------------------------------------------------------------------------
def build_commands(source: Path, build: Path, arch: str, jobs: int) -> list[list[str]]:
    """CMake for this GPU's architecture only (SASS and PTX of it), with ptxas' resource report."""
    generator = ["-G", "Ninja"] if find_tool("ninja") else []
    return [["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DCMAKE_CUDA_FLAGS=-Xptxas=-v"],
            ["cmake", "--build", str(build), "-j", str(jobs)]]


def ptxas_report(log: str) -> dict:
    """Registers and spills per kernel from ptxas -v."""
    functions, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+\w?)'", line)
        if m:
            current = m.group(1)
            functions.setdefault(current, {})
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            functions[current]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            functions[current]["registers"] = int(m.group(1))
    registers = [f.get("registers", 0) for f in functions.values()]
    return {"kernels": len(functions), "max_registers": max(registers, default=0),
            "spilling": sorted(name for name, f in functions.items() if f.get("spill_bytes", 0) > 0)}


def kernels_build(ctx: Context) -> dict:
    arch = ctx.figures("machine")["gpu"]["arch"]
    build = ctx.work / "kernels"
    env = dict(os.environ, CUDACXX=find_tool("nvcc") or "nvcc")  # CMake's CUDA compiler, on PATH or not
    t0 = time.perf_counter()
    log = ""
    for argv in build_commands(REPO, build, arch, os.cpu_count() or 2):
        rc, out = run_streamed(argv, env=env)
        log += out
        if rc:
            return result("failed", f"`{' '.join(argv[:2])} ...` exited with {rc}", arch=arch)
    seconds = time.perf_counter() - t0
    library = build / "libfreedit_kernels.so"
    from freedit.runtime import kernels

    k = kernels.load(library)
    figures = {"library": str(library), "arch": arch, "seconds": seconds, "abi_version": k.abi_version,
               "ptxas": ptxas_report(log)}
    if find_tool("cuobjdump"):
        rc, out = run_streamed([find_tool("cuobjdump"), "--list-elf", str(library)])
        figures["sass"] = sorted(set(re.findall(r"sm_\d+\w?", out)))
    spills = figures["ptxas"]["spilling"]
    return result("ok", f"built for sm_{arch} in {seconds:.0f} s; {figures['ptxas']['kernels']} kernels, "
                        f"up to {figures['ptxas']['max_registers']} registers, "
                        + (f"spills in {', '.join(spills)}" if spills else "no spills"), **figures)


def emulation_library() -> str | None:
    """The host emulation of the kernels (runtime/csrc/emulation) where one is built: the rehearsals
    run the GPU steps' device code on it."""
    from freedit.runtime import kernels

    try:
        return str(kernels.load(emulated=True).path)
    except (TypeError, kernels.KernelsNotFound, RuntimeError):  # no emulation in this checkout, or not built
        return None


NO_EMULATION = "the host emulation of the kernels is not built (kernels.build_emulated, $FREEDIT_KERNELS_EMU_LIB)"


def _selftest_argv(ctx: Context) -> list[str]:
    lib = ["--emulated", "--lib", emulation_library()] if ctx.rehearsal else ["--lib", ctx.kernels_lib]
    return [sys.executable, "-m", "freedit.runtime.kernels", "--selftest", "--seed", str(ctx.options["check_seed"]),
            *lib]


def kernels_checks(ctx: Context) -> dict:
    """Every kernel against the numpy oracle on fresh random inputs (the seed is drawn per campaign)."""
    if ctx.rehearsal and emulation_library() is None:
        return result("skipped", NO_EMULATION)
    rc, out = run_streamed(_selftest_argv(ctx))
    summary = json_block(out)
    if summary is None:
        return result("error", f"the self-test printed no summary (exit status {rc})")
    checks = summary.get("checks", {})
    failed = [name for name, c in checks.items() if not c.get("passed")]
    figures = {"seed": ctx.options["check_seed"], "device": summary.get("device"), "checks": checks}
    if summary.get("passed") and rc == 0:
        return result("ok", f"{len(checks)}/{len(checks)} kernel checks passed (seed {figures['seed']})", **figures)
    return result("failed", f"failed: {', '.join(failed) or summary.get('error', 'see raw.log')}", **figures)


def sanitizer_summary(text: str) -> dict:
    """compute-sanitizer's verdict lines: memcheck 'ERROR SUMMARY: N errors', racecheck
    'RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)'."""
    out = {}
    m = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if m:
        out["errors"] = int(m[-1])
    m = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        hazards, errors, warnings = (int(v) for v in m[-1])
        out.update(hazards=hazards, errors=errors, warnings=warnings)
    return out


def sanitizer(ctx: Context, tool: str, target: str) -> dict:
    """``target`` (the kernels self-test, or one device round of the probe) under ``tool``."""
    program = _selftest_argv(ctx) if target == "selftest" else \
        [sys.executable, "-m", "freedit.benchmarks.device_round_probe", "--maths", "numpy,device", "--lib",
         ctx.kernels_lib]
    argv = [find_tool("compute-sanitizer") or "compute-sanitizer", "--tool", tool,
            "--error-exitcode", str(SANITIZER_EXIT), "--print-limit", "100", *program]
    t0 = time.perf_counter()
    rc, out = run_streamed(argv)
    verdict = sanitizer_summary(out)
    report = json_block(out) or {}
    figures = {"tool": tool, "target": target, "exit_status": rc, "seconds": time.perf_counter() - t0, **verdict,
               "program_passed": report.get("passed")}
    found = ", ".join(f"{verdict[k]} {k}" for k in ("errors", "hazards", "warnings") if verdict.get(k))
    if rc == SANITIZER_EXIT or found:
        return result("failed", f"{tool} found {found or 'errors'} (see raw.log)", **figures)
    if "errors" not in verdict:
        return result("error", f"no {tool} summary line in the output (exit status {rc})", **figures)
    if rc != 0 or not report.get("passed"):
        return result("failed", f"clean under {tool}, but the program itself failed (exit status {rc})", **figures)
    return result("ok", f"{tool}: 0 errors" + (", 0 hazards" if tool == "racecheck" else "") + f" on the {target}",
                  **figures)


# ---- 3. the digits model on the GPU backends ------------------------------------------------------
def _generate_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("sampler", "window", "relax", "verifier")}


def digits_cpu_reference(ctx: Context) -> dict:
    """The CPU path (ONNX Runtime, numpy maths) on the campaign's labels and seed: the accept
    decisions and step counts the GPU runs must make."""
    from freedit.runtime.pipeline import Pipeline

    pipe = Pipeline.default()
    decisions, samples, figures = {}, {}, {}
    for label, config in CONFIGS:
        t0 = time.perf_counter()
        res = pipe.generate(list(LABELS), steps=ctx.steps, seed=SEED, batch_size=len(LABELS), maths="numpy",
                            **_generate_kwargs(config))
        decisions[label], samples[label] = outcome(res), res.samples
        figures[label] = {"mean_target_calls": res.summary["mean_target_calls"], "seconds": time.perf_counter() - t0,
                          "acceptance": res.summary.get("acceptance")}
        print(f"{label}: {figures[label]}", flush=True)
    (ctx.work / "digits_cpu_reference.json").write_text(json.dumps(decisions))
    np.savez(ctx.work / "digits_cpu_reference.npz", **{label: s for label, s in samples.items()})
    return result("ok", f"{len(CONFIGS)} configurations x {len(LABELS)} samples, {ctx.steps} steps, seed {SEED}",
                  configs=figures, steps=ctx.steps, labels=list(LABELS), backend=pipe.backend.name)


def _load_reference(ctx: Context):
    path = ctx.work / "digits_cpu_reference.json"
    if not path.is_file():
        return None
    with np.load(ctx.work / "digits_cpu_reference.npz") as data:
        samples = {k: data[k] for k in data.files}
    return json.loads(path.read_text()), samples


def compare_with_reference(res, decisions: dict, samples: np.ndarray) -> dict:
    """Accept decisions and step counts of ``res`` against the CPU run of the same samples."""
    got = outcome(res)
    n = len(got["target_calls"])
    out = {"decisions_equal": got["accepted"] == decisions["accepted"][:n]
           and got["target_calls"] == decisions["target_calls"][:n],
           "max_abs_diff": float(np.max(np.abs(res.samples - samples[:n])))}
    if not out["decisions_equal"]:
        for i in range(n):
            a, b = got["accepted"][i], decisions["accepted"][i]
            if a != b or got["target_calls"][i] != decisions["target_calls"][i]:
                j = next((r for r, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                out["first_mismatch"] = {"sample": i, "round": j, "gpu": a[j:j + 3], "cpu": b[j:j + 3]}
                break
    return out


def _open_digits(ctx: Context, backend: str, model_dir: Path | None = None, precision: str | None = None):
    from freedit.runtime.pipeline import Pipeline, default_model_dir

    return Pipeline.from_directory(model_dir or default_model_dir(), backend=backend, precision=precision,
                                   threads=ctx.pick(None, 1))  # a rehearsal shares a small CPU


def _device_maths(ctx: Context) -> dict:
    """The round's maths on the device: the GPU's kernels, or in a rehearsal their host emulation
    where it is built (else the numpy round)."""
    return {"maths": "device"} if not ctx.rehearsal or emulation_library() else {"maths": "numpy"}


def digits_timing(ctx: Context, backend: str, graphs: bool, model_dir: Path | None = None) -> dict:
    """Sequential vs lossless FREE (L = 4, 8) vs relax at batch 1 and 8: wall-clock medians over
    interleaved repeats, serial DiT calls, acceptance; decisions checked against the CPU path."""
    backend = ctx.pick(backend, "torch" if backend.startswith("torch") else "onnxruntime")
    precision = "fp32" if backend.startswith("torch") else None  # fp32 so decisions can match the CPU's
    repeats = ctx.pick(int(ctx.options["repeats"]), 1)
    images = ctx.pick(IMAGES, {1: 1, 8: 2})
    t0 = time.perf_counter()
    pipe = _open_digits(ctx, backend, model_dir, precision)
    gen = {"graphs": graphs, **_device_maths(ctx)}
    pipe.generate(list(LABELS[:2]), steps=10, batch_size=2, sampler="free", window=8, **gen)  # warm-up
    pipe.generate(list(LABELS[:2]), steps=10, batch_size=2, sampler="sequential", **gen)
    warmup = time.perf_counter() - t0
    reference = _load_reference(ctx)
    times: dict = {}
    first: dict = {}
    for rep in range(repeats):
        for batch, n in images.items():
            for label, config in CONFIGS:
                res = pipe.generate(list(LABELS[:n]), steps=ctx.steps, seed=SEED, batch_size=batch,
                                    **gen, **_generate_kwargs(config))
                times.setdefault((batch, label), []).append(res.summary["seconds_per_image"])
                print(f"repeat {rep} B={batch} {label}: {res.summary['seconds_per_image'] * 1e3:.1f} ms/image, "
                      f"{res.summary['mean_target_calls']:.1f} serial DiT calls", flush=True)
                if rep == 0:
                    s = res.summary
                    entry = {"serial_dit_calls": s["mean_target_calls"], "nfe_speedup": s["nfe_speedup"],
                             "acceptance": s.get("acceptance"), "batched_dit_calls": s["batched_target_calls"],
                             "drafter_calls": s["drafter_calls"], "maths": res.settings["maths"],
                             "precision": res.settings["precision"], "peak_device_mb": s.get("peak_device_mb")}
                    if reference is not None:
                        entry.update(compare_with_reference(res, reference[0][label], reference[1][label]))
                    first[(batch, label)] = entry
    rows = []
    for (batch, label), ts in times.items():
        seq = float(np.median(times[(batch, "sequential")]))
        med = float(np.median(ts))
        rows.append({"batch": batch, "config": label, "images": images[batch], "repeats": len(ts),
                     "ms_per_image_median": 1e3 * med, "ms_per_image_all": [1e3 * t for t in ts],
                     "speedup_vs_sequential": seq / med, **first[(batch, label)]})
    best = {}
    for batch in images:
        free = [r for r in rows if r["batch"] == batch and r["config"].startswith("free L=")]
        best[str(batch)] = min(free, key=lambda r: r["ms_per_image_median"])["config"]
    figures = {"backend": pipe.backend.name, "steps": ctx.steps, "seed": SEED, "warmup_s": warmup, "rows": rows,
               "best_lossless": best, "cpu_reference": reference is not None}
    pipe.close()
    speedup = {(r["batch"], r["config"]): r["speedup_vs_sequential"] for r in rows}
    summary = "; ".join(f"B={b}: {best[str(b)]} {speedup[(b, best[str(b)])]:.2f}x" for b in images)
    if reference is None:
        return result("ok", f"{summary} vs sequential (decisions not compared: no CPU reference)", **figures)
    bad = [f"B={r['batch']} {r['config']}" for r in rows if not r["decisions_equal"]]
    if bad:
        return result("failed", f"accept decisions or step counts differ from the CPU path's: {', '.join(bad)}",
                      **figures)
    return result("ok", f"{summary} vs sequential; decisions and step counts equal the CPU path's", **figures)


def digits_torch_cuda(ctx: Context) -> dict:
    return digits_timing(ctx, "torch-cuda", graphs=False)  # torch allocates while it runs: never captured


def digits_torch_cuda_compiled(ctx: Context) -> dict:
    return digits_timing(ctx, "torch-cuda-compiled", graphs=False)  # torch's own CUDA graphs per call


def digits_onnxruntime_cuda(ctx: Context) -> dict:
    return digits_timing(ctx, "onnxruntime-cuda", graphs=True)


def digits_tensorrt(ctx: Context) -> dict:
    """Plans for the bundled model built here for this GPU (``freedit build``'s code), then timed."""
    from freedit.engine.directory import build_directory
    from freedit.engine.profiles import BuildSettings
    from freedit.engine.tensorrt_api import load_tensorrt
    from freedit.runtime.pipeline import default_model_dir

    folder = ctx.work / "digits_tensorrt"
    folder.mkdir(exist_ok=True)
    for name in ("dit.onnx", "drafter.onnx", "pipeline.json"):
        shutil.copy2(default_model_dir() / name, folder / name)
    arch = ctx.figures("machine")["gpu"]["arch"]
    build_directory(folder, load_tensorrt("tensorrt"), BuildSettings(batch_sizes=(1, 8), window=8, targets=(arch,)),
                    log=print, progress=False)
    return digits_timing(ctx, "tensorrt", graphs=True, model_dir=folder)


# ---- 4. the lossless check on GPU output ------------------------------------------------------------
def two_sample_gpu(ctx: Context) -> dict:
    """FREE vs sequential on the GPU (MMD and label tests), and accept-almost-everything (relax with
    a huge lambda, through the same device kernels) as the control the test must reject."""
    from freedit.benchmarks.lossless_digits import ALPHA, compare, sample_features

    backend = ctx.pick("torch-cuda", "torch")
    n, steps, perms = ctx.pick(1000, 40), ctx.pick("50", "6"), ctx.pick(300, 20)
    pipe = _open_digits(ctx, backend, precision="fp32")
    gen = {"graphs": False, **_device_maths(ctx)}
    seq = sample_features(pipe, "sequential", steps, n, seed=11, progress=False, **gen)
    free = sample_features(pipe, "free", steps, n, seed=22, window=8, progress=False, **gen)
    biased = sample_features(pipe, "free-relax", steps, n, seed=33, window=8, relax=1e6, progress=False, **gen)
    pipe.close()
    keep = ("acceptance", "nfe_speedup", "residual_proposals", "residual_cap_hits")
    figures = {"backend": pipe.backend.name, "n": n, "steps": steps, "alpha": ALPHA, "permutations": perms,
               "free": {k: free["summary"][k] for k in keep}, "biased": {k: biased["summary"][k] for k in keep},
               "free_vs_sequential": compare(seq, free, perms), "biased_vs_sequential": compare(seq, biased, perms),
               "seconds": {k: v["seconds"] for k, v in (("sequential", seq), ("free", free), ("biased", biased))}}
    fv, bv = figures["free_vs_sequential"], figures["biased_vs_sequential"]
    problems = []
    if fv["mmd"]["p_value"] < ALPHA or fv["labels"]["p_value"] < ALPHA:
        problems.append(f"FREE differs from sequential (MMD p = {fv['mmd']['p_value']:.3g}, labels p = "
                        f"{fv['labels']['p_value']:.3g})")
    if figures["free"]["residual_cap_hits"]:
        problems.append("the residual sampler hit its cap")
    if bv["mmd"]["p_value"] >= ALPHA:
        problems.append(f"the test missed the biased control (MMD p = {bv['mmd']['p_value']:.3g}): no power")
    text = (f"FREE vs sequential MMD p = {fv['mmd']['p_value']:.3g}, labels p = {fv['labels']['p_value']:.3g}; "
            f"biased control MMD p = {bv['mmd']['p_value']:.3g} (n = {n}, {steps} steps)")
    return result("failed", "; ".join(problems), **figures) if problems else result("ok", text, **figures)


# ---- 5. DiT-XL/2 cost curves and the projected speed-up --------------------------------------------
def time_call(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, after two warm-up calls)."""
    import torch

    fn(), fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def graphed(fn):
    """``fn`` captured into a torch CUDA graph (warm-up on a side stream first, as torch requires):
    (replay, the captured outputs)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _inputs(info, rows: int, device: str, feat: bool, generator) -> list:
    import torch

    x = torch.randn(rows, info.in_channels, info.input_size, info.input_size, device=device, generator=generator)
    t = torch.randint(0, 1000, (rows,), device=device, generator=generator).float()
    y = torch.randint(0, info.num_classes, (rows,), device=device, generator=generator)
    if not feat:
        return [x, t, y]
    f = torch.randn(rows, info.num_tokens, info.hidden_size, device=device, generator=generator)
    return [f, x, t, y]


def engine_cost(backend, engine: str, info, rows: int, repeats: int, cuda: bool, seed: int) -> dict:
    """One engine call on ``rows`` device rows: eager, and replayed from a CUDA graph (GPU only),
    with the graph's outputs checked against eager ones (a capture that reads stale memory shows)."""
    import torch

    device = "cuda" if cuda else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    args = _inputs(info, rows, device, engine == "drafter", generator)

    def call():
        return backend.forward(engine, args)

    out = {"rows": rows, "eager_s": time_call(call, repeats, cuda)}
    if cuda:
        graph, captured = graphed(call)
        out["graph_s"] = time_call(graph.replay, repeats, cuda)
        eager = call()
        graph.replay()
        torch.cuda.synchronize()
        ref = eager[0].float()
        out["graph_vs_eager_rel_err"] = float((captured[0].float() - ref).norm() / ref.norm().clamp_min(1e-30))
        del graph, captured
    return out


def digits_acceptance() -> tuple[np.ndarray | None, str]:
    """a(t) of lossless FREE L=8 on the digits model at 250 steps, from the recorded CPU bench (256
    images; the accept decisions do not depend on the machine), and where it comes from."""
    from freedit.runtime.adaptive import acceptance_profile

    if ACCEPTANCE_SOURCE.is_file():
        bench = json.loads(ACCEPTANCE_SOURCE.read_text())
        group = bench["groups"][0]
        config = next(c for c in group["configs"] if c["label"] == "free L=8")
        return (acceptance_profile(config["acceptance_by_step"], int(group["steps"])),
                f"{ACCEPTANCE_SOURCE.relative_to(REPO)}: free L=8, {bench['config']['n']} images, "
                f"{group['steps']} steps")
    return None, f"{ACCEPTANCE_SOURCE.relative_to(REPO)} is missing"


def projections(acc: np.ndarray, verify: list[float], draft: float, batch: int, max_window: int = 8,
                round_overhead: float = 0.0) -> dict:
    """Projected FREE speed-up over sequential at acceptance ``acc`` for fixed L and the adaptive L."""
    from freedit.runtime.adaptive import CostCurve, choose_windows, projected_speedup

    cost = CostCurve(batch, verify, draft)
    fixed = {str(L): projected_speedup(acc, L, cost, round_overhead) for L in range(1, max_window + 1)}
    windows, _ = choose_windows(acc, cost, max_window)
    best = max(fixed, key=fixed.get)
    return {"fixed": fixed, "best_L": int(best), "best": fixed[best],
            "adaptive": projected_speedup(acc, windows, cost, round_overhead),
            "adaptive_windows": np.bincount(windows, minlength=max_window + 1).tolist()}


def xl_cost_curves(ctx: Context) -> dict:
    """DiT-XL/2, random weights, CFG, bf16 at 256 and 512 px: T_verify(n) for n = 1..9 states per
    sample at batch 1 and 8 (eager, and from CUDA graphs), one drafter call, and the projected
    FREE speed-up at the digits acceptance profile."""
    import torch

    from freedit.export.checkpoint import random_dit
    from freedit.export.dit import official_config
    from freedit.export.drafter import Drafter
    from freedit.runtime.backends.pytorch import TorchBackend

    cuda = not ctx.rehearsal
    config = ctx.pick("DiT-XL/2", "DiT-S/2")
    sizes, batches = ctx.pick((256, 512), (32,)), ctx.pick((1, 8), (1, 2))
    max_states, precision = ctx.pick(9, 3), ctx.pick("bf16", "fp32")  # bf16 on a CPU is slow emulation
    acc, source = digits_acceptance()
    curves = []
    for size in sizes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.device("cuda" if cuda else "cpu"):
            dit = random_dit(official_config(config, size))
            drafter = Drafter(dit)
        backend = TorchBackend(dit, drafter, device="cuda" if cuda else "cpu", precision=precision,
                               threads=ctx.pick(None, 1))
        info = backend.info("dit")
        for batch in batches:
            verify = []
            for n in range(1, max_states + 1):
                rows = 2 * batch * n  # CFG: a conditional and a null row per state
                repeats = ctx.pick(10 if rows <= 36 else 5, 2)
                verify.append(engine_cost(backend, "dit", info, rows, repeats, cuda, seed=n))
                v = verify[-1]
                print(f"{config} {size} px B={batch} n={n}: eager {v['eager_s'] * 1e3:.2f} ms"
                      + (f", graph {v['graph_s'] * 1e3:.2f} ms" if "graph_s" in v else ""), flush=True)
            draft = engine_cost(backend, "drafter", info, 2 * batch, ctx.pick(10, 2), cuda, seed=99)
            curve = {"image_size": size, "batch": batch, "verify": verify, "draft": draft}
            key = "graph_s" if cuda else "eager_s"
            times = [v[key] for v in verify]
            curve["relative_verify_cost"] = [t / times[0] for t in times]
            if acc is not None and max_states >= 2:
                curve["projection"] = projections(acc, times, draft[key], batch, max_window=max_states - 1)
            curves.append(curve)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        for c in curves[-len(batches):]:  # this size's curves
            c["torch_peak_mb"] = peak
        del backend, dit, drafter
        if cuda:
            torch.cuda.empty_cache()
    figures = {"config": config, "precision": precision, "cfg": True, "acceptance_source": source,
               "timing": "CUDA events, median; projections use the graph replays" if cuda else "host clock",
               "curves": curves}
    parts = [f"{c['image_size']} px B={c['batch']}: T({max_states})/T(1) = {c['relative_verify_cost'][-1]:.2f}"
             + (f", projected {c['projection']['best']:.2f}x at L={c['projection']['best_L']}" if "projection" in c
                else "") for c in curves]
    return result("ok", "; ".join(parts), **figures)


# ---- 6. the device round's wall-clock against the host path's ---------------------------------------
def _copy_seconds(device, h2d: int, d2h: int, repeats: int = 3) -> float:
    """Pageable copies of the per-round engine I/O the host path moves (what ONNX Runtime's and
    torch's numpy interfaces do), timed on this machine."""
    from freedit.runtime.device import D2H, H2D

    size = max(h2d, d2h, 1)
    buf = device.alloc((size,), np.uint8)
    host = np.ones(size, np.uint8)
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            device.copy(buf.ptr, host.ctypes.data, h2d, H2D, None)
            device.copy(host.ctypes.data, buf.ptr, d2h, D2H, None)
            device.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        device.free(buf)
    return float(np.median(times))


def round_wallclock(ctx: Context) -> dict:
    """Per FREE round at DiT-XL/2 shapes (L = 8), model calls excluded: the device round (kernels on
    the GPU, engines that return at once) against the host path (numpy maths plus the engine I/O
    copies a GPU backend makes on that path)."""
    from freedit.benchmarks.host_overhead import measure

    shapes, batches = ctx.pick(("4x32x32", "4x64x64"), ("digits",)), ctx.pick((1, 8), (1,))
    window = ctx.pick(8, 2)
    k = device = None
    lib = emulation_library() if ctx.rehearsal else ctx.kernels_lib
    if lib is not None:
        from freedit.runtime import kernels
        from freedit.runtime.device import Device

        k = kernels.load(lib, emulated=ctx.rehearsal)
        device = Device(k)
    rows = []
    try:
        for shape in shapes:
            for batch in batches:
                big = shape != "digits" and batch >= 8
                host = measure("numpy", shape, batch, window, rounds=ctx.pick(3 if big else 10, 2))
                row = {"shape": shape, "batch": batch, "window": window,
                       "numpy_maths_ms": host["wall_ms_per_round"], "engine_io_bytes": host["h2d_bytes_per_round"]
                       + host["d2h_bytes_per_round"]}
                if device is not None:
                    row["copy_ms"] = 1e3 * _copy_seconds(device, int(host["h2d_bytes_per_round"]),
                                                         int(host["d2h_bytes_per_round"]))
                    row["host_path_ms"] = row["numpy_maths_ms"] + row["copy_ms"]
                    for graphs in (False, True):
                        e = measure("device", shape, batch, window, rounds=20, graphs=graphs, kernels=k)
                        key = "device_graph" if graphs else "device"
                        row[f"{key}_ms"] = e["wall_ms_per_round"]
                        row[f"{key}_host_ms"] = e["host_ms_per_round"]
                        row[f"{key}_launches"] = e["kernel_launches_per_round"]
                        row["device_bytes_per_sample"] = e["bytes_per_sample_per_round"]
                    row["speedup"] = row["host_path_ms"] / min(row["device_ms"], row["device_graph_ms"])
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        if device is not None:
            device.close()
    if device is None:
        return result("ok", f"numpy path only: {NO_EMULATION}", rows=rows)
    text = "; ".join(f"{r['shape']} B={r['batch']}: {r['host_path_ms']:.1f} ms host path vs "
                     f"{min(r['device_ms'], r['device_graph_ms']):.2f} ms device" for r in rows)
    return result("ok", text, rows=rows)


def probe_rehearsal(ctx: Context) -> dict:
    """The device round probe (what the sanitizer steps run): on the numpy round, and on the host
    emulation of the kernels against it where it is built."""
    from freedit.benchmarks.device_round_probe import device_memory, probe

    try:
        memory = device_memory(None)
    except RuntimeError as exc:
        report = probe(("numpy",))
        return result("ok", f"probe ran on the numpy round only ({exc})", **report)
    report = probe(("numpy", "device"), memory)
    return result("ok" if report["passed"] else "failed",
                  f"probe: device round ({'emulated' if memory == 'host' else 'GPU'}) vs numpy round, "
                  f"{report['compared']} comparisons, {'all equal' if report['passed'] else 'NOT equal'}", **report)


#: step name -> function (the campaign's table of steps is in gpu_campaign.py)
FUNCTIONS = {
    "machine": machine,
    "kernels_build": kernels_build,
    "kernels_checks": kernels_checks,
    "sanitizer_memcheck_selftest": lambda ctx: sanitizer(ctx, "memcheck", "selftest"),
    "digits_cpu_reference": digits_cpu_reference,
    "digits_torch_cuda": digits_torch_cuda,
    "digits_onnxruntime_cuda": digits_onnxruntime_cuda,
    "digits_tensorrt": digits_tensorrt,
    "xl_cost_curves": xl_cost_curves,
    "round_wallclock": round_wallclock,
    "sanitizer_memcheck_round": lambda ctx: sanitizer(ctx, "memcheck", "round"),
    "two_sample_gpu": two_sample_gpu,
    "sanitizer_racecheck_selftest": lambda ctx: sanitizer(ctx, "racecheck", "selftest"),
    "sanitizer_racecheck_round": lambda ctx: sanitizer(ctx, "racecheck", "round"),
    "digits_torch_cuda_compiled": digits_torch_cuda_compiled,
}
#: What the dry run rehearses on the CPU for each GPU step (steps not listed have no CPU rehearsal).
REHEARSALS = {
    "kernels_checks": kernels_checks,
    "digits_torch_cuda": digits_torch_cuda,
    "xl_cost_curves": xl_cost_curves,
    "round_wallclock": round_wallclock,
    "sanitizer_memcheck_round": probe_rehearsal,
    "two_sample_gpu": two_sample_gpu,
}
#: Why the other GPU steps have no rehearsal of their own.
NOT_REHEARSED = {
    "kernels_build": "compiles for the GPU's own architecture (the CMake build is tested in tests/test_kernels.py)",
    "sanitizer_memcheck_selftest": "needs compute-sanitizer and a GPU",
    "sanitizer_racecheck_selftest": "needs compute-sanitizer and a GPU",
    "sanitizer_racecheck_round": "runs the probe, rehearsed under sanitizer_memcheck_round",
    "digits_onnxruntime_cuda": "the code of digits_torch_cuda's rehearsal on another backend",
    "digits_tensorrt": "the code of digits_torch_cuda's rehearsal on another backend, after a TensorRT build",
    "digits_torch_cuda_compiled": "the code of digits_torch_cuda's rehearsal on another backend",
}
