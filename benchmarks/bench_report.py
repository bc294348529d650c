"""Markdown and PNG plots for a `freedit bench` report (benchmarks/harness.py)."""
from __future__ import annotations

from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _applied(report: dict, key: str, skip: tuple = ()) -> str:
    """The rules ``key`` the configurations applied (those of samplers ``skip`` left out), or n/a."""
    return ", ".join(sorted({r[key] for g in report["groups"] for r in g["configs"]
                             if key in r and r["sampler"] not in skip})) or "n/a"


def markdown(report: dict, stem: str) -> str:
    cfg = report["config"]
    dev = report["device"]
    lines = [f"# freedit bench: {', '.join(cfg['models'])} on {', '.join(cfg['backends'])}", "",
             f"Command: `{report['command']}`  ", f"Date: {report['date']}, git {report['git_revision'] or 'unknown'}  ",
             f"Device: {dev['cpu']} ({dev['cpu_count']} cores)" + (f", GPU {dev['gpu']['name']} (SM {dev['gpu']['compute_capability']})"
                                                                    if dev["gpu"] else ", no GPU") + "  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             f"{cfg['n']} images per configuration, {cfg['repeats']} repeat(s), interleaved; seed {cfg['seed']}. "
             "Wall-clock speed-up = sequential's median seconds per image / this configuration's, same run. "
             "NFE speed-up = steps / serial target calls per image. Guided FREE's draft guidance: "
             + _applied(report, "draft_guidance") + "; verifier (free-relax: step): "
             + _applied(report, "verifier", ("free-relax",)) + ".", ""]
    for g in report["groups"]:
        lines += [f"## {g['model']} · {g['backend']} · batch {g['batch_size']} · {g['steps']} steps · CFG {g['cfg_scale']:g}", "",
                  "| sampler | s / image (median) | p90 | wall-clock speed-up | serial target calls | NFE speed-up | "
                  "acceptance | verifier s | drafter s | peak RSS MB | class acc. | FD-digits |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in g["configs"]:
            lines.append(
                f"| {r['label']} | {r['seconds_per_image_median']:.4f} | {r['seconds_per_image_p90']:.4f} | "
                f"{_fmt(r['wallclock_speedup'], '.2f')}x | {r['serial_target_calls']:.1f} | {r['nfe_speedup']:.2f}x | "
                f"{_fmt(r.get('acceptance'), '.3f')} | {r['target_seconds_median']:.1f} | {r['drafter_seconds_median']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {_fmt(r.get('class_accuracy'), '.3f')} | {_fmt(r.get('fd_digits'), '.2f')} |")
        if "adaptive" in g:
            a = g["adaptive"]
            fixed = a["expected_steps_per_second_fixed"]
            best = max(fixed, key=fixed.get)
            rel = ", ".join(f"{x:.2f}" for x in a["cost_curve"]["relative_verify_cost"])
            hist = {}
            for w in a["windows"]:
                hist[w] = hist.get(w, 0) + 1
            lines += ["", f"Adaptive window: verifying n states per sample costs {rel} x one state (n = 1..), "
                      f"a drafter call {a['cost_curve']['draft_seconds'] * 1e3:.1f} ms. Chosen L per step: "
                      + ", ".join(f"L={k}: {v} steps" for k, v in sorted(hist.items()))
                      + f". Expected steps/s: adaptive {a['expected_steps_per_second']:.1f}, best fixed L={best} "
                      f"{fixed[best]:.1f} (model prediction)."]
            ada = next((r for r in g["configs"] if r["sampler"] == "adaptive"), None)
            fixed_free = [r for r in g["configs"] if r["sampler"] == "free"]
            if ada and fixed_free:
                top = min(fixed_free, key=lambda r: r["seconds_per_image_median"])
                lines.append(f"Measured: adaptive {ada['seconds_per_image_median']:.4f} s/image vs the best fixed "
                             f"window ({top['label']}) {top['seconds_per_image_median']:.4f} s/image: "
                             f"{top['seconds_per_image_median'] / ada['seconds_per_image_median']:.2f}x.")
        lines.append("")
    lines += [f"Plots: `{stem}_speedup_vs_lambda.png`, `{stem}_acceptance.png`, `{stem}_latency_vs_batch.png`, "
              f"`{stem}_adaptive.png` (where the sweep has the data)."]
    return "\n".join(lines) + "\n"


def save_figure(fig, path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plots(report: dict, out_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    g0 = report["groups"][0]
    # 1. speed-up vs lambda, with quality
    relax = [r for r in g0["configs"] if r["sampler"] in ("free", "free-relax")]
    windows = sorted({r["window"] for r in relax})
    if relax:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax2 = ax.twinx()
        for i, w in enumerate(windows):
            color = f"C{i}"  # one colour per window: speed-ups solid/dashed, quality dotted
            pts = sorted(((r.get("relax", 0.0), r) for r in relax if r["window"] == w), key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1]["nfe_speedup"] for p in pts], "o-", color=color, label=f"NFE speed-up, L={w}")
            ax.plot(xs, [p[1]["wallclock_speedup"] for p in pts], "s--", color=color,
                    label=f"wall-clock speed-up, L={w}")
            if all("fd_digits" in p[1] for p in pts):
                ax2.plot(xs, [p[1]["fd_digits"] for p in pts], "^:", color=color, alpha=0.6, label=f"FD-digits, L={w}")
        seq = next((r for r in g0["configs"] if r["sampler"] == "sequential"), None)
        if seq and "fd_digits" in seq:
            ax2.axhline(seq["fd_digits"], color="gray", lw=0.8, label="FD-digits, sequential")
        ax.set_xlabel("relax λ (0 = lossless FREE)")
        ax.set_ylabel("speed-up over sequential")
        ax2.set_ylabel("FD-digits (lower is better)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        ax.set_title(f"{g0['model']} · {g0['backend']} · {g0['steps']} steps")
        written.append(save_figure(fig, f"{out_prefix}_speedup_vs_lambda.png"))
    # 2. acceptance by timestep
    with_acc = [r for r in g0["configs"] if r.get("acceptance_by_step")]
    if with_acc:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in with_acc:
            items = sorted((int(k), v) for k, v in r["acceptance_by_step"].items())
            ax.plot([k for k, _ in items], [v for _, v in items], lw=1, label=r["label"])
        ax.invert_xaxis()
        ax.set_xlabel("respaced step (noisy → clean)")
        ax.set_ylabel("draft acceptance")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, f"{out_prefix}_acceptance.png"))
    # 3. latency vs batch size (groups of the first model/backend that differ only by batch)
    same = [g for g in report["groups"] if (g["model"], g["backend"], g["steps"], g["cfg_scale"])
            == (g0["model"], g0["backend"], g0["steps"], g0["cfg_scale"])]
    if len(same) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab in [r["label"] for r in g0["configs"]]:
            pts = [(g["batch_size"], next(r for r in g["configs"] if r["label"] == lab)) for g in same]
            ax.plot([p[0] for p in pts], [p[1]["seconds_per_image_median"] * 1e3 for p in pts], "o-", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (samples in flight)")
        ax.set_ylabel("ms per image (median)")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, f"{out_prefix}_latency_vs_batch.png"))
    # 4. adaptive window: cost curve and chosen L per step
    if "adaptive" in g0:
        a = g0["adaptive"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        rel = a["cost_curve"]["relative_verify_cost"]
        ax1.plot(range(1, len(rel) + 1), rel, "o-", label="measured")
        ax1.plot(range(1, len(rel) + 1), range(1, len(rel) + 1), ":", color="gray", label="linear (n x one state)")
        ax1.set_xlabel("states verified per sample (L+1)")
        ax1.set_ylabel("T_verify(n) / T_verify(1)")
        ax1.legend(fontsize=7)
        ax2.plot(range(len(a["windows"])), a["windows"], drawstyle="steps-mid", label="chosen L")
        ax2b = ax2.twinx()
        ax2b.plot(range(len(a["acceptance_profile"])), a["acceptance_profile"], color="tab:orange", lw=0.8,
                  label="pilot acceptance")
        ax2.invert_xaxis()
        ax2.set_xlabel("respaced step")
        ax2.set_ylabel("L")
        ax2b.set_ylabel("acceptance")
        written.append(save_figure(fig, f"{out_prefix}_adaptive.png"))
    return written


def write(report: dict, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(markdown(report, stem))
    return paths + [Path(p) for p in plots(report, str(out_dir / stem))]
