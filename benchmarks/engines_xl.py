"""Export and TensorRT-RTX builds at DiT-XL/2 size (675M parameters, random weights), timed.

    python -m freedit.benchmarks.engines_xl --work /tmp/xl --out benchmarks/results/engines_xl

Runs the user-facing commands one after another (init-checkpoint -> export fp32 and fp16 ->
build fp16 and fp32 -> check fp16) as child processes and records, per command, the wall time,
the child's peak resident memory (getrusage via wait4) and the files it wrote. Writes <out>.json,
<out>.md and the raw output of every command in <out>_raw.log.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], log) -> dict:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    log.write(f"[exit {child.returncode}, {seconds:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB]\n")
    log.flush()
    if child.returncode not in (0,):
        raise SystemExit(f"command failed ({child.returncode}): {' '.join(cmd)}; see the raw log")
    return {"command": " ".join(cmd), "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/freedit_xl", help="scratch folder (needs about 12 GB)")
    ap.add_argument("--out", default="benchmarks/results/engines_xl", help="output prefix")
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"DiT-XL-2-random-{args.image_size}.pt"
    fd = ["freedit"]
    steps = {
        "init_checkpoint": fd + ["init-checkpoint", "--config", "DiT-XL/2", "--image-size", str(args.image_size),
                                 "--out", str(ckpt)],
        "export_fp32": fd + ["export", "--checkpoint", str(ckpt), "--config", "DiT-XL/2", "--image-size",
                             str(args.image_size), "--precision", "fp32", "--out", str(work / "xl_fp32")],
        "export_fp16": fd + ["export", "--checkpoint", str(ckpt), "--config", "DiT-XL/2", "--image-size",
                             str(args.image_size), "--precision", "fp16", "--out", str(work / "xl_fp16")],
        "build_fp16_rtx": fd + ["build", str(work / "xl_fp16"), "--force", "--no-progress"],
        "build_fp32_rtx": fd + ["build", str(work / "xl_fp32"), "--force", "--no-progress"],
        "check_fp16": fd + ["check", str(work / "xl_fp16"), "--checkpoint", str(ckpt),
                            "--json", str(work / "check_fp16.json")],
    }
    results = {}
    with open(f"{out}_raw.log", "w") as log:
        for name, cmd in steps.items():
            print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            results[name] = run(cmd, log)
    import tensorrt_rtx
    import torch

    record = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "freedit.benchmarks.engines_xl", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": "none (TensorRT-RTX builds ahead of time without one)"},
        "versions": {"torch": torch.__version__, "tensorrt_rtx": tensorrt_rtx.__version__},
        "steps": results,
        "files": {name: sizes(work / name) for name in ("xl_fp32", "xl_fp16")},
        "check_fp16": json.loads((work / "check_fp16.json").read_text()),
    }
    Path(f"{out}.json").write_text(json.dumps(record, indent=1))
    lines = ["# DiT-XL/2 (675M parameters, random weights) export and TensorRT-RTX builds", "",
             f"Command: `{record['command']}` ({record['date']}, {os.cpu_count()} CPU cores, no GPU). "
             f"Raw output: `{out.name}_raw.log`.", "",
             "| step | wall s | peak RSS GiB |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['seconds']} | {v['peak_rss_gib']} |" for k, v in results.items()]
    lines += ["", "| file | MiB |", "|---|---:|"]
    lines += [f"| {d}/{f} | {b / 2**20:.1f} |" for d, files in record["files"].items() for f, b in files.items()
              if not f.endswith(".json")]
    for pair in record["check_fp16"]["pairs"]:
        if pair["skipped"]:
            lines.append(f"\n`freedit check` {pair['graph']} {pair['candidate']} vs {pair['reference']}: skipped "
                         f"({pair['skipped']})")
        else:
            errs = ", ".join(f"{k} {m['max_rel_to_scale']:.1e}" for k, m in pair["metrics"].items())
            lines.append(f"\n`freedit check` {pair['graph']} {pair['candidate']} (fp16) vs {pair['reference']} "
                         f"(fp32): max error relative to output scale {errs} -> "
                         f"{'PASS' if pair['passed'] else 'FAIL'} (tolerance {pair['tolerance']})")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
