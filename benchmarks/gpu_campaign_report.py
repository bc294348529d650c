"""campaign.json and a readable campaign.md for the GPU campaign (benchmarks/gpu_campaign.py)."""
from __future__ import annotations

import json
from pathlib import Path


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(report: dict, out: Path, final: bool = True) -> None:
    _atomic(out / "campaign.json", json.dumps(report, indent=1, default=str) + "\n")
    _atomic(out / "campaign.md", "\n".join(markdown(report, final)) + "\n")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict, final: bool = True) -> list[str]:
    lines = ["# GPU campaign" + ("" if final else " (in progress)"), "",
             f"Command: `{report['command']}`. Started {report['started']}; {report['elapsed_s']:.0f} s of the "
             f"{report['budget_s']:.0f} s budget" + ("; **dry run** (no GPU: GPU steps skipped, their code rehearsed "
                                                     "on the CPU)" if report["dry_run"] else "") + ".",
             "Raw output: `raw.log`. Figures: `campaign.json` (docs/GPU.md says what each one means).", ""]
    machine = report.get("machine") or {}
    gpu = machine.get("gpu")
    if gpu:
        lines += [f"Machine: {gpu['name']} (compute capability {gpu['compute_capability']}, {gpu['memory_mib']} MiB, "
                  f"{gpu['multiprocessors']} SMs), driver {gpu.get('driver') or '?'}, CUDA runtime API "
                  f"{gpu['cuda_runtime_api']}; torch {machine.get('versions', {}).get('torch', '-')} "
                  f"(CUDA {machine.get('torch_cuda_version') or '-'}); {machine.get('cpu_count')} CPUs.", ""]
    elif machine:
        lines += [f"Machine: no GPU ({machine.get('gpu_reason')}); {machine.get('cpu')}, "
                  f"{machine.get('cpu_count')} CPUs.", ""]
    rehearsed = any("rehearsal" in e for e in report["steps"])
    head = "| step | status | seconds (estimate) | peak GPU MiB | reason |" + (" rehearsal |" if rehearsed else "")
    lines += [head, "| --- | --- | ---: | ---: | --- |" + (" --- |" if rehearsed else "")]
    for e in report["steps"]:
        row = (f"| {e['name']} | {e['status']} | {e['seconds']:.1f} ({e['estimate_s']:.0f}) | "
               f"{_fmt(e.get('peak_gpu_mb'), 0)} | {e['reason']} |")
        if rehearsed:
            row += f" {_rehearsal(e.get('rehearsal'))} |"
        lines.append(row)
    for e in report["steps"]:
        render = _renderer(e["name"])
        if e["status"] in ("ok", "failed") and e.get("figures") and render:
            lines += ["", f"## {e['name']}: {e['title']}", ""] + render(e["figures"])
    return lines


def _rehearsal(r: dict | None) -> str:
    if not r:
        return ""
    if r["status"] == "ok":  # its figures and verdict at CPU sizes mean nothing; that it ran does
        return f"ran ({r['seconds']:.1f} s)"
    return f"{r['status']}: {r['reason']}"


def _checks(f: dict) -> list[str]:
    out = [f"Seed {f.get('seed')}, device {f.get('device')}.", "", "| check | passed | detail |",
           "| --- | --- | --- |"]
    for name, c in (f.get("checks") or {}).items():
        detail = ", ".join(f"{k} {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in c.items()
                           if k != "passed" and not isinstance(v, (list, dict)))
        out.append(f"| {name} | {c.get('passed')} | {detail[:200]} |")
    return out


def _build(f: dict) -> list[str]:
    p = f.get("ptxas", {})
    return [f"sm_{f.get('arch')} in {f.get('seconds', 0):.1f} s, ABI {f.get('abi_version')}, SASS "
            f"{', '.join(f.get('sass', [])) or '?'}; {p.get('kernels')} kernels, up to {p.get('max_registers')} "
            f"registers; spilling: {', '.join(p.get('spilling', [])) or 'none'}."]


def _sanitizer(f: dict) -> list[str]:
    return [f"{f.get('tool')} on the {f.get('target')}: exit status {f.get('exit_status')}, errors "
            f"{f.get('errors')}" + (f", hazards {f.get('hazards')}, warnings {f.get('warnings')}"
                                     if "hazards" in f else "") + f", program passed {f.get('program_passed')}, "
            f"{f.get('seconds', 0):.1f} s."]


