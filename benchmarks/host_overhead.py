"""Host work per FREE round, numpy path vs device path, at digits and DiT-XL/2 shapes.

What the host spends on one round, with the model calls and kernels taken out: engines are bound
to a backend whose calls return at once, and the device path runs on the kernels' host emulation
with null launches (validated, counted, not executed). So the figure is the host's own share of a
round on a GPU: orchestration, launch calls and (numpy path) all the sampling maths and feature
gathering. Every round is a steady-state round (every sample has a parent, every window is full):
the null model returns zeros for drafter and target alike, so p = q and every draft is accepted,
and the device path's report is written as the kernels would write it. Copies are counted by the
library (device path) or computed from the engine I/O a GPU backend copies per call (numpy path).

    freedit bench --host-overhead [--out benchmarks/results/host_overhead]
    python -m freedit.benchmarks.host_overhead --out benchmarks/results/host_overhead

writes host_overhead.json, host_overhead.md, host_overhead.png and raw.log into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from freedit.runtime.backends.base import Backend, BoundEngine
from freedit.runtime.contract import ModelInfo
from freedit.runtime.round import ENGINE_IO, RoundRunner, RoundSettings, RoundSpec
from freedit.runtime.schedule import Schedule

#: latent shape -> the DiT it stands for (learned sigma, CFG on 3 of 4 channels as DiT's reference)
SHAPES = {
    "digits": ModelInfo(input_size=16, in_channels=1, patch_size=4, hidden_size=96, num_classes=10, learn_sigma=True,
                        cfg_mode="all"),
    "4x32x32": ModelInfo(input_size=32, in_channels=4, patch_size=2, hidden_size=1152, num_classes=1000,
                         learn_sigma=True, cfg_mode="reference"),
    "4x64x64": ModelInfo(input_size=64, in_channels=4, patch_size=2, hidden_size=1152, num_classes=1000,
                         learn_sigma=True, cfg_mode="reference"),
}
MODELS = {"digits": "bundled digits DiT", "4x32x32": "DiT-XL/2 256 px", "4x64x64": "DiT-XL/2 512 px"}
TARGETS = {"host_ms_b1": 0.3, "host_ms_b32": 1.0, "bytes_per_sample": 64}


class NullBackend(Backend):
    """Engines whose calls return at once, leaving the bound outputs as they are (zeros)."""

    name = "null"

    def __init__(self, info: ModelInfo):
        self._info = info

    def engines(self):
        return ("dit", "drafter")

    def info(self, engine):
        return self._info

    def run(self, engine, inputs):
        raise NotImplementedError("the null backend only runs bound")

    def bind(self, engine, inputs, outputs, lane) -> BoundEngine:
        return _NullBound()


class _NullBound(BoundEngine):
    def run(self, rows: int) -> None:
        pass


def engine_io_bytes(spec: RoundSpec, rows: int, counts: tuple) -> tuple[int, int]:
    """Bytes a GPU backend copies host->device and back per round on the numpy path (inputs in,
    outputs out, every call), from the contracts' shapes."""
    G, (C, H, W), O = spec.rows_per_state, spec.state_shape, spec.info.out_channels
    T, D = spec.feat_shape
    x, eps, feat = 4 * C * H * W, 4 * O * H * W, 4 * T * D
    h2d = G * rows * (x + 4 + 8)
    d2h = G * rows * (eps + feat)
    for n in counts:
        h2d += G * n * (feat + x + 4 + 8)
        d2h += G * n * (feat + eps)
    return h2d, d2h


#: Engine outputs of a workspace: zeroed once when the kernels really run (``measure(kernels=...)``).
ENGINE_OUTPUTS = ("v_eps", "v_feat", "d_eps", "d_feat_out")


