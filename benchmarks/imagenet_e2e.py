"""An ImageNet DiT end to end with the SD VAE's full-width decoder (random weights), timed on the CPU.

    python -m freedit.benchmarks.imagenet_e2e --work /tmp/e2e --out benchmarks/results/imagenet_e2e

The user-facing commands one after another, as child processes: init-checkpoint (DiT-S/2, 256 px)
-> export --vae random --torch-weights -> generate (sequential and frozen, on ONNX Runtime and torch)
-> build (TensorRT-RTX plans of the DiT and the decoder). Records each command's wall time and peak
memory (benchmarks/engines_xl.py's runner), the decoder's seconds per image per backend, whether
both backends gave the same images, and the file sizes. Writes <out>.json, <out>.md, the raw output
of every command in <out>_raw.log and the ONNX Runtime grid as <out>_grid.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

from freedit.benchmarks.engines_xl import run as run_command, sizes

SAMPLERS = ("sequential", "frozen")
BACKENDS = ("onnxruntime", "torch")


def run_e2e(work: Path, steps: int = 6, images: int = 2, log_path: Path | None = None) -> dict:
    from PIL import Image

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    fd = [sys.executable, "-m", "freedit"]
    classes = ",".join(str(c) for c in (207, 0, 360, 980)[:images]) if images <= 4 else f"0-{images - 1}"
    ckpt, model = work / "DiT-S-2-random-256.pt", work / "model"
    shutil.rmtree(model, ignore_errors=True)  # every file listed below is this run's
    commands = {
        "init_checkpoint": fd + ["init-checkpoint", "--config", "DiT-S/2", "--out", str(ckpt)],
        "export": fd + ["export", "--checkpoint", str(ckpt), "--config", "DiT-S/2", "--vae", "random",
                        "--torch-weights", "--out", str(model)],
    }
    for sampler in SAMPLERS:
        for backend in BACKENDS:
            commands[f"generate_{sampler}_{backend}"] = fd + [
                "generate", "--model", str(model), "--classes", classes, "--per-class", "1", "--steps", str(steps),
                "--cfg-scale", "4", "--sampler", sampler, "--window", "2", "--backend", backend, "--seed", "0",
                "--threads", str(os.cpu_count() or 1), "--out", str(work / f"{sampler}_{backend}.png"),
                "--stats", str(work / f"{sampler}_{backend}.json"), "--no-progress"]
    commands["build_rtx"] = fd + ["build", str(model), "--batch-sizes", "2", "--window", "2", "--builder",
                                  "tensorrt-rtx", "--force", "--no-progress"]
    results = {}
    with open(log_path or work / "raw.log", "w") as log:
        for name, cmd in commands.items():
            print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            results[name] = run_command(cmd, log)
    runs, grids = {}, {}
    for sampler in SAMPLERS:
        for backend in BACKENDS:
            key = f"{sampler}_{backend}"
            summary = json.loads((work / f"{key}.json").read_text())["summary"]
            runs[key] = {k: summary[k] for k in ("seconds", "mean_target_calls", "decode_seconds", "decode_batch_size")}
            runs[key]["decode_seconds_per_image"] = summary["decode_seconds"] / summary["images"]
            grids[key] = np.asarray(Image.open(work / f"{key}.png")).astype(int)
    worst = max(int(np.abs(grids[f"{s}_onnxruntime"] - grids[f"{s}_torch"]).max()) for s in SAMPLERS)
    differing = max(float((grids[f"{s}_onnxruntime"] != grids[f"{s}_torch"]).mean()) for s in SAMPLERS)
    tile = np.asarray(Image.open(work / "sequential_onnxruntime.png"))[1:257, 1:257]
    plans = json.loads((model / "engines" / "vae_decoder.plan.json").read_text())
    return {"steps": results, "runs": runs, "images": images, "sampling_steps": steps,
            "images_equal_within": worst, "fraction_of_pixels_differing": differing,
            "tile_shape": list(tile.shape), "grid": str(work / "sequential_onnxruntime.png"),
            "decoder_plan": {"profiles": plans["profiles"], "bytes": plans["plan"]["bytes"],
                             "build_seconds": plans["build_seconds"]},
            "files": sizes(model)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/freedit_e2e", help="scratch folder (about 1 GB)")
    ap.add_argument("--out", default="benchmarks/results/imagenet_e2e", help="output prefix")
    ap.add_argument("--steps", type=int, default=6, help="sampling steps per generate")
    ap.add_argument("--images", type=int, default=2, help="images per generate")
    args = ap.parse_args(argv)
    out = Path(args.out)
    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    report = run_e2e(Path(args.work), args.steps, args.images, Path(f"{out}_raw.log"))
    import tensorrt_rtx
    import torch

    record = {
        "command": " ".join(["python", "-m", "freedit.benchmarks.imagenet_e2e", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": "none", "load_average_1min_before_after": [round(load_before[0], 2),
                                                                      round(os.getloadavg()[0], 2)]},
        "versions": {"torch": torch.__version__, "tensorrt_rtx": tensorrt_rtx.__version__},
        **report,
    }
    shutil.copyfile(report["grid"], f"{out}_grid.png")
    Path(f"{out}.json").write_text(json.dumps(record, indent=1))
    lines = ["# DiT-S/2 at 256 px with the SD VAE's full-width decoder (random weights), end to end on the CPU", "",
             f"Command: `{record['command']}` ({record['date']}, {os.cpu_count()} CPU cores shared with other jobs: "
             f"load average {record['machine']['load_average_1min_before_after'][0]} before, "
             f"{record['machine']['load_average_1min_before_after'][1]} after; no GPU). Raw output: "
             f"`{out.name}_raw.log`; the ONNX Runtime grid: `{out.name}_grid.png` (noise: random weights).", "",
             "| step | wall s | peak RSS GiB |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['seconds']} | {v['peak_rss_gib']} |" for k, v in report["steps"].items()]
    lines += ["", f"{report['images']} images, {report['sampling_steps']} steps, CFG 4, window 2:", "",
              "| run | sampling s | serial DiT calls / image | decode s / image | decode batch |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['mean_target_calls']:.1f} | {v['decode_seconds_per_image']:.2f} | "
              f"{v['decode_batch_size']} |" for k, v in report["runs"].items()]
    lines += ["", f"ONNX Runtime vs torch, same seed: every pixel within {report['images_equal_within']} of 255 "
              f"(at most {report['fraction_of_pixels_differing']:.2e} of the pixels differ). Tiles "
              f"{report['tile_shape']}.", "",
              f"Decoder plan (TensorRT-RTX, fp32): {report['decoder_plan']['bytes'] / 2**20:.1f} MiB, built in "
              f"{report['decoder_plan']['build_seconds']} s, profile rows "
              f"{report['decoder_plan']['profiles'][0]['rows']}.", "", "| file | MiB |", "|---|---:|"]
    lines += [f"| {f} | {b / 2**20:.1f} |" for f, b in report["files"].items() if not f.endswith(".json")]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
