"""Everything only a GPU can tell about freedit, in one command that fits a short GPU lease.

    python -m freedit.benchmarks.gpu_campaign --out DIR [--budget-s 480] [--dry-run] [--only STEP,...]
    bash benchmarks/gpu_campaign.sh --out DIR ...     # the same from a bare checkout (docs/GPU.md)

The steps run in order of value (``STEPS``), each in its own process, so a crash or a poisoned
CUDA context ends that step only. Before a step starts, the campaign checks what it needs (a GPU,
a tool, an earlier step that succeeded) and whether its time estimate fits the budget left; a step
that does not fit is skipped and says so. A running step is stopped at the budget's end. After
every step DIR/campaign.json (status, reason, seconds, figures, peak GPU memory per step) and
DIR/campaign.md are rewritten; DIR/raw.log has everything the steps printed.

``--dry-run`` runs on a machine without a GPU: every GPU step is skipped with the reason, the
other steps run (the machine, the CPU reference), and the GPU steps' code is rehearsed on the CPU
backends at tiny sizes (each GPU step's entry says how its rehearsal went). The step functions
are in gpu_campaign_steps.py; docs/GPU.md says what each figure means.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from freedit.benchmarks import command_line

DEFAULT_BUDGET_S = 480.0
RAW_LOG_LIMIT = 15 * 2**20  # what comes back from the GPU machine: files of at most 16 MiB


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    estimate_s: float  # on the lent H200 at the default options (docs/GPU.md: revise from campaign.json)
    needs: tuple[str, ...] = ()  # earlier steps that must have succeeded
    uses: tuple[str, ...] = ()  # earlier steps whose results it compares with, where they ran
    requires: tuple[str, ...] = ()  # REQUIREMENTS this machine must meet (read from the machine step)
    gpu: bool = True
    scales_with_steps: bool = False  # estimate proportional to --steps (digits runs)

    def estimate(self, options: dict) -> float:
        if self.scales_with_steps:
            return self.estimate_s * (0.25 + 0.75 * options["steps"] / 250)
        return self.estimate_s


#: In order of value. Estimates are guesses until a campaign has run; campaign.json records the real seconds.
STEPS = (
    Step("machine", "GPU, driver, CUDA, compute capability, library and tool versions", 10, gpu=False),
    Step("kernels_build", "the kernels library built for this GPU's architecture (CMake)", 40,
         needs=("machine",), requires=("gpu", "nvcc", "cmake")),
    Step("kernels_checks", "every kernel against the numpy oracle on fresh random inputs", 20,
         needs=("kernels_build",), requires=("gpu",)),
    Step("sanitizer_memcheck_selftest", "compute-sanitizer memcheck on the kernels self-test", 45,
         needs=("kernels_build",), requires=("gpu", "compute-sanitizer")),
    Step("digits_cpu_reference", "the CPU path's accept decisions and step counts for the campaign's seed", 20,
         gpu=False, scales_with_steps=True),
    Step("digits_torch_cuda", "digits DiT on torch CUDA (eager): sequential vs FREE vs relax, B = 1 and 8", 50,
         needs=("kernels_build",), uses=("digits_cpu_reference",), requires=("gpu", "torch-cuda"),
         scales_with_steps=True),
    Step("digits_onnxruntime_cuda", "digits DiT on ONNX Runtime CUDA (I/O binding, CUDA graphs)", 40,
         needs=("kernels_build",), uses=("digits_cpu_reference",), requires=("gpu", "onnxruntime-cuda"),
         scales_with_steps=True),
    Step("digits_tensorrt", "digits DiT on TensorRT plans built here (CUDA graphs)", 90,
         needs=("kernels_build",), uses=("digits_cpu_reference",), requires=("gpu", "tensorrt"),
         scales_with_steps=True),
    Step("xl_cost_curves", "DiT-XL/2 256/512 px bf16 CFG: T_verify(n), n = 1..9, B = 1 and 8; projected speed-up",
         60, needs=("machine",), requires=("gpu", "torch-cuda")),
    Step("round_wallclock", "per-round wall-clock at XL shapes: device round vs host path", 40,
         needs=("kernels_build",), requires=("gpu",)),
    Step("sanitizer_memcheck_round", "compute-sanitizer memcheck on device rounds (the probe)", 40,
         needs=("kernels_build",), requires=("gpu", "compute-sanitizer")),
    Step("two_sample_gpu", "two-sample lossless check on GPU output (FREE vs sequential, biased control)", 45,
         needs=("kernels_build",), requires=("gpu", "torch-cuda")),
    Step("sanitizer_racecheck_selftest", "compute-sanitizer racecheck on the kernels self-test", 60,
         needs=("kernels_build",), requires=("gpu", "compute-sanitizer")),
    Step("sanitizer_racecheck_round", "compute-sanitizer racecheck on device rounds (the probe)", 40,
         needs=("kernels_build",), requires=("gpu", "compute-sanitizer")),
    Step("digits_torch_cuda_compiled", "digits DiT on torch.compile (reduce-overhead: torch's CUDA graphs)", 150,
         needs=("kernels_build",), uses=("digits_cpu_reference",), requires=("gpu", "torch-cuda"),
         scales_with_steps=True),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def _has_tool(name):
    return lambda m: bool((m.get("tools") or {}).get(name))


#: requirement -> (met, given the machine step's figures; why not)
REQUIREMENTS = {
    "gpu": (lambda m: m.get("gpu") is not None, lambda m: m.get("gpu_reason") or "no CUDA GPU"),
    "nvcc": (_has_tool("nvcc"), lambda m: "nvcc is not on PATH"),
    "cmake": (_has_tool("cmake"), lambda m: "cmake is not on PATH"),
    "compute-sanitizer": (_has_tool("compute-sanitizer"), lambda m: "compute-sanitizer is not on PATH"),
    "torch-cuda": (lambda m: m.get("torch_cuda", False),
                   lambda m: "torch is not installed" if "torch" not in m.get("versions", {})
                   else "torch sees no CUDA GPU (a CPU build of torch?)"),
    "onnxruntime-cuda": (lambda m: "CUDAExecutionProvider" in m.get("onnxruntime_providers", []),
                         lambda m: f"onnxruntime {m.get('versions', {}).get('onnxruntime', '?')} has no CUDA execution "
                                   f"provider (providers: {', '.join(m.get('onnxruntime_providers', [])) or 'none'}); "
                                   f"the onnxruntime-gpu wheel is not installed"),
    "tensorrt": (lambda m: any(k.startswith("tensorrt") and "rtx" not in k for k in m.get("versions", {})),
                 lambda m: "TensorRT (the tensorrt package) is not installed"),
}


# ---- the budget ----------------------------------------------------------------------------------
def budget_reason(estimate: float, elapsed: float, budget: float) -> str | None:
    """Why a step of ``estimate`` seconds cannot start ``elapsed`` seconds into ``budget``, or None."""
    left = budget - elapsed
    if estimate <= left:
        return None
    return f"needs ~{estimate:.0f} s, {max(left, 0.0):.0f} s of the {budget:.0f} s budget left"


def step_timeout(estimate: float, elapsed: float, budget: float) -> float:
    """A step is stopped at 3x its estimate (at least estimate + 60 s), never past the budget."""
    return max(1.0, min(budget - elapsed, max(3 * estimate, estimate + 60)))


def selected(only: list[str] | None) -> set[str]:
    """The steps ``--only`` asks for, with the steps they need (the machine always)."""
    if not only:
        return set(STEP_NAMES)
    by_name = {s.name: s for s in STEPS}
    chosen, todo = {"machine"}, list(only)
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo.extend(by_name[name].needs + by_name[name].uses)
    return chosen


# ---- output: raw.log and the console ------------------------------------------------------------------
class RawLog:
    """Everything printed goes to the console and to raw.log (up to RAW_LOG_LIMIT bytes)."""

    def __init__(self, path: Path):
        self.file, self.written, self.lock = path.open("w", encoding="utf-8"), 0, threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            data = line + "\n"
            if self.written + len(data) <= RAW_LOG_LIMIT:
                self.file.write(data)
                self.file.flush()
            elif self.written <= RAW_LOG_LIMIT:
                self.file.write(f"[raw.log truncated at {RAW_LOG_LIMIT} bytes]\n")
                self.file.flush()
                self.written = RAW_LOG_LIMIT + 1
                return
            self.written += len(data)

    def close(self) -> None:
        self.file.close()


class GpuMemory:
    """Peak device-wide GPU memory in use while a step runs (NVML, else nvidia-smi), polled."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.read = interval, self._reader()

    @staticmethod
    def _reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        except Exception:  # noqa: BLE001 - no NVML here: try nvidia-smi, else nothing
            pass
        if shutil.which("nvidia-smi"):
            def smi():
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                return float(out.split()[0])
            try:
                smi()
                return smi
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
        return None

    def watch(self):
        """A context manager whose value holds before_mb and peak_mb once it exits."""
        monitor = self

        class Watch:
            before_mb = peak_mb = None

            def __enter__(self):
                if monitor.read is None:
                    return self
                try:
                    self.before_mb = self.peak_mb = monitor.read()
                except Exception:  # noqa: BLE001 - memory figures are lost, not the step
                    monitor.read = None
                    return self
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()
                return self

            def _poll(self):
                while not self._stop.wait(monitor.interval):
                    try:
                        self.peak_mb = max(self.peak_mb, monitor.read())
                    except Exception:  # noqa: BLE001 - a failed poll loses one sample, not the step
                        pass

            def __exit__(self, *exc):
                if monitor.read is not None:
                    self._stop.set()
                    self._thread.join()
        return Watch()