def measure(path: str, shape: str, batch: int, window: int, rounds: int, warmup: int = 2,
            graphs: bool = False, kernels=None) -> dict:
    """One (path, shape, batch, window) entry. ``kernels``: a GPU build of the kernels library; the
    device path then runs its kernels for real (engines still return at once, their outputs zero,
    so every draft is accepted as with null launches) and ``wall_ms_per_round`` includes the GPU's
    work. Without it the device path runs on the host emulation with null launches."""
    info = SHAPES[shape]
    spec = RoundSpec(info, slots=batch, max_window=window, guided=True, drafter="free")
    settings = RoundSettings(Schedule.create("250"), seed=0, cfg_scale=1.5, window=window)
    device, null_launches = None, False
    if path == "numpy":
        from freedit.runtime.round_numpy import NumpyRoundMaths

        maths = NumpyRoundMaths()
    else:
        from freedit.runtime.device import Device
        from freedit.runtime.kernels import load as load_kernels
        from freedit.runtime.round_device import DeviceRoundMaths

        null_launches = kernels is None
        k = kernels or load_kernels(emulated=True)
        if null_launches:
            k.emulation.set_null_launch(True)
        device = Device(k)
        maths = DeviceRoundMaths(device)
    try:
        ws = maths.workspace(spec)
        if device is not None and not null_launches:
            for name in ENGINE_OUTPUTS:  # cudaMalloc leaves garbage; the null engines' outputs are zeros
                if name in ws.buffers:
                    buf = ws[name]
                    device.check(device.lib.freedit_rt_memset_async(buf.ptr, 0, buf.nbytes, None), "cudaMemset")
            device.synchronize()
        maths.configure(ws, settings)
        lanes = maths.lanes(False, timing=False)
        backend = NullBackend(info)
        for engine in spec.engine_rows():
            ins, outs = ENGINE_IO[engine]
            ws.engines[engine] = backend.bind(engine, {n: ws[b] for n, b in ins.items() if b in ws.buffers},
                                              {n: ws[b] for n, b in outs.items()}, None)
        runner = RoundRunner(maths, [ws], settings, lanes, capture=graphs)
        mb = runner.begin(np.arange(batch) % info.num_classes)[0]
        runner.fill(mb)
        host, wall, launches, graph_launches, h2d, d2h = [], [], [], [], [], []
        for r in range(warmup + rounds):
            windows = runner.windows(mb)
            live = windows >= 0
            rows = int((windows[live] + 1).sum())
            counts = tuple(int((windows[live] >= k).sum()) for k in range(1, int(windows.max(initial=0)) + 1))
            c0 = device.counters() if device else None
            g0 = device.graph_launches if device else 0
            t0 = time.perf_counter()
            runner.enqueue(mb)
            t1 = time.perf_counter()
            if device is not None and null_launches:  # what the null kernels would have reported: all accepted
                rep = ws.report_host
                rep[:spec.slots, 0] = np.where(live, mb.step - windows - 1, rep[:spec.slots, 0])
                rep[:spec.slots, 1] = np.where(live, windows, 0)
                rep[:spec.slots, 2:] = 0  # no proposals, no flags
                rep[spec.slots, 0] = rows
            t2 = time.perf_counter()
            runner.complete(mb)
            t3 = time.perf_counter()
            if r < warmup:
                continue
            host.append((t1 - t0) + (t3 - t2))
            wall.append(t3 - t0)
            if device is not None:
                c1 = device.counters()
                launches.append(c1[0] - c0[0])
                graph_launches.append(device.graph_launches - g0)
                h2d.append(c1[1] - c0[1])
                d2h.append(c1[2] - c0[2])
            else:
                a, b = engine_io_bytes(spec, rows, counts)
                launches.append(0)
                graph_launches.append(0)
                h2d.append(a)
                d2h.append(b)
        for lane in lanes:
            lane.close()
    finally:
        if device is not None:
            device.close()
            if null_launches:
                device.kernels.emulation.set_null_launch(False)
    return {"path": path, "graphs": graphs, "shape": shape, "model": MODELS[shape], "batch": batch, "window": window,
            "rounds": rounds, "kernels": "not used" if device is None else ("null launches" if null_launches else "executed"),
            "host_ms_per_round": 1e3 * statistics.median(host), "wall_ms_per_round": 1e3 * statistics.median(wall),
            "host_ms_per_round_mean": 1e3 * statistics.fmean(host),
            "kernel_launches_per_round": statistics.fmean(launches),
            "graph_launches_per_round": statistics.fmean(graph_launches),
            "h2d_bytes_per_round": statistics.fmean(h2d), "d2h_bytes_per_round": statistics.fmean(d2h),
            "bytes_per_sample_per_round": (statistics.fmean(h2d) + statistics.fmean(d2h)) / batch}


def run_grid(batches=(1, 8, 32), windows=(4, 8), shapes=tuple(SHAPES), log=print) -> list[dict]:
    entries = []
    for shape in shapes:
        for batch in batches:
            for window in windows:
                big = SHAPES[shape].input_size >= 32 and batch >= 8
                for path, graphs in (("numpy", False), ("device", False), ("device", True)):
                    rounds = 3 if (big and path == "numpy") else 20
                    e = measure(path, shape, batch, window, rounds=rounds, graphs=graphs)
                    entries.append(e)
                    log(json.dumps(e))
    return entries


