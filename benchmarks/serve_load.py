"""Load on `freedit serve` (Ray Serve, bundled digits DiT): throughput and latency against concurrency.

    python -m freedit.benchmarks.serve_load --concurrency 1,4,16,64 --requests 64 --steps 50 \
        --out benchmarks/results/serve_load > benchmarks/results/serve_load_raw.log 2>&1

Starts a private Ray and the application on loopback, then, per request mode and concurrency C,
keeps C requests in flight (closed loop) until --requests have been answered. Modes: "seeded"
requests carry distinct seeds, so each needs its own generate call (batching only gathers them);
"unseeded" ones get a secret seed and a call of their own each (since issue 15; before, the server
packed them into one call per batch). Requests take the server's rules (pipeline.json) unless
--verifier / --draft-guidance ask for one in every request; each row records the verifier and the
NFE speed-up the answers report. Writes <out>.json (every request and
figure, the command, versions and the machine's load), <out>.md and <out>.png (latency and
throughput against concurrency).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np

from freedit.benchmarks import add_draft_guidance_argument, add_verifier_argument, command_line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bodies(n: int, mode: str, steps: int, labels: tuple[int, int], rng: random.Random,
                rules: dict | None = None) -> list[dict]:
    """``rules``: verifier / draft_guidance every request asks for (None values: the server's default)."""
    rules = {k: v for k, v in (rules or {}).items() if v is not None}
    bodies = []
    for i in range(n):
        body = {"class_labels": [rng.randrange(10) for _ in range(rng.randint(*labels))], "steps": steps, **rules}
        if mode == "seeded":
            body["seed"] = rng.randrange(2**31)
        bodies.append(body)
    return bodies


async def drive(url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[dict], float]:
    """C workers, each posting its next body as soon as its previous answer is in."""
    import httpx

    pending = list(enumerate(bodies))
    records: list[dict] = []

    async def worker(client):
        while pending:
            i, body = pending.pop(0)
            t0 = time.perf_counter()
            try:
                r = await client.post("/generate", json=body)
                is_json = r.headers.get("content-type", "").startswith("application/json")
                status, reply = r.status_code, (r.json() if is_json else {})
            except httpx.HTTPError as exc:
                status, reply = f"{type(exc).__name__}", {}
            rec = {"request": i, "status": status, "latency_s": time.perf_counter() - t0,
                   "images": len(body["class_labels"])}
            if status == 200:
                rec.update({k: reply["summary"][k] for k in ("batch_requests", "call_requests", "call_images",
                                                              "nfe_speedup")})
                rec.update({k: reply["settings"][k] for k in ("verifier", "draft_guidance") if k in reply["settings"]})
            else:
                rec["error"] = str(reply.get("error", ""))[:200]
            records.append(rec)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return sorted(records, key=lambda r: r["request"]), time.perf_counter() - t0


def summarize(records: list[dict], wall: float, mode: str, concurrency: int) -> dict:
    ok = [r for r in records if r["status"] == 200]
    lat = np.array([r["latency_s"] for r in ok]) if ok else np.array([np.nan])
    errors: dict[str, int] = {}
    for r in records:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {"mode": mode, "concurrency": concurrency, "requests": len(records), "ok": len(ok), "errors": errors,
            "wall_s": wall, "requests_per_s": len(ok) / wall, "images_per_s": sum(r["images"] for r in ok) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p90_s": float(np.percentile(lat, 90)),
            "latency_p99_s": float(np.percentile(lat, 99)), "latency_max_s": float(lat.max()),
            "mean_batch_requests": float(np.mean([r["batch_requests"] for r in ok])) if ok else float("nan"),
            "mean_call_requests": float(np.mean([r["call_requests"] for r in ok])) if ok else float("nan"),
            "mean_nfe_speedup": float(np.mean([r["nfe_speedup"] for r in ok])) if ok else float("nan"),
            # what the server applied, read off its answers (not what was asked for)
            "verifiers": sorted({r["verifier"] for r in ok if "verifier" in r})}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        c = [r["concurrency"] for r in mine]
        lat_ax.plot(c, [r["latency_p50_s"] for r in mine], "o-", label=f"{mode} p50")
        lat_ax.plot(c, [r["latency_p99_s"] for r in mine], "s--", label=f"{mode} p99")
        thr_ax.plot(c, [r["images_per_s"] for r in mine], "o-", label=mode)
    for ax, ylabel in ((lat_ax, "latency per request (s)"), (thr_ax, "images / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lat_ax.set_yscale("log")
    thr_ax.set_ylim(bottom=0)
    fig.suptitle("freedit serve (Ray Serve, bundled digits DiT, CPU): latency and throughput against concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(report: dict, path: Path) -> None:
    a = report["settings"]
    lines = [f"# freedit serve under load: bundled digits DiT, {a['replicas']} replica(s), {a['steps']} steps, "
             f"{a['labels']} labels per request", "",
             f"Command: `{report['command']}`; output of the run: "
             f"[{path.stem}_raw.log]({path.stem}_raw.log)", "",
             f"Machine: {report['machine']['cpus']} CPUs, niceness {report['machine'].get('niceness', '?')}, load average "
             f"{report['machine']['loadavg_before']} before and {report['machine']['loadavg_after']} after (shared "
             f"with other work: absolute figures are indicative). "
             f"Ray {report['versions']['ray']}, ONNX Runtime {report['versions']['onnxruntime']}, sampler "
             f"{report['sampler']}. Batching: up to {a['max_batch_size']} requests, {a['batch_wait_ms']:g} ms wait.", "",
             "| mode | concurrency | requests | ok | errors | requests/s | images/s | p50 s | p90 s | p99 s | "
             "requests per batch | requests per generate call | NFE speed-up | verifier |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {errors} | "
                     f"{r['requests_per_s']:.2f} | {r['images_per_s']:.2f} | {r['latency_p50_s']:.2f} | "
                     f"{r['latency_p90_s']:.2f} | {r['latency_p99_s']:.2f} | {r['mean_batch_requests']:.1f} | "
                     f"{r['mean_call_requests']:.1f} | {r.get('mean_nfe_speedup', float('nan')):.2f}x | "
                     f"{', '.join(r.get('verifiers', [])) or '-'} |")
    lines += ["", "Seeded requests keep their own sample indices, so requests with different seeds run as separate "
              "generate calls even inside one batch; so do unseeded requests, each with its own secret seed. On a "
              "CPU a DiT call costs about in proportion to its rows, so separate calls cost little here and latency "
              "grows with the queue.", "",
              f"![latency and throughput against concurrency]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16,64", help="comma list of concurrent requests")
    p.add_argument("--requests", type=int, default=64, help="requests per mode and concurrency (>= the largest "
                   "concurrency, or that level never has all its requests in flight)")
    p.add_argument("--modes", default="seeded,unseeded", help="seeded (distinct seeds) and/or unseeded (packed)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--labels", default="1-2", help="class labels per request: min-max")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the private Ray")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request generator")
    add_verifier_argument(p)
    add_draft_guidance_argument(p)
    p.add_argument("--out", default="benchmarks/results/serve_load", help="output stem (.json, .md, .png)")
    args = p.parse_args(argv)

    import httpx
    import onnxruntime
    import ray
    from ray import serve

    from freedit.runtime import serving

    levels = [int(c) for c in args.concurrency.split(",")]
    if max(levels) > args.requests:
        p.error(f"--requests {args.requests} is below concurrency {max(levels)}")
    lo, hi = (int(v) for v in args.labels.split("-")) if "-" in args.labels else (int(args.labels),) * 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    config = serving.ServeConfig(threads=args.threads, num_replicas=args.replicas,
                                 cpus_per_replica=args.ray_cpus / args.replicas, max_batch_size=args.max_batch_size,
                                 batch_wait_timeout_s=args.batch_wait_ms / 1000,
                                 max_ongoing_requests=max(2 * args.max_batch_size, 32),
                                 max_queued_requests=max(levels) * 2)
    port = free_port()
    serving.start(config, port=port, request_timeout_s=args.timeout,
                  ray_init=dict(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False))
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(args.seed)
    rows, runs = [], []
    try:
        health = httpx.get(f"{url}/health", timeout=args.timeout).json()
        rules = {"verifier": args.verifier, "draft_guidance": args.draft_guidance}
        asyncio.run(drive(url, make_bodies(2, "seeded", args.steps, (lo, hi), rng, rules), 1, args.timeout))  # warm-up
        for mode in args.modes.split(","):
            for c in levels:
                bodies = make_bodies(args.requests, mode, args.steps, (lo, hi), rng, rules)
                records, wall = asyncio.run(drive(url, bodies, c, args.timeout))
                row = summarize(records, wall, mode, c)
                rows.append(row)
                runs.append({"mode": mode, "concurrency": c, "records": records})
                print(f"{mode:8s} c={c:3d}: {row['ok']}/{row['requests']} ok, errors {row['errors'] or 'none'}, "
                      f"{row['requests_per_s']:.2f} req/s, {row['images_per_s']:.2f} img/s, "
                      f"p50 {row['latency_p50_s']:.2f} s, "
                      f"p99 {row['latency_p99_s']:.2f} s, {row['mean_batch_requests']:.1f} req/batch, "
                      f"{row['mean_call_requests']:.1f} req/call", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "command": command_line("freedit.benchmarks.serve_load", argv),
        "settings": {"steps": args.steps, "labels": args.labels, "requests": args.requests, "replicas": args.replicas,
                     "threads": args.threads, "ray_cpus": args.ray_cpus, "max_batch_size": args.max_batch_size,
                     "batch_wait_ms": args.batch_wait_ms, "seed": args.seed},
        "sampler": f"{health['defaults']['sampler']} (model default), cfg {health['defaults']['cfg_scale']}, "
                   f"verifier {args.verifier or health['defaults'].get('verifier', 'step') + ' (server default)'}, "
                   f"draft guidance {args.draft_guidance or health['defaults'].get('draft_guidance', '-') + ' (server default)'}",
        "machine": {"cpus": os.cpu_count(), "niceness": os.nice(0), "platform": platform.platform(),
                    "loadavg_before": load_before,
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "onnxruntime": onnxruntime.__version__},
        "rows": rows, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out.with_suffix(".md"))
    plot(rows, out.with_suffix(".png"))
    for suffix in (".json", ".md", ".png"):
        print(f"wrote {out.with_suffix(suffix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