# ---- the campaign (parent process) ------------------------------------------------------------------
def _child(args: list[str], work: Path, env: dict, timeout: float, log, prefix: str) -> tuple[int | None, float]:
    """Run ``python -m freedit.benchmarks.gpu_campaign ARGS`` in a new session, its output into the
    log; killed (its whole process group) at ``timeout``. (exit status or None on timeout, seconds)."""
    cmd = [sys.executable, "-m", "freedit.benchmarks.gpu_campaign", *args, "--work", str(work)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True, bufsize=1)

    def pump():
        for line in proc.stdout:
            log(f"[{prefix}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and what it started (compute-sanitizer, builds)
        proc.wait()
        rc = None
    reader.join(timeout=10)
    return rc, time.perf_counter() - t0


class Campaign:
    def __init__(self, options: dict, out: Path, log):
        self.options, self.out, self.log = options, out, log
        self.work = Path(tempfile.mkdtemp(prefix="freedit-gpu-campaign-"))
        self.entries: dict[str, dict] = {}
        self.kernels_lib: str | None = None
        self.memory = GpuMemory()
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.kernels_lib:
            env["FREEDIT_KERNELS_LIB"] = self.kernels_lib
        return env

    def context(self) -> dict:
        return {"options": self.options, "results": self.entries, "kernels_lib": self.kernels_lib}

    def skip_reason(self, step: Step, chosen: set[str]) -> str | None:
        if step.name not in chosen:
            return "not selected (--only)"
        if step.gpu and self.options["dry_run"]:
            return "dry run: needs a CUDA GPU"
        for need in step.needs:
            status = self.entries.get(need, {}).get("status")
            if status != "ok":
                return f"needs {need}, which {'did not run' if status is None else 'was ' + status}"
        machine = self.entries.get("machine", {}).get("figures") or {}
        for req in step.requires:
            met, why = REQUIREMENTS[req]
            if not met(machine):
                return why(machine)
        return budget_reason(step.estimate(self.options), self.elapsed, self.options["budget_s"])

    def run(self) -> dict:
        chosen = selected(self.options["only"])
        try:
            for step in STEPS:
                entry = {"name": step.name, "title": step.title, "gpu": step.gpu,
                         "estimate_s": round(step.estimate(self.options), 1), "status": "skipped", "reason": "",
                         "seconds": 0.0, "figures": {}, "peak_gpu_mb": None, "gpu_mb_before": None}
                reason = self.skip_reason(step, chosen)
                if reason is not None:
                    entry["reason"] = reason
                    self.log(f"== {step.name}: skipped ({reason})")
                else:
                    self.run_step(step, entry)
                self.entries[step.name] = entry
                if step.name == "kernels_build" and entry["status"] == "ok":
                    self.kernels_lib = entry["figures"]["library"]
                self.write()
            if self.options["dry_run"]:
                self.rehearse([s.name for s in STEPS if self.entries[s.name]["reason"].startswith("dry run")])
        finally:
            self.write(final=True)
            shutil.rmtree(self.work, ignore_errors=True)
        return self.report()

    def run_step(self, step: Step, entry: dict) -> None:
        estimate = step.estimate(self.options)
        timeout = step_timeout(estimate, self.elapsed, self.options["budget_s"])
        self.log(f"== {step.name}: {step.title} (estimate {estimate:.0f} s, stopped after {timeout:.0f} s)")
        (self.work / "context.json").write_text(json.dumps(self.context()))
        result_file = self.work / f"{step.name}.result.json"
        with self.memory.watch() as mem:
            rc, seconds = _child(["--run-step", step.name], self.work, self.env(), timeout, self.log, step.name)
        entry.update(seconds=round(seconds, 2), peak_gpu_mb=mem.peak_mb, gpu_mb_before=mem.before_mb)
        if rc is None:
            entry.update(status="timeout", reason=f"stopped after {timeout:.0f} s (estimate {estimate:.0f} s)")
        elif not result_file.is_file():
            try:
                signame = f" ({signal.Signals(-rc).name})" if rc < 0 else ""
            except ValueError:
                signame = ""
            entry.update(status="error", reason=f"the step's process ended with exit status {rc}{signame} and no "
                                                f"result (see raw.log)")
        else:
            entry.update(json.loads(result_file.read_text()))
        self.log(f"== {step.name}: {entry['status']} in {seconds:.1f} s: {entry['reason']}")

    def rehearse(self, names: list[str]) -> None:
        """The dry run: the GPU steps' code on the CPU backends, all in one process."""
        from freedit.benchmarks.gpu_campaign_steps import NOT_REHEARSED, REHEARSALS

        todo = [n for n in names if n in REHEARSALS]
        for name in names:
            if name not in REHEARSALS:
                self.entries[name]["rehearsal"] = {"status": "none", "reason": NOT_REHEARSED[name]}
        if not todo:
            return
        self.log(f"== rehearsal on the CPU: {', '.join(todo)}")
        (self.work / "context.json").write_text(json.dumps(self.context()))
        rc, _ = _child(["--rehearse", ",".join(todo)], self.work, self.env(), 900, self.log, "rehearsal")
        path = self.work / "rehearsal.json"
        found = json.loads(path.read_text()) if path.is_file() else {}
        for name in todo:
            self.entries[name]["rehearsal"] = found.get(name) or {
                "status": "error", "reason": f"the rehearsal process ended with exit status {rc} before this step"}

    def report(self) -> dict:
        steps = [self.entries[s.name] for s in STEPS if s.name in self.entries]
        return {"command": self.options["command"], "started": self.started, "dry_run": self.options["dry_run"],
                "budget_s": self.options["budget_s"], "elapsed_s": round(self.elapsed, 1),
                "options": {k: v for k, v in self.options.items() if k != "command"},
                "machine": (self.entries.get("machine") or {}).get("figures"), "steps": steps}

    def write(self, final: bool = False) -> None:
        from freedit.benchmarks.gpu_campaign_report import write_report

        write_report(self.report(), self.out, final)


# ---- a step's own process -------------------------------------------------------------------------------
def _context(work: Path, rehearsal: bool):
    from freedit.benchmarks.gpu_campaign_steps import Context

    data = json.loads((work / "context.json").read_text())
    return Context(options=data["options"], work=work, results=data["results"], rehearsal=rehearsal,
                   kernels_lib=data["kernels_lib"])


def _call(fn, ctx) -> dict:
    import traceback

    try:
        out = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - the step's error is its result; the campaign goes on
        traceback.print_exc()
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "figures": {}}
    return out