def check_targets(entries: list[dict]) -> dict:
    """The issue's targets for the device path, per entry at L = 8."""
    out = {}
    for e in entries:
        if e["path"] != "device" or e["window"] != 8:
            continue
        key = f"{e['shape']} B={e['batch']} graphs={e['graphs']}"
        limit = TARGETS["host_ms_b1"] if e["batch"] == 1 else TARGETS["host_ms_b32"] if e["batch"] == 32 else None
        out[key] = {"host_ms": e["host_ms_per_round"], "host_limit_ms": limit,
                    "host_ok": None if limit is None else e["host_ms_per_round"] <= limit,
                    "bytes_per_sample": e["bytes_per_sample_per_round"],
                    "bytes_ok": e["bytes_per_sample_per_round"] <= TARGETS["bytes_per_sample"]}
    return out


def write(entries: list[dict], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                              "cpus": os.cpu_count(), "load_average_1_5_15": os.getloadavg()},
              "method": __doc__.strip().split("\n\n")[1], "entries": entries, "targets": TARGETS,
              "target_check": check_targets(entries)}
    paths = [out / "host_overhead.json", out / "host_overhead.md", out / "host_overhead.png"]
    paths[0].write_text(json.dumps(record, indent=1))
    md = ["# Host work per FREE round: numpy path vs device path", "", f"Command: `{command}`. Raw log: `raw.log`.",
          f"Machine: {os.cpu_count()} CPUs, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} when "
          "written (shared with other jobs: host times are upper bounds).", "", record["method"], "",
          "| shape | model | B | L | path | graphs | host ms / round | kernel launches / round | graph launches / round "
          "| H2D B / round | D2H B / round | bytes / sample / round |",
          "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in entries:
        md.append(f"| {e['shape']} | {e['model']} | {e['batch']} | {e['window']} | {e['path']} | "
                  f"{'yes' if e['graphs'] else 'no'} | {e['host_ms_per_round']:.3f} | {e['kernel_launches_per_round']:.0f} | "
                  f"{e['graph_launches_per_round']:.0f} | "
                  f"{e['h2d_bytes_per_round']:,.0f} | {e['d2h_bytes_per_round']:,.0f} | "
                  f"{e['bytes_per_sample_per_round']:,.0f} |")
    md += ["", "Targets (device path, L = 8): host <= 0.3 ms per round at B = 1, <= 1 ms at B = 32; host<->device "
           "<= 64 bytes per sample per round.", ""]
    for key, c in record["target_check"].items():
        host = f"{c['host_ms']:.3f} ms" + ("" if c["host_limit_ms"] is None else
                                          f" {'meets' if c['host_ok'] else 'MISSES'} the {c['host_limit_ms']} ms target")
        md.append(f"- {key}: {host}; {c['bytes_per_sample']:.0f} B per sample "
                  f"{'meets' if c['bytes_ok'] else 'MISSES'} the 64 B target")
    paths[1].write_text("\n".join(md) + "\n")
    _plot(entries, paths[2])
    return paths


def _plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freedit.benchmarks.bench_report import save_figure

    labels = sorted({(e["shape"], e["batch"], e["window"]) for e in entries},
                    key=lambda k: (list(SHAPES).index(k[0]), k[1], k[2]))
    series = [("numpy", False, "numpy path"), ("device", False, "device path, plain launches"),
              ("device", True, "device path, CUDA graphs")]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.27
    x = np.arange(len(labels))
    for i, (p, g, name) in enumerate(series):
        vals = [next((e["host_ms_per_round"] for e in entries if (e["shape"], e["batch"], e["window"]) == k
                      and e["path"] == p and e["graphs"] == g), np.nan) for k in labels]
        ax.bar(x + (i - 1) * width, vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{s}\nB={b} L={w}" for s, b, w in labels], fontsize=7)
    ax.set_ylabel("host ms per round (log)")
    ax.axhline(0.3, color="k", ls=":", lw=0.8)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_title("Host work per FREE round (model calls and kernels excluded); dotted 0.3 ms, dashed 1 ms")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/host_overhead")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--windows", default="4,8")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = (out / "raw.log").open("w")

    def log(line: str) -> None:
        print(line, flush=True)
        raw.write(line + "\n")
        raw.flush()

    command = "python -m freedit.benchmarks.host_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    entries = run_grid([int(b) for b in args.batches.split(",")], [int(w) for w in args.windows.split(",")], shapes,
                       log)
    for p in write(entries, out, command.strip()):
        log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
