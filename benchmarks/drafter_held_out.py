"""Held-out one-step acceptance of several drafters on the same trajectories, per setting.

    python -m freedit.benchmarks.drafter_held_out --run runs/drafter \
        --drafters new=runtime/assets/digits/drafter.safetensors,old=runtime/assets/digits/drafter_v1.safetensors \
        --out benchmarks/results/drafter_held_out

``--run`` is a ``freedit train-drafter`` output folder: its train_log.json names the settings and
trajectory counts, and its cached trajectories supply the held-out ones (never trained on). Each
drafter is scored with export/train_drafter.held_out_acceptance, the quantity the trainer reports:
E[min(1, q/p)] of one draft from the real parent, per respaced step, for every (respacing, CFG)
setting; the frozen-target baseline is listed beside them. Guided drafts are made as the runtime
makes them (``--draft-guidance``, default parent: the conditional row drafted, the parent's
guidance gap). Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from freedit.benchmarks import command_line
from freedit.runtime.contract import DRAFT_GUIDANCE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="train-drafter output folder (train_log.json + trajectories)")
    parser.add_argument("--dit", default=None, help="the DiT (default: the bundled digits DiT)")
    parser.add_argument("--drafters", required=True, help="LABEL=drafter.safetensors, comma separated")
    parser.add_argument("--draft-guidance", choices=DRAFT_GUIDANCE, default="parent",
                        help="guided drafts: the conditional row with the parent's guidance gap, or both rows drafted")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/drafter_held_out")
    args = parser.parse_args(argv)
    import torch

    from freedit.benchmarks.acceptance_matrix import labelled_paths
    from freedit.export.checkpoint import load_dit
    from freedit.export.drafter import load_drafter
    from freedit.export.train_drafter import DrafterTrainConfig, held_out_acceptance, load_settings
    from freedit.runtime.outputs import write_outputs
    from freedit.runtime.pipeline import default_model_dir

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    log = run / "train_log.json"
    if not log.is_file():
        raise SystemExit(f"error: {log} does not exist; --run wants a finished train-drafter folder")
    saved = json.loads(log.read_text())["train_config"]
    cfg = DrafterTrainConfig(**{**saved, "spacings": tuple(saved["spacings"]), "cfg_scales": tuple(saved["cfg_scales"])})
    dit = load_dit(Path(args.dit) if args.dit else default_model_dir() / "digits_dit.safetensors").eval()
    drafters = {label: load_drafter(path, dit).eval() for label, path in labelled_paths(args.drafters).items()}
    settings = load_settings(dit, run, cfg)
    rows = {}
    for s in settings:
        scores = {label: held_out_acceptance(dit, d, s.held, s.sched, s.cfg_scale,
                                             parent_guidance=args.draft_guidance == "parent")
                  for label, d in drafters.items()}
        scores["frozen"] = held_out_acceptance(dit, None, s.held, s.sched, s.cfg_scale)
        rows[s.name] = {k: {"mean": v["mean"], "bins": v["bins"]} for k, v in scores.items()}
        print(json.dumps({"setting": s.name, **{k: round(v["mean"], 4) for k, v in scores.items()}}), flush=True)
    report = {"command": command_line("freedit.benchmarks.drafter_held_out", argv), "draft_guidance": args.draft_guidance,
              "held_out_per_setting": cfg.held_out, "settings": rows}
    labels = list(drafters) + ["frozen"]
    lines = ["# Held-out one-step acceptance per setting", "", f"Command: `{report['command']}`", "",
             f"E[min(1, q/p)] of one draft from the real parent, mean over the drafted steps of {cfg.held_out} held-out "
             f"trajectories per setting (the DiT's own sampler); guided drafts: draft guidance {args.draft_guidance}.", "",
             "| setting | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {name} | " + " | ".join(f"{row[k]['mean']:.3f}" for k in labels) + " |" for name, row in rows.items()]
    write_outputs({Path(f"{args.out}.json"): json.dumps(report, indent=1).encode(),
                   Path(f"{args.out}.md"): ("\n".join(lines) + "\n").encode()})
    print(f"wrote {args.out}.json, {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