def run_step(name: str, work: Path) -> int:
    from freedit.benchmarks.gpu_campaign_steps import FUNCTIONS

    out = _call(FUNCTIONS[name], _context(work, rehearsal=False))
    _write_json(work / f"{name}.result.json", out)
    return 0


def rehearse(names: list[str], work: Path) -> int:
    from freedit.benchmarks.gpu_campaign_steps import REHEARSALS

    ctx = _context(work, rehearsal=True)
    done = {}
    for name in names:
        print(f"-- rehearsing {name}", flush=True)
        t0 = time.perf_counter()
        out = _call(REHEARSALS[name], ctx)
        done[name] = {"status": {"error": "error", "skipped": "none"}.get(out["status"], "ok"),
                      "seconds": round(time.perf_counter() - t0, 2), "step_status": out["status"],
                      "reason": out["reason"]}
        _write_json(work / "rehearsal.json", done)
    return 0


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# ---- the command line -----------------------------------------------------------------------------------
class UsageError(ValueError):
    pass


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m freedit.benchmarks.gpu_campaign",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="steps, in order: " + ", ".join(STEP_NAMES))
    ap.add_argument("--out", help="folder for campaign.json, campaign.md, raw.log and command.txt")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds the whole campaign may take (default {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: skip the GPU steps, rehearse their code on the CPU")
    ap.add_argument("--only", help="comma-separated steps to run (with the steps they need)")
    ap.add_argument("--steps", type=int, default=250, help="DDPM steps of the digits runs (default 250)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the digits timings (default 3)")
    ap.add_argument("--run-step", help=argparse.SUPPRESS)
    ap.add_argument("--rehearse", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def check(args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    if not args.out:
        raise UsageError("--out DIR is required")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        raise UsageError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.steps < 2:
        raise UsageError(f"--steps must be at least 2 (FREE needs room for a window), got {args.steps}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only is not None else None
    if only is not None:
        bad = [s for s in only if s not in STEP_NAMES]
        if bad or not only:
            raise UsageError(f"--only: unknown step(s) {bad or '(none given)'}; steps: {', '.join(STEP_NAMES)}")
    return out, only


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.run_step:
        return run_step(args.run_step, Path(args.work))
    if args.rehearse:
        return rehearse(args.rehearse.split(","), Path(args.work))
    try:
        out, only = check(args)
    except UsageError as exc:
        print(f"gpu_campaign: {exc}", file=sys.stderr)
        return 2
    out.mkdir(exist_ok=True)
    command = command_line("freedit.benchmarks.gpu_campaign", argv)
    (out / "command.txt").write_text(command.strip() + "\n")
    options = {"command": command.strip(), "budget_s": args.budget_s, "dry_run": args.dry_run, "only": only,
               "steps": args.steps, "repeats": args.repeats, "check_seed": secrets.randbelow(2**31)}
    log = RawLog(out / "raw.log")
    try:
        log(f"gpu_campaign: budget {args.budget_s:.0f} s{', dry run' if args.dry_run else ''}; out {out}")
        report = Campaign(options, out, log).run()
        log("")
        for e in report["steps"]:
            log(f"{e['name']:<30} {e['status']:<8} {e['seconds']:>6.1f} s  {e['reason']}"
                + (f"  [rehearsal: {e['rehearsal']['status']}]" if "rehearsal" in e else ""))
        log(f"elapsed {report['elapsed_s']:.0f} s of {args.budget_s:.0f} s; wrote {out / 'campaign.json'}, "
            f"{out / 'campaign.md'}, {out / 'raw.log'}")
    finally:
        log.close()
    bad = [e for e in report["steps"] if e["status"] in ("failed", "error", "timeout")
           or e.get("rehearsal", {}).get("status") == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
