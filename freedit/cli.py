"""freedit: FREE speculative sampling for Diffusion Transformers.

Subcommands follow the pipeline: train-dit / train-drafter / init-checkpoint (torch) -> export
(ONNX) -> build (TensorRT plans) -> check (polygraphy) -> generate (runtime, no torch). Every
command checks its inputs before working and fails with one line.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (exit 2), like every other refusal."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def ascii_int(text: str) -> int:
    """int() also takes non-ASCII digits ('٣') and underscores ('1_0'); options take plain integers."""
    if not _INT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected an integer written with the digits 0-9, got {text!r}")
    return int(text)


def ascii_float(text: str) -> float:
    """float() also takes 'nan', 'inf', non-ASCII digits and underscores; options take finite decimals."""
    if not _FLOAT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a finite decimal number such as 1.5, got {text!r}")
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is beyond the range of a float")
    return value


def bounded(parse, what: str, lo, hi, note: str = ""):
    """An argparse type: ``parse`` then the bound check runtime/limits.py applies to the API too."""
    from freedit.runtime.limits import check_int, check_number

    check = check_int if parse is ascii_int else check_number

    def convert(text: str):
        try:
            return check(what, parse(text), lo, hi, *([note] if note else []))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def steps_arg(text: str) -> int | str:
    """--steps: a count (checked against 1..1000 by the pipeline) or a DiT spacing such as 'ddim50'."""
    text = text.strip()
    if not text or not text.isascii():
        raise argparse.ArgumentTypeError(f"expected a step count such as 250 or a spacing such as 'ddim50', got {text!r}")
    return int(text) if _INT.fullmatch(text) else text


def _generate(args: argparse.Namespace) -> int:
    import io

    import numpy as np

    from freedit.runtime.budget import image_output_bytes
    from freedit.runtime.class_names import count_classes, parse_classes
    from freedit.runtime.images import make_grid, png_bytes
    from freedit.runtime.limits import MAX_IMAGES
    from freedit.runtime.outputs import check_output, check_output_folder, json_safe, write_outputs
    from freedit.runtime.pipeline import Pipeline, default_model_dir

    asked = count_classes(args.classes) * args.per_class  # sized before anything is loaded or expanded
    if asked > MAX_IMAGES:
        raise UsageError(f"--classes {args.classes!r} with --per-class {args.per_class} asks for {asked:,} images; "
                         f"at most {MAX_IMAGES:,} per command")
    out = check_output(args.out)
    if args.latents and Path(args.latents).suffix != ".npy":
        raise UsageError(f"--latents {args.latents}: give a .npy file name")
    latents_out = check_output(args.latents) if args.latents else None
    samples_dir = check_output_folder(args.samples_dir) if args.samples_dir else None  # created only when written
    stats = check_output(args.stats) if args.stats else None
    if stats is not None and Path(stats).resolve() == Path(out).resolve() and not Path(out).is_char_device():
        raise UsageError(f"--stats and --out name the same file {out}")
    model = args.model or default_model_dir()
    pipe = Pipeline.from_directory(model, backend=args.backend, threads=args.threads, precision=args.precision,
                                   device_id=args.device)
    try:
        classes = parse_classes(args.classes, pipe.info.num_classes)
    except ValueError as exc:
        raise UsageError(f"--classes: {exc}") from None
    labels = [y for y in classes for _ in range(args.per_class)]
    info = pipe.info
    images = not pipe.latent or pipe.decoder is not None
    if not images and not latents_out:
        raise UsageError(f"{model} is a latent DiT exported without vae_decoder.onnx, so it makes latents, not "
                         f"images: re-export it with `freedit export --vae ...`, or save the latents with --latents "
                         f"latents.npy")
    side = pipe.decoder.image_size if pipe.latent and pipe.decoder is not None else info.input_size
    scale = args.scale if args.scale is not None else (4 if side < 64 else 1)  # digits: 16 px; ImageNet: 256+
    settings = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, batch_size=args.batch_size,
                    window=args.window, relax=args.relax)
    # Before a single step: every setting, and the memory of sampling plus what is to be written.
    written = image_output_bytes(len(labels), side, side, 3 if pipe.latent else info.in_channels, scale,
                                 samples_dir is not None) if images else 0
    if latents_out:
        written += 2 * len(labels) * info.in_channels * info.input_size ** 2 * 4
    pipe.validate(labels, seed=args.seed, **pipe.resolve(**settings), extra_bytes=written)
    result = pipe.generate(labels, seed=args.seed, **settings, progress=not args.no_progress,
                           decode_batch_size=args.decode_batch_size, micro_batches=args.micro_batches,
                           maths=args.maths, graphs=not args.no_graphs, relax_score=args.relax_score,
                           verifier=args.verifier, draft_guidance=args.draft_guidance)
    files = {}
    if images:
        ncol = args.per_class if args.per_class > 1 else min(10, len(labels))
        files[out] = png_bytes(make_grid(result.images, ncol=ncol, scale=scale))
        if samples_dir is not None:
            for stat, image in zip(result.stats, result.images):
                files[samples_dir / f"{stat['sample']:05d}_class{stat['label']}.png"] = png_bytes(
                    make_grid(image[None], 1, pad=0, scale=scale))
    if latents_out:
        buffer = io.BytesIO()
        np.save(buffer, result.samples)
        files[latents_out] = buffer.getvalue()
    if stats is not None:
        record = {"settings": result.settings, "summary": result.summary, "samples": result.stats}
        files[stats] = json.dumps(json_safe(record), indent=1, allow_nan=False).encode()
    write_outputs(files)  # all of them or none
    print(summary_line(" and ".join(str(f) for f in (out if images else None, latents_out) if f), args.classes,
                       result))
    return 0


def summary_line(out, classes: str, result) -> str:
    s, m = result.settings, result.summary
    sampler = s["sampler"]
    if "window" in s:
        sampler += f" L={s['window']}" + (f" lambda={s['relax']:g}" if s["sampler"] == "free-relax" else "")
        sampler += f" ({s['verifier']} verification)"
    line = (f"wrote {out}: {m['images']} images of classes {classes}, {sampler}, {s['steps']} steps, "
            f"cfg {s['cfg_scale']:g}, seed {s['seed']}: {m['mean_target_calls']:.1f} serial target calls/image "
            f"(NFE speed-up {m['nfe_speedup']:.2f}x)")
    if "acceptance" in m:
        line += (f", acceptance {m['acceptance']:.3f} ({m['accepted']}/{m['decided']} drafts), residual proposals "
                 f"{m['residual_proposals']}, cap hits {m['residual_cap_hits']}")
    line += f", {m['seconds']:.1f} s ({m['seconds_per_image'] * 1e3:.0f} ms/image, {s['backend']})"
    return line + (f", decoded in {m['decode_seconds']:.1f} s" if "decode_seconds" in m else "")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _export(args: argparse.Namespace) -> int:
    from freedit.export.checkpoint import load_dit
    from freedit.export.dit import official_config
    from freedit.export.onnx_export import export_drafter, export_dit, export_graph
    from freedit.export.precision import MIN_OPSET, check_precision

    opset = args.opset if args.opset is not None else MIN_OPSET.get(args.precision, 18)
    check_precision(args.precision, opset)  # before loading anything large
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file, not a folder")
    from freedit.runtime.pipeline import default_model_dir

    bundled = args.checkpoint == "bundled"
    checkpoint = default_model_dir() / "digits_dit.safetensors" if bundled else Path(args.checkpoint)
    drafter_path = args.drafter or (default_model_dir() / "drafter.safetensors" if bundled else None)
    config = official_config(args.config, args.image_size) if args.config else None
    external = {"auto": None, "always": True}[args.external_data]
    t0 = time.perf_counter()
    log = None if args.quiet else _log
    if log:
        log(f"loading {checkpoint} ...")
    model = load_dit(checkpoint, config, num_heads=args.num_heads)  # a folder: a diffusers DiT (export/diffusers_format.py)
    drafter = None
    if drafter_path:
        from freedit.export.drafter import load_drafter

        drafter = load_drafter(drafter_path, model)  # refuses a drafter trained for another DiT
    vae_source = _vae_source(args.vae, checkpoint, log)
    vae = None
    if vae_source is not None:
        from freedit.export.vae import check_vae_fits, load_vae
        from freedit.runtime.decode import is_latent

        if not is_latent(model.config.in_channels):
            raise UsageError(f"--vae is for latent DiTs; this one samples {model.config.in_channels}-channel pixels")
        vae = load_vae(vae_source)
        check_vae_fits(vae, model.config.in_channels, vae_source)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(opset=opset, precision=args.precision, log=log, external_data=external)
    written = [("dit.onnx", export_dit(model, out_dir / "dit.onnx", **kw))]
    if drafter is not None:
        written.append(("drafter.onnx", export_drafter(drafter, out_dir / "drafter.onnx", **kw)))
    if vae is not None:
        from freedit.export.vae import vae_spec

        # fp32 whatever --precision: it runs once per image, and the SD VAE is known to overflow in fp16.
        written.append(("vae_decoder.onnx", export_graph(vae_spec(vae, model.config.input_size),
                                                         out_dir / "vae_decoder.onnx", **{**kw, "precision": "fp32"})))
    if bundled:
        shutil.copyfile(default_model_dir() / "pipeline.json", out_dir / "pipeline.json")
    if args.torch_weights:
        written += _write_torch_weights(out_dir, model, drafter, vae)
    for name, report in written:
        print(f"wrote {out_dir / name}" + (f": {report.describe()}" if report else ""))
    print(f"exported {sum(1 for n, _ in written if n.endswith('.onnx'))} graph(s) in {time.perf_counter() - t0:.1f} s")
    return 0


def _vae_source(vae: str, checkpoint: Path, log) -> str | None:
    """--vae: 'none', 'auto' (a diffusers folder's own vae/, else none), or a source for load_vae."""
    if vae == "none":
        return None
    if vae != "auto":
        return vae
    from freedit.export.diffusers_format import vae_folder

    found = vae_folder(checkpoint) if checkpoint.is_dir() else None
    if found is not None and log:
        log(f"using the VAE in {found}")
    return str(found) if found else None


def _write_torch_weights(out_dir: Path, model, drafter, vae) -> list[tuple[str, None]]:
    """The PyTorch weights the torch backend reads, under the names it looks for (pipeline.json may rename)."""
    from freedit.export.checkpoint import save_dit
    from freedit.runtime.backends.pytorch import CHECKPOINTS

    listed = out_dir / "pipeline.json"
    names = {**CHECKPOINTS, **(json.loads(listed.read_text()).get("checkpoints", {}) if listed.is_file() else {})}
    save_dit(model, out_dir / names["dit"])
    written = [(names["dit"], None)]
    if drafter is not None:
        from freedit.export.drafter import save_drafter

        save_drafter(drafter, out_dir / names["drafter"])
        written.append((names["drafter"], None))
    if vae is not None:
        from freedit.export.vae import save_vae

        save_vae(vae, out_dir / names["vae_decoder"])
        written.append((names["vae_decoder"] + "/", None))
    return written


def _init_checkpoint(args: argparse.Namespace) -> int:
    from freedit.export.checkpoint import random_dit, save_dit, save_official
    from freedit.export.dit import official_config

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} does not exist")
    model = random_dit(official_config(args.config, args.image_size), seed=args.seed)
    (save_dit if out.suffix == ".safetensors" else save_official)(model, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {args.config} at {args.image_size} px with random weights ({n:,} parameters)")
    return 0


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


def _model_dir(text: str) -> Path:
    from freedit.runtime.pipeline import default_model_dir

    path = default_model_dir() if text == "bundled" else Path(text)
    if not path.is_dir():
        raise UsageError(f"model directory {path} does not exist (export one with `freedit export --out {path}`)")
    return path


def _build(args: argparse.Namespace) -> int:
    from freedit.engine.directory import build_directory
    from freedit.engine.profiles import BuildSettings
    from freedit.engine.tensorrt_api import load_tensorrt

    model_dir = _model_dir(args.model_dir)
    if args.model_dir == "bundled" and not args.out:
        raise UsageError("the bundled model lives inside the installed package; give --out for its engines")
    targets = tuple(t.strip().lower().removeprefix("sm").lstrip("_").replace(".", "")
                    for t in args.targets.split(",") if t.strip())
    settings = BuildSettings(batch_sizes=_int_list(args.batch_sizes, "--batch-sizes"), window=args.window,
                             cfg=not args.no_cfg, static_batches=_int_list(args.static_batches, "--static-batches"),
                             targets=targets)
    trt = load_tensorrt(args.builder)
    _log(f"building with {trt.describe()} into {args.out or model_dir / 'engines'}")
    for o in build_directory(model_dir, trt, settings, Path(args.out) if args.out else None, args.force,
                             _log, not args.no_progress):
        m = o.manifest.data
        print(f"{o.graph}: {o.action} {o.plan} ({m['plan']['bytes'] / 2**20:.1f} MiB, {m['onnx']['precision']}, "
              f"{m['builder']['kind']} {m['builder']['version']}, targets {','.join(m['targets'])}"
              + (f", {o.seconds:.1f} s" if o.seconds else "") + ")")
    return 0


def _check(args: argparse.Namespace) -> int:
    from freedit.engine.check import PairResult, check_onnx, check_tensorrt, tensorrt_unavailable
    from freedit.engine.directory import engines_dir
    from freedit.export.checkpoint import load_dit
    from freedit.export.dit import DiTConfig
    from freedit.export.onnx_export import dit_spec, drafter_spec
    from freedit.runtime.contract import CONFIG_METADATA_KEY, onnx_metadata
    from freedit.runtime.pipeline import default_model_dir

    model_dir = _model_dir(args.model_dir)
    batches = _int_list(args.batches, "--batches")
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches must be integers >= 1, got {args.batches!r}")
    bundled = args.checkpoint == "bundled"
    checkpoint = default_model_dir() / "digits_dit.safetensors" if bundled else Path(args.checkpoint)
    drafter_path = args.drafter or (default_model_dir() / "drafter.safetensors" if bundled else None)
    if not (model_dir / "dit.onnx").is_file():
        raise UsageError(f"{model_dir / 'dit.onnx'} does not exist")
    if args.json:
        from freedit.runtime.outputs import check_output

        check_output(args.json)
    meta = onnx_metadata(model_dir / "dit.onnx")
    try:
        config = DiTConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise UsageError(f"{model_dir / 'dit.onnx'}: no usable '{CONFIG_METADATA_KEY}' metadata ({str(exc)[:120]}); "
                         f"export it with `freedit export`") from None
    model = load_dit(checkpoint, config)
    specs = {"dit": dit_spec(model)}
    if (model_dir / "drafter.onnx").is_file():
        if not drafter_path:
            raise UsageError(f"{model_dir} has drafter.onnx; give --drafter (its .safetensors) to check it")
        from freedit.export.drafter import load_drafter

        specs["drafter"] = drafter_spec(load_drafter(drafter_path, model))
    if (model_dir / "vae_decoder.onnx").is_file() and args.vae:
        from freedit.export.vae import load_vae, vae_spec

        specs["vae_decoder"] = vae_spec(load_vae(args.vae), model.config.input_size)
    results: list[PairResult] = []
    plans = engines_dir(model_dir, Path(args.engines) if args.engines else None)
    for graph, spec in specs.items():
        onnx_path = model_dir / f"{graph}.onnx"
        precision = onnx_metadata(onnx_path).get("freedit.precision", "fp32")
        _log(f"{graph}: ONNX ({precision}) vs PyTorch on batches {list(batches)} ...")
        results.append(check_onnx(spec, onnx_path, precision, batches))
        why = tensorrt_unavailable(plans / f"{graph}.plan")
        if why:
            results.append(PairResult(graph, "onnxruntime", "tensorrt", float("nan"), skipped=why))
        else:
            _log(f"{graph}: TensorRT vs ONNX Runtime ...")
            results.append(check_tensorrt(spec, onnx_path, plans / f"{graph}.plan", precision, batches))
    for r in results:
        head = f"{r.graph}: {r.candidate} vs {r.reference}"
        if r.skipped:
            print(f"{head}: skipped ({r.skipped})")
            continue
        print(f"{head}: {'PASS' if r.passed else 'FAIL'} (tolerance {r.tolerance:g} x output scale)")
        for name, m in r.metrics.items():
            print(f"  {name:10s} max abs {m['max_abs']:.2e}  mean abs {m['mean_abs']:.2e}  p99 abs {m['p99_abs']:.2e}  "
                  f"max rel. to scale {m['max_rel_to_scale']:.2e}"
                  + (f"  NON-FINITE values {m['nonfinite']:,}" if m["nonfinite"] else ""))
    ran = [r for r in results if not r.skipped]
    verdict = all(r.passed for r in ran)
    if args.json:
        from freedit.runtime.outputs import json_safe, write_outputs

        write_outputs({args.json: json.dumps(json_safe({"model_dir": str(model_dir), "passed": verdict,
                                                        "pairs": [r.to_dict() for r in results]}),
                                             indent=1, allow_nan=False).encode()})
    print(f"verdict: {'PASS' if verdict else 'FAIL'} ({len(ran)} comparisons ran, {len(results) - len(ran)} skipped)")
    return 0 if verdict else 1


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None


def _bench(args: argparse.Namespace) -> int:
    if args.host_overhead:
        from freedit.benchmarks import host_overhead

        return host_overhead.main(["--out", args.out if args.out != "bench_results" else
                                   "benchmarks/results/host_overhead"])
    from freedit.benchmarks.bench_report import write
    from freedit.benchmarks.harness import BenchConfig, run_bench

    cfg = BenchConfig(
        models=[m for m in args.models.split(",") if m], backends=[b for b in args.backends.split(",") if b],
        samplers=[s for s in args.samplers.split(",") if s], windows=list(_int_list(args.windows, "--windows")),
        relax=_float_list(args.relax, "--relax"), batch_sizes=list(_int_list(args.batch_sizes, "--batch-sizes")),
        steps=list(_int_list(args.steps, "--steps")),
        cfg_scales=[None if c.strip() == "default" else float(c) for c in args.cfg_scales.split(",") if c.strip()]
        if args.cfg_scales else [None],
        n=args.n, repeats=args.repeats, seed=args.seed, threads=args.threads, quality=not args.no_quality,
        reference=args.reference, adaptive_max_window=args.adaptive_max_window, pilot_n=args.pilot_n,
        draft_guidance=args.draft_guidance, verifier=args.verifier)
    cfg.validate()  # every input checked before the first run
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    command = "freedit bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "freedit bench (API)"
    report = run_bench(cfg, command=command, progress=not args.no_progress, log=_log)
    for path in write(report, out, args.name):
        print(f"wrote {path}")
    return 0


def _train_drafter(args: argparse.Namespace) -> int:
    from freedit.export.checkpoint import load_dit
    from freedit.export.train_drafter import DrafterTrainConfig, setting_weights, train_drafter

    from freedit.runtime.schedule import Schedule

    if args.unroll < 1:
        raise UsageError(f"--unroll must be at least 1, got {args.unroll}")
    for spacing in args.steps:
        Schedule.create(spacing)  # a ValueError naming what is wrong with the spacing
        if Schedule.create(spacing).num_steps < 3:
            raise UsageError(f"--steps {spacing}: FREE drafts nothing below 3 steps, so there is nothing to train on")
    bad = [c for c in args.cfg_scale if not c >= 0]
    if bad:
        raise UsageError(f"--cfg-scale must be >= 0 (1 = no guidance), got {bad}")
    if args.depth < 1 or args.trajectories < 1 or args.held_out < 1 or args.settings_per_step < 1:
        raise UsageError("--depth, --trajectories, --held-out and --settings-per-step must be at least 1")
    cfg = DrafterTrainConfig(spacings=tuple(args.steps), cfg_scales=tuple(args.cfg_scale),
                             cfg_weights=tuple(args.cfg_weight) if args.cfg_weight else None,
                             trajectories=args.trajectories, held_out=args.held_out, depth=args.depth,
                             parent_time=not args.no_parent_time, mlp_ratio=args.mlp_ratio,
                             parent_guidance=args.draft_guidance == "parent",
                             settings_per_step=args.settings_per_step, divergence=args.divergence,
                             train_steps=args.train_steps, batch_size=args.batch_size, unroll=args.unroll, lr=args.lr,
                             seed=args.seed, threads=args.threads)
    try:  # checked before any trajectory is collected, by the trainer's own rule
        setting_weights(cfg)
    except ValueError as e:
        raise UsageError(f"--cfg-weight {e}") from None
    path = train_drafter(load_dit(args.dit), args.out, cfg)
    print(f"wrote {path}")
    return 0


def _train_dit(args: argparse.Namespace) -> int:
    from freedit.export.train_dit import TrainConfig, train_digits_dit

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    path = train_digits_dit(args.out, cfg)
    print(f"wrote {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import socket
    import threading

    from freedit.errors import FreeditError

    try:
        import pydantic
        from ray import serve

        from freedit.runtime import serving
    except ImportError as exc:
        raise FreeditError(f"`freedit serve` needs Ray Serve ({exc.name} is missing): "
                           f"pip install 'freedit[serving]'") from None
    flags = {"num_replicas": "--replicas", "batch_wait_timeout_s": "--batch-wait-ms",
             "graceful_shutdown_timeout_s": "--graceful-timeout", "token_sha256": "--token-file"}
    model = _model_dir(args.model) if args.model else None
    if model is not None and not (model / "dit.onnx").is_file():
        raise UsageError(f"{model} has no dit.onnx; export one with `freedit export --out {model}`")
    token = _read_token(args.token_file) if args.token_file else None
    try:
        config = serving.ServeConfig(
            model=str(model) if model else None, backend=args.backend, threads=args.threads, batch_size=args.batch_size,
            num_replicas=args.replicas, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
            max_images=args.max_images, max_steps=args.max_steps, max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests, graceful_shutdown_timeout_s=args.graceful_timeout,
            max_body_bytes=args.max_body_bytes, token_sha256=serving.token_digest(token) if token else None)
    except pydantic.ValidationError as exc:
        raise UsageError("; ".join(f"{flags.get(e['loc'][0], '--' + e['loc'][0].replace('_', '-'))}: {e['msg']}"
                                   for e in exc.errors())) from None
    if model is not None and args.backend.startswith("onnxruntime"):
        # The replicas' own load, once here: a model folder that does not load is one line, not a
        # replica's traceback relayed by Ray (other backends may need the replicas' GPUs; Ray's error
        # is then reduced to its cause by serving.start).
        from freedit.runtime.pipeline import Pipeline

        Pipeline.from_directory(model, backend="onnxruntime", threads=1)
    if args.address is None:  # our own Ray: the port must be free here (on a cluster, every node's proxy binds it)
        with socket.socket() as probe:
            try:
                probe.bind((args.host, args.port))
            except OSError as exc:
                raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    serving.start(config, host=args.host, port=args.port, name=args.name, route_prefix=args.route_prefix,
                  request_timeout_s=args.request_timeout, address=args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {args.name} at http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}/ "
          f"({args.replicas} replica(s); API at /docs); Ctrl-C drains and stops", flush=True)
    while not stop.wait(1.0):
        pass
    _log(f"draining {args.name}: new requests get 503, in-flight ones finish (up to {args.graceful_timeout:g} s) ...")
    serving.stop(args.name, timeout_s=args.graceful_timeout)
    if args.address is None:  # a cluster's Serve may hold other applications: leave it running there
        serve.shutdown()
    print(f"stopped {args.name}")
    return 0


def _read_token(path: str) -> str:
    """The bearer token of `freedit serve --token-file`: a file (not the command line, which `ps` shows)."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if len(token) < 16 or any(c.isspace() for c in token) or not token.isascii():
        raise UsageError(f"--token-file {path}: the token must be one line of at least 16 ASCII characters "
                         f"without spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def build_parser() -> argparse.ArgumentParser:
    from freedit.benchmarks import add_draft_guidance_argument, add_verifier_argument
    from freedit.runtime import limits as lim
    from freedit.runtime.contract import DRAFT_GUIDANCE, RELAX_SCORES, VERIFIERS

    parser = OneLineParser(prog="freedit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = sub.add_parser("generate", formatter_class=fmt, help="sample images (default: the bundled digits DiT, CPU)",
                       description="Sample class-conditional images and write a PNG grid (one row per class).")
    g.add_argument("--classes", default="0-9", help=f"class labels, at most {lim.MAX_IMAGES:,} images with --per-class: a range "
                   "'0-9', a list '1,4,7' or a mix; ImageNet models also take names: 207,'golden retriever'")
    g.add_argument("--per-class", type=bounded(ascii_int, "value", 1, lim.MAX_IMAGES), default=8,
                   help=f"images per class label, 1..{lim.MAX_IMAGES:,}")
    g.add_argument("--sampler", default=None, help="free (lossless FREE, the default with a drafter), free-relax "
                   "(tempered accept test), frozen (training-free drafter), sequential (DDPM, one DiT call per step) "
                   "or ddim (eta 0)")
    g.add_argument("--window", type=bounded(ascii_int, "window length L", 1, lim.MAX_WINDOW), default=None,
                   help=f"FREE's draft window L, 1..{lim.MAX_WINDOW} (default: the model's)")
    g.add_argument("--relax", type=bounded(ascii_float, "relax lambda", 0, lim.MAX_RELAX), default=None,
                   help=f"FREE (relax) lambda, 0..{lim.MAX_RELAX:g}; 0 = lossless (default: the model's)")
    g.add_argument("--relax-score", choices=RELAX_SCORES, default=None,
                   help="what FREE (relax) tempers by: gap (the draft's distance from the DiT's transition mean, in "
                   "its standard deviations) or variance (the DiT's learned variance); default: the model's")
    g.add_argument("--verifier", choices=VERIFIERS, default=None,
                   help="how FREE verifies a window: step (up to the first rejection) or block (the whole window "
                   "jointly: as exact, commits at least as many drafts); default: the model's")
    g.add_argument("--draft-guidance", choices=DRAFT_GUIDANCE, default=None,
                   help="where guided FREE drafts take their guidance from: parent (the conditional row drafted, the "
                   "last verified state's cond - null gap) or drafter (both rows drafted); default: the model's")
    g.add_argument("--steps", type=steps_arg, default=None, help="step count 1..1000 (e.g. 250) or DiT spacing "
                   "('ddim50', '10,20,30'); default: the model's, 250 for the bundled model")
    g.add_argument("--cfg-scale", type=bounded(ascii_float, "cfg scale", 0, lim.MAX_CFG_SCALE, " (1 = no guidance)"),
                   default=None, help=f"classifier-free guidance scale, 0..{lim.MAX_CFG_SCALE:g} (1 = off); "
                   "default: the model's documented scale")
    g.add_argument("--seed", type=bounded(ascii_int, "seed", 0, 2**64 - 1), default=0,
                   help="random seed in [0, 2**64); same seed => same images")
    g.add_argument("--batch-size", type=bounded(ascii_int, "batch size", 1, lim.MAX_BATCH_SIZE), default=None,
                   help=f"samples in flight per DiT call, 1..{lim.MAX_BATCH_SIZE:,} (default: the model's, 64)")
    g.add_argument("--out", default="freedit_samples.png", help="PNG grid to write. Every output is written under "
                   "a temporary name and renamed once all are ready (all or none); a symlink's target file is "
                   "replaced; a device or FIFO (/dev/null, /dev/stdout) is written in place")
    g.add_argument("--samples-dir", default=None, help="also write one PNG per sample into this folder (created "
                   "only when the images are written)")
    g.add_argument("--stats", default=None, help="write settings, summary and per-sample statistics as JSON here")
    g.add_argument("--scale", type=bounded(ascii_int, "value", 1, lim.MAX_SCALE), default=None,
                   help=f"nearest-neighbour upscaling of the written images, 1..{lim.MAX_SCALE} (default: 4 for images "
                        "under 64 px such as the digits, else 1); the memory of sampling and of the images is "
                        "estimated first and must fit the machine")
    g.add_argument("--latents", default=None, help="also save the final latents of a latent DiT as .npy (the only "
                   "output of one exported without a VAE decoder)")
    g.add_argument("--decode-batch-size", type=bounded(ascii_int, "value", 1, lim.MAX_BATCH_SIZE), default=None,
                   help="latents per VAE decoder call (bounds its memory; default: the model's, 4)")
    g.add_argument("--model", default=None, help="model directory with dit.onnx (default: the bundled digits DiT)")
    g.add_argument("--backend", default="onnxruntime", help="onnxruntime, onnxruntime-cuda, torch, torch-compiled, "
                   "torch-cuda, torch-cuda-compiled or tensorrt (plans from `freedit build`)")
    g.add_argument("--threads", type=bounded(ascii_int, "value", 1, lim.MAX_THREADS), default=None,
                   help=f"CPU threads of ONNX Runtime or torch, 1..{lim.MAX_THREADS} (default: up to 8)")
    g.add_argument("--maths", default="auto", choices=["auto", "numpy", "device"],
                   help="where the round's sampling maths runs: device (the CUDA kernels, features kept on the GPU; "
                        "without a GPU their host emulation), numpy (the host), auto (device for GPU backends)")
    g.add_argument("--no-graphs", action="store_true", help="device maths: plain launches, no CUDA graph replay")
    g.add_argument("--micro-batches", type=bounded(ascii_int, "value", 1, 64), default=1,
                   help="batches in flight, 1..64: one is drafted while another is verified (FREE samplers)")
    g.add_argument("--precision", default=None, choices=["fp32", "tf32", "bf16"],
                   help="torch backends' compute precision (ONNX Runtime and TensorRT run the graph's own)")
    g.add_argument("--device", type=bounded(ascii_int, "value", 0, 1023), default=0,
                   help="the GPU of the GPU backends")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    e = sub.add_parser("export", formatter_class=fmt, help="export DiT (+ drafter, VAE decoder) to ONNX (torch extra)",
                       description="Export a DiT (official .pt, train.py checkpoint, our safetensors or the bundled model) "
                                   "and optionally its drafter and VAE decoder to ONNX per the runtime contracts. Every "
                                   "graph is checked against PyTorch before it is moved into place.")
    e.add_argument("--checkpoint", default="bundled", help="DiT-XL-2-256x256.pt, a train.py checkpoint, .safetensors, "
                   "a diffusers folder (transformer/ [+ vae/, scheduler/], e.g. facebook/DiT-XL-2-256 downloaded), "
                   "or 'bundled' (the digits DiT and its drafter)")
    e.add_argument("--config", default=None, help="official config name such as DiT-XL/2 (default: inferred from the file)")
    e.add_argument("--image-size", type=ascii_int, default=256, help="image size for an official config (latent = size / 8)")
    e.add_argument("--num-heads", type=bounded(ascii_int, "value", 1, 1024), default=None,
                   help="attention heads of a checkpoint that does not record its config and is not an official "
                        "DiT size (the weights do not say; freedit refuses to guess)")
    e.add_argument("--out", required=True, help="output model directory (dit.onnx, drafter.onnx, vae_decoder.onnx)")
    e.add_argument("--drafter", default=None, help="drafter.safetensors from `freedit train-drafter` (exports drafter.onnx)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="GEMM/attention precision in the graph; LayerNorm, modulation, gates, residuals and the "
                        "timestep embedding stay fp32")
    e.add_argument("--opset", type=ascii_int, default=None, help="ONNX opset (default: 18, or 22 for bf16)")
    e.add_argument("--vae", default="auto", help="also export the VAE decoder of a latent DiT: a diffusers folder, "
                   "a hub id (stabilityai/sd-vae-ft-ema), 'random' (SD VAE shape, random weights), 'random:W' (the "
                   "same layout with widths W,2W,4W,4W; the SD VAE is 128), 'auto' (a diffusers checkpoint's own vae/, "
                   "else none) or 'none'")
    e.add_argument("--torch-weights", action="store_true", help="also write the PyTorch weights (dit.safetensors, "
                   "drafter.safetensors, vae/) so the torch backend can run the folder")
    e.add_argument("--external-data", default="auto", choices=["auto", "always"],
                   help="weights in a .data file beside the graph: above 2 GB (protobuf's limit), or always")
    e.add_argument("--quiet", action="store_true", help="no per-stage progress lines")
    e.set_defaults(func=_export)

    r = sub.add_parser("init-checkpoint", formatter_class=fmt, help="write an official DiT config with random weights",
                       description="Write a DiT checkpoint with random weights in the official format (.pt state dict) "
                                   "or ours (.safetensors), for sizing engines and benchmarking cost curves.")
    r.add_argument("--config", default="DiT-XL/2", help="official config name")
    r.add_argument("--image-size", type=ascii_int, default=256, help="image size (latent = size / 8)")
    r.add_argument("--seed", type=ascii_int, default=0, help="random seed")
    r.add_argument("--out", required=True, help="checkpoint to write (.pt = official format, .safetensors = ours)")
    r.set_defaults(func=_init_checkpoint)

    b = sub.add_parser("build", formatter_class=fmt, help="build TensorRT plans for an exported model directory",
                       description="Build a TensorRT plan (with `tensorrt` when installed, else `tensorrt_rtx`) for every "
                                   "graph in MODEL_DIR, with a manifest per plan. Up-to-date plans are kept; stale ones "
                                   "(ONNX, builder or settings changed) are rebuilt; plans without a manifest are refused.")
    b.add_argument("model_dir", help="folder written by `freedit export` (dit.onnx, drafter.onnx, ...), or 'bundled'")
    b.add_argument("--out", default=None, help="engine folder (default: MODEL_DIR/engines)")
    b.add_argument("--builder", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"],
                   help="auto = tensorrt when installed, else tensorrt-rtx")
    b.add_argument("--batch-sizes", default="1,8", help="samples in flight per micro-batch the engines must serve")
    b.add_argument("--window", type=ascii_int, default=8, help="FREE's window L: the DiT verifies B*(L+1) states per call")
    b.add_argument("--no-cfg", action="store_true", help="engines for guidance scale 1 (one row per state, not two)")
    b.add_argument("--static-batches", default="", help="sample batch sizes that also get exact-shape profiles "
                   "(for CUDA graphs), e.g. '1,8'")
    b.add_argument("--targets", default="", help="compute capabilities for TensorRT-RTX, e.g. '80,86,89,120' "
                   "(default: those four); full TensorRT builds for the GPU it runs on")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date; overwrite plans without a manifest")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)

    c = sub.add_parser("check", formatter_class=fmt, help="compare ONNX with PyTorch and plans with ONNX (polygraphy)",
                       description="Per graph in MODEL_DIR: ONNX Runtime vs PyTorch always; TensorRT vs ONNX Runtime where "
                                   "a GPU and TensorRT are present. Prints per-output error metrics and a verdict "
                                   "(exit 0 = pass, 1 = a comparison failed).")
    c.add_argument("model_dir", help="folder written by `freedit export`, or 'bundled'")
    c.add_argument("--checkpoint", default="bundled", help="the DiT checkpoint the ONNX was exported from")
    c.add_argument("--drafter", default=None, help="the drafter .safetensors behind drafter.onnx")
    c.add_argument("--vae", default=None, help="the VAE source behind vae_decoder.onnx (as given to export)")
    c.add_argument("--engines", default=None, help="engine folder (default: MODEL_DIR/engines)")
    c.add_argument("--batches", default="1,3", help="batch sizes of the random inputs compared")
    c.add_argument("--json", default=None, help="also write the metrics and verdict as JSON here")
    c.set_defaults(func=_check)

    k = sub.add_parser("bench", formatter_class=fmt, help="latency, speed-up, acceptance and quality of every sampler",
                       description="Run sequential, frozen-target, FREE, FREE (relax) over a lambda sweep and the adaptive "
                                   "window side by side, interleaved in one process, and write JSON, Markdown and plots.")
    k.add_argument("--models", default="bundled", help="comma list: 'bundled', model directories, or random:CONFIG:SIZE "
                   "(e.g. random:DiT-S/2:256, random weights, for cost curves)")
    k.add_argument("--backends", default="onnxruntime", help="comma list of backends (see `generate --backend`)")
    k.add_argument("--samplers", default="sequential,frozen,free,free-relax,adaptive", help="comma list")
    k.add_argument("--windows", default="8", help="window lengths L for frozen/free/free-relax")
    k.add_argument("--relax", default="0.5,2,8", help="lambda sweep of free-relax")
    k.add_argument("--batch-sizes", default="64", help="samples in flight")
    k.add_argument("--steps", default="250", help="step counts")
    k.add_argument("--cfg-scales", default="default", help="CFG scales ('default' = the model's)")
    k.add_argument("--n", type=ascii_int, default=256, help="images per configuration and repeat")
    k.add_argument("--repeats", type=ascii_int, default=1, help="repeats (medians and p90 over them)")
    k.add_argument("--seed", type=ascii_int, default=0, help="seed of every measured run")
    k.add_argument("--threads", type=ascii_int, default=None, help="CPU threads of ONNX Runtime / torch")
    k.add_argument("--reference", default=None, help=".npz of uint8 images [N,H,W,3]: FID/IS for ImageNet models")
    k.add_argument("--no-quality", action="store_true", help="skip FD/accuracy/FID")
    k.add_argument("--adaptive-max-window", type=ascii_int, default=8, help="largest L the adaptive window may choose")
    k.add_argument("--pilot-n", type=ascii_int, default=32, help="images of the adaptive policy's pilot run (other seeds)")
    add_draft_guidance_argument(k)  # the benchmark CLIs' option, for the pilot and every FREE run
    add_verifier_argument(k)  # likewise, for the pilot and every lossless speculative run
    k.add_argument("--out", default="bench_results", help="output folder")
    k.add_argument("--name", default="bench", help="file stem of the outputs")
    k.add_argument("--host-overhead", action="store_true",
                   help="instead: the host's work per FREE round, numpy path vs device path, at digits and DiT-XL/2 "
                        "shapes (benchmarks/host_overhead.py; --out default benchmarks/results/host_overhead)")
    k.add_argument("--no-progress", action="store_true", help="no progress bars")
    k.set_defaults(func=_bench)

    t = sub.add_parser("train-dit", formatter_class=fmt, help="train the bundled digits DiT (needs the torch extra)",
                       description="Train the class-conditional digits DiT on scikit-learn's digits (resumable).")
    t.add_argument("--out", default="runs/digits", help="output folder (state.pt, digits_dit.safetensors, train_log.json)")
    t.add_argument("--steps", type=ascii_int, default=5000, help="optimizer steps")
    t.add_argument("--batch-size", type=ascii_int, default=256, help="images per step")
    t.add_argument("--lr", type=ascii_float, default=5e-4, help="peak learning rate (warm-up, then cosine decay)")
    t.add_argument("--seed", type=ascii_int, default=0, help="random seed")
    t.add_argument("--threads", type=ascii_int, default=2, help="torch CPU threads")
    t.set_defaults(func=_train_dit)

    d = sub.add_parser("train-drafter", formatter_class=fmt, help="distil FREE's drafter from a DiT (torch extra)",
                       description="Collect trajectories from the DiT's own sampler and train the feature drafter "
                                   "(resumable; logs held-out acceptance per timestep).")
    d.add_argument("--dit", required=True, help="the frozen target: our .safetensors or an official .pt")
    d.add_argument("--out", default="runs/drafter", help="output folder (trajectories.pt, state.pt, drafter.safetensors)")
    d.add_argument("--steps", nargs="+", default=["250"], help="inference respacings the drafter is trained for "
                   "(e.g. 25 50 100 250 ddim50)")
    d.add_argument("--cfg-scale", nargs="+", type=ascii_float, default=[1.5], help="inference CFG scales the drafter is "
                   "trained for (e.g. 1 1.5 4); every respacing x scale pair is a training setting")
    d.add_argument("--cfg-weight", nargs="+", type=ascii_float, default=None, help="how often each --cfg-scale's "
                   "settings are drawn, relative to the others (e.g. 1 1 2: strong guidance twice as often); default: alike")
    d.add_argument("--trajectories", type=ascii_int, default=320, help="training trajectories per setting")
    d.add_argument("--held-out", type=ascii_int, default=32, help="held-out trajectories per setting (acceptance report)")
    d.add_argument("--depth", type=ascii_int, default=1, help="drafter transformer blocks")
    d.add_argument("--mlp-ratio", type=ascii_float, default=None, help="MLP width of the drafter's blocks (default: the DiT's)")
    d.add_argument("--no-parent-time", action="store_true", help="do not give the drafter its input features' "
                   "timestep (the pre-t_feat drafter, for one respacing)")
    d.add_argument("--draft-guidance", choices=DRAFT_GUIDANCE, default="drafter",
                   help="guided drafts trained as: drafter (both rows drafted: the drafter then serves either runtime "
                   "rule) or parent (the conditional row only, with the parent's cond - null gap, as the runtime's "
                   "default draws them; on digits no better than drafter, benchmarks/results/drafter_held_out.md)")
    d.add_argument("--settings-per-step", type=ascii_int, default=4, help="settings sharing each optimizer step's batch")
    d.add_argument("--divergence", choices=("kl", "sqrt-kl", "hellinger"), default="kl",
                   help="distance between target and draft transitions the loss minimises per drafted position "
                   "(hellinger saturates like the rejection rate does)")
    d.add_argument("--train-steps", type=ascii_int, default=2000, help="optimizer steps")
    d.add_argument("--batch-size", type=ascii_int, default=128, help="drafted positions per step")
    d.add_argument("--unroll", type=ascii_int, default=3, help="steps unrolled with drafted features fed back")
    d.add_argument("--lr", type=ascii_float, default=1e-3, help="peak learning rate")
    d.add_argument("--seed", type=ascii_int, default=0, help="random seed")
    d.add_argument("--threads", type=ascii_int, default=2, help="torch CPU threads")
    d.set_defaults(func=_train_drafter)

    v = sub.add_parser("serve", formatter_class=fmt, help="serve generation over HTTP with Ray Serve (serving extra)",
                       description="Run freedit as a Ray Serve application: POST /generate, GET /health, GET /stats, "
                                   "OpenAPI at /docs. Requests arriving together are batched; Ctrl-C or SIGTERM drains "
                                   "(503 to new work, in-flight work finishes) and stops. See docs/SERVING.md.")
    v.add_argument("--host", default="127.0.0.1", help="address of the HTTP proxy (0.0.0.0 for every interface). "
                   "With a loopback host and no --address, Ray's own ports listen on 127.0.0.1 only")
    v.add_argument("--port", type=bounded(ascii_int, "value", 1, 65535), default=8000, help="HTTP port, 1..65535")
    v.add_argument("--address", default=None, help="Ray cluster to join ('auto' = the one `ray start` made on this "
                   "node, or ray://HOST:10001); default: start a private Ray on this machine")
    v.add_argument("--name", default="freedit", help="Serve application name")
    v.add_argument("--route-prefix", default="/", help="URL prefix of the application")
    v.add_argument("--replicas", type=ascii_int, default=1, help="replicas, each with its own Pipeline")
    v.add_argument("--gpus-per-replica", type=ascii_float, default=0.0, help="GPUs Ray reserves per replica (1 = one GPU each)")
    v.add_argument("--cpus-per-replica", type=ascii_float, default=1.0, help="CPUs Ray reserves per replica")
    v.add_argument("--model", default=None, help="model directory with dit.onnx (default: the bundled digits DiT)")
    v.add_argument("--backend", default="onnxruntime", help="backend of every replica (see `generate --backend`)")
    v.add_argument("--threads", type=ascii_int, default=None, help="CPU threads per replica (ONNX Runtime / torch)")
    v.add_argument("--batch-size", type=ascii_int, default=None, help="samples in flight per DiT call (default: the model's)")
    v.add_argument("--max-images", type=ascii_int, default=64, help="most class labels (images) one request may ask for")
    v.add_argument("--max-steps", type=ascii_int, default=250, help="most sampling steps one request may ask for")
    v.add_argument("--max-batch-size", type=ascii_int, default=16, help="most requests merged into one batch")
    v.add_argument("--batch-wait-ms", type=ascii_float, default=20.0, help="how long a batch waits for more requests")
    v.add_argument("--max-ongoing-requests", type=ascii_int, default=32, help="requests a replica holds (batch queue included)")
    v.add_argument("--max-queued-requests", type=ascii_int, default=64, help="requests waiting for a replica before 503 "
                   "(-1 = unbounded)")
    v.add_argument("--request-timeout", type=ascii_float, default=300.0, help="seconds before the proxy answers 408")
    v.add_argument("--max-body-bytes", type=ascii_int, default=64 * 1024,
                   help="largest /generate body in bytes (413 above), 1024..67108864")
    v.add_argument("--token-file", default=None, help="file holding a bearer token that POST /generate then requires "
                   "(Authorization: Bearer TOKEN); replicas keep only its sha256")
    v.add_argument("--graceful-timeout", type=ascii_float, default=120.0, help="seconds a stopping replica may take to "
                   "finish its in-flight requests")
    v.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from freedit.errors import FreeditError
    from freedit.runtime.contract import ContractError

    known = (UsageError, ValueError, FileNotFoundError, ContractError, PermissionError, IsADirectoryError,
             FreeditError, OSError)
    try:
        return args.func(args)
    except known as exc:
        print(f"freedit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"freedit {args.command}: error: {exc.name} is not installed; this command needs "
              f"`pip install 'freedit[torch]'`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"freedit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
