"""What a launch costs on the host emulation of the kernels library (runtime/csrc/emulation).

    python -m freedit.benchmarks.emulation_launch --out benchmarks/results/emulation_launch

Builds the emulated library and its probe kernels into a temporary folder (or uses --build-dir),
then times launches: the shim's probes (an empty kernel, 256-thread blocks with two
__syncthreads, 1024-thread blocks with two) and the library's own kernels at the shapes of a FREE
round (rows of 256 elements: one block per row for the row reductions, grid-stride kernels with
256-thread blocks, the 1024-thread accept scan). Each case runs with one host thread and with the
default pool, wall-clock and process CPU time per launch (median and minimum over repeats).
Writes <out>.json, <out>.md and <out>_raw.log (the machine's load average is recorded: on a busy
machine wall-clock figures are upper bounds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from freedit.runtime import kernels
from freedit.runtime.schedule import Schedule


def _time(launch, repeats: int, inner: int) -> dict:
    """Median and minimum wall/CPU ms per launch over `repeats` runs of `inner` launches."""
    launch()  # warm: stacks, pool, caches
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            launch()
        wall.append((time.perf_counter() - w0) / inner * 1e3)
        cpu.append((time.process_time() - c0) / inner * 1e3)
    return {"wall_ms_median": statistics.median(wall), "wall_ms_min": min(wall),
            "cpu_ms_median": statistics.median(cpu), "cpu_ms_min": min(cpu)}


def probe_cases(probes) -> dict:
    out = np.zeros(1024 * 512, dtype=np.int32)

    def ok(code):
        if code:
            raise RuntimeError(f"probe launch failed with {code}: {probes.emulation.last_error_detail()}")

    cases = {}
    for grid in (1, 64, 256):
        cases[f"empty kernel, {grid} x 256 threads"] = (lambda g=grid: ok(probes.probe_empty(g, 256, None)), grid)
        cases[f"2 barriers, {grid} x 256 threads"] = (
            lambda g=grid: ok(probes.probe_neighbours(g, 256, 1, 1, out.ctypes.data)), grid)
    for grid in (1, 16):
        cases[f"2 barriers, {grid} x 1024 threads"] = (
            lambda g=grid: ok(probes.probe_neighbours(g, 1024, 1, 1, out.ctypes.data)), grid)
    return cases


def library_cases(k: kernels.Kernels, mem: kernels.LibraryMemory, rows: int) -> dict:
    """The library's kernels on `rows` rows of 256 elements (C=4, 8x8), as a FREE round calls them."""
    rng = np.random.default_rng(0)
    shape = (rows, 4, 8, 8)
    sched = Schedule.create("250")
    table = mem.upload(sched.transition_table().astype(np.float32))
    x = mem.upload(rng.standard_normal(shape).astype(np.float32))
    eps_v = mem.upload(rng.standard_normal((rows, 8, 8, 8)).astype(np.float32))
    steps = mem.upload(rng.integers(1, sched.num_steps, rows).astype(np.int32))
    keys = [mem.upload(np.arange(rows, dtype=np.uint32)) for _ in range(3)]
    mean, log_var, z, out = (mem.empty(shape, "float32") for _ in range(4))
    k.transition(x, eps_v, steps, table, mean, log_var)
    k.philox_normal(1, *keys, z)
    log_r, uniform = mem.empty((rows,), "float64"), mem.upload(rng.random(rows))
    windows = mem.upload(np.ones(rows, dtype=np.int32))
    accepted, reject = mem.empty((rows,), "int32"), mem.empty((rows,), "int32")
    return {
        f"transition (learned sigma), {rows} rows": lambda: k.transition(x, eps_v, steps, table, mean, log_var),
        f"philox_normal, {rows} rows": lambda: k.philox_normal(1, *keys, z),
        f"ddpm_step, {rows} rows": lambda: k.ddpm_step(mean, log_var, steps, z, out),
        f"log_ratio (block per row), {rows} rows": lambda: k.log_ratio(x, mean, log_var, mean, log_var, log_r),
        f"accept_window (1 x 1024 threads), {rows} samples": lambda: k.accept_window(
            log_r, uniform, windows, accepted, reject_row=reject),
        f"reflect (block per row), {rows} rows": lambda: k.reflect(x, mean, out, log_var, z),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output prefix, e.g. benchmarks/results/emulation_launch")
    parser.add_argument("--build-dir", help="an existing emulated build (default: build one in a temp folder)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", default="72,288", help="FREE round rows to time the library kernels at")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"error: output folder {out.parent} does not exist", file=sys.stderr)
        return 2
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        print(f"error: --rows must be comma-separated integers, got {args.rows!r}", file=sys.stderr)
        return 2
    log_lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        if args.build_dir:
            build = Path(args.build_dir)
            library, probes_path = build / kernels.EMU_LIB_NAME, build / kernels.EMU_PROBES_NAME
        else:
            built = kernels.build_emulated(Path(tmp) / "build")
            library, probes_path = built.library, built.probes
            log(f"built the emulation in {built.seconds:.1f} s")
        k, probes = kernels.Kernels(library), kernels.load_probes(probes_path)
        pool = os.cpu_count() or 1
        log(f"machine: {platform.processor() or platform.machine()}, {pool} CPUs, load average "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; python {platform.python_version()}")
        results = []
        mem = kernels.LibraryMemory(k)
        try:
            groups = [("probe", probes, name, fn, blocks) for name, (fn, blocks) in probe_cases(probes).items()]
            for rows in rows_list:
                groups += [("library", k, name, fn, None) for name, fn in library_cases(k, mem, rows).items()]
            for threads in (1, 0):
                for kind, lib, name, fn, blocks in groups:
                    lib.emulation.set_threads(threads)
                    inner = 20 if "1024" not in name and "288" not in name else 5
                    timing = _time(fn, args.repeats, inner)
                    row = {"case": name, "source": kind, "host_threads": threads or pool, **timing}
                    if blocks:
                        row["cpu_us_per_block_min"] = timing["cpu_ms_min"] * 1e3 / blocks
                    results.append(row)
                    log(f"{row['host_threads']} thread(s) | {name}: wall {timing['wall_ms_median']:.3f} ms median "
                        f"({timing['wall_ms_min']:.3f} min), cpu {timing['cpu_ms_median']:.3f} ms median "
                        f"({timing['cpu_ms_min']:.3f} min)")
        finally:
            mem.close()
            for lib in (k, probes):
                lib.emulation.set_threads(0)
        log(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    command = "python -m freedit.benchmarks.emulation_launch " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "cpus": pool, "results": results}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Launch cost of the host emulation\n", f"`{command}` ({pool} CPUs; raw output in "
             f"`{out.name}_raw.log`). Per launch; wall clock includes waiting for the CPU on a busy machine, "
             "CPU time is the process's (all host threads).\n",
             "| host threads | case | wall ms (median / min) | CPU ms (median / min) |", "| ---: | --- | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['host_threads']} | {r['case']} | {r['wall_ms_median']:.3f} / {r['wall_ms_min']:.3f} | "
                     f"{r['cpu_ms_median']:.3f} / {r['cpu_ms_min']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    Path(f"{out}_raw.log").write_text("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