def _digits(f: dict) -> list[str]:
    best = ", ".join(f"B={b}: {c}" for b, c in (f.get("best_lossless") or {}).items())
    out = [f"Backend {f.get('backend')}, {f.get('steps')} steps, seed {f.get('seed')}, warm-up "
           f"{f.get('warmup_s', 0):.1f} s; best lossless L: {best}.",
           "", "| B | config | ms / image (median) | vs sequential | serial DiT calls | NFE speed-up | acceptance | "
               "maths | decisions = CPU | max abs diff vs CPU | peak torch MiB |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in f.get("rows", []):
        out.append(f"| {r['batch']} | {r['config']} | {r['ms_per_image_median']:.2f} | "
                   f"{r['speedup_vs_sequential']:.2f}x | {r['serial_dit_calls']:.1f} | {r['nfe_speedup']:.2f}x | "
                   f"{_fmt(r.get('acceptance'), 3)} | {r.get('maths')} | {r.get('decisions_equal', 'not compared')} | "
                   f"{_fmt(r.get('max_abs_diff'), 6)} | {_fmt(r.get('peak_device_mb'), 0)} |")
    return out


def _two_sample(f: dict) -> list[str]:
    fv, bv = f["free_vs_sequential"], f["biased_vs_sequential"]
    return [f"n = {f['n']} per sampler, {f['steps']} steps, {f['permutations']} permutations, alpha {f['alpha']}.", "",
            "| comparison | MMD^2 | MMD p | labels p | acceptance |", "| --- | ---: | ---: | ---: | ---: |",
            f"| FREE L=8 vs sequential | {fv['mmd']['mmd2']:.5f} | {fv['mmd']['p_value']:.3g} | "
            f"{fv['labels']['p_value']:.3g} | {f['free']['acceptance']:.3f} |",
            f"| biased control vs sequential | {bv['mmd']['mmd2']:.5f} | {bv['mmd']['p_value']:.3g} | "
            f"{bv['labels']['p_value']:.3g} | {f['biased']['acceptance']:.3f} |"]


def _xl(f: dict) -> list[str]:
    out = [f"{f['config']}, {f['precision']}, CFG; {f['timing']}. Acceptance profile: {f['acceptance_source']}.", "",
           "| px | B | T_verify(n) ms, n = 1..9 (graph; eager) | T(n)/T(1) | T_draft ms | projected speed-up: best L | "
           "adaptive | peak torch MiB |", "| ---: | ---: | --- | --- | ---: | --- | ---: | ---: |"]
    for c in f["curves"]:
        key = "graph_s" if "graph_s" in c["verify"][0] else "eager_s"
        times = " ".join(f"{v[key] * 1e3:.2f}" for v in c["verify"])
        eager = " ".join(f"{v['eager_s'] * 1e3:.2f}" for v in c["verify"])
        rel = " ".join(f"{x:.2f}" for x in c["relative_verify_cost"])
        p = c.get("projection") or {}
        out.append(f"| {c['image_size']} | {c['batch']} | {times}; {eager} | {rel} | {c['draft'][key] * 1e3:.2f} | "
                   f"{_fmt(p.get('best'))}x at L={p.get('best_L')} | {_fmt(p.get('adaptive'))}x | "
                   f"{_fmt(c.get('torch_peak_mb'), 0)} |")
    return out


def _round(f: dict) -> list[str]:
    out = ["| shape | B | L | numpy maths ms | engine I/O copies ms | host path ms | device ms (plain) | "
           "device ms (graphs) | launches | host path / device |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in f.get("rows", []):
        out.append(f"| {r['shape']} | {r['batch']} | {r['window']} | {r['numpy_maths_ms']:.2f} | "
                   f"{_fmt(r.get('copy_ms'))} | {_fmt(r.get('host_path_ms'))} | {_fmt(r.get('device_ms'), 3)} | "
                   f"{_fmt(r.get('device_graph_ms'), 3)} | {_fmt(r.get('device_launches'), 0)} | "
                   f"{_fmt(r.get('speedup'), 1)} |")
    return out


RENDERERS = {"kernels_build": _build, "kernels_checks": _checks, "two_sample_gpu": _two_sample, "xl_cost_curves": _xl,
             "round_wallclock": _round}


def _renderer(step: str):
    """The figures' table of a step: sanitizer_* share one, and so do the digits timings."""
    if step.startswith("sanitizer_"):
        return _sanitizer
    if step.startswith("digits_") and step != "digits_cpu_reference":
        return _digits
    return RENDERERS.get(step)
