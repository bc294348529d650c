"""The engine directory: the plans of one model, built together and loaded as a unit.

    MODEL_DIR/                 what `freedit export` wrote
      dit.onnx [+ dit.onnx.data], drafter.onnx, vae_decoder.onnx, pipeline.json
      engines/                 what `freedit build` writes
        dit.plan  dit.plan.json          plan + manifest, per graph
        drafter.plan  drafter.plan.json
        engines.json                     the unit: builder, settings, and per graph its plan's
                                         name and the checksums of the plan and its manifest

A unit is used only whole and as built: every graph of the model folder has its plan, every plan
named by the index is a plain file inside the engine folder, and each plan and manifest still has
the checksum the index recorded (so swapping a plan together with its manifest is caught too).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from freedit.engine.builder import BuiltPlan, build_plan, device_compute_capability
from freedit.engine.manifest import Manifest, manifest_path, sha256_files, write_atomically
from freedit.engine.profiles import BuildSettings
from freedit.engine.tensorrt_api import TensorRT
from freedit.errors import BuildError, StalePlanError
from freedit.runtime.contract import onnx_files

GRAPHS = ("dit", "drafter", "vae_decoder")
INDEX = "engines.json"
INDEX_FORMAT = 2  # 1 had graph -> plan name only


def engines_dir(model_dir: Path, out: Path | None = None) -> Path:
    return Path(out) if out else Path(model_dir) / "engines"


@dataclass
class BuildOutcome:
    graph: str
    action: str  # "built", "rebuilt" or "up to date"
    reasons: list[str]
    plan: Path
    manifest: Manifest
    seconds: float


def build_directory(model_dir: Path, trt: TensorRT, settings: BuildSettings, out: Path | None = None,
                    force: bool = False, log: Callable[[str], None] | None = None,
                    progress: bool = True) -> list[BuildOutcome]:
    """Build (or keep, when up to date) a plan for every graph in ``model_dir``."""
    model_dir = Path(model_dir)
    graphs = [g for g in GRAPHS if (model_dir / f"{g}.onnx").is_file()]
    if "dit" not in graphs:
        raise BuildError(f"{model_dir} has no dit.onnx; run `freedit export --out {model_dir}` first")
    target = engines_dir(model_dir, out)
    target.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for graph in graphs:
        onnx_path, plan_path = model_dir / f"{graph}.onnx", target / f"{graph}.plan"
        onnx_sha = sha256_files(onnx_files(onnx_path))
        action, reasons = "built", []
        if plan_path.exists():
            try:
                manifest = Manifest.read(plan_path)
                reasons = manifest.reasons_stale(plan_path, onnx_sha, trt.kind, trt.version, settings.to_dict())
            except StalePlanError as exc:
                if not force:
                    raise
                reasons = [str(exc)]
            if not reasons and not force:
                outcomes.append(BuildOutcome(graph, "up to date", [], plan_path, manifest, 0.0))
                if log:
                    log(f"{graph}: {plan_path} is up to date")
                continue
            action = "rebuilt"
            if log:
                log(f"{graph}: rebuilding {plan_path}: " + ("; ".join(reasons) or "--force"))
        built: BuiltPlan = build_plan(trt, onnx_path, plan_path, settings, log, progress, onnx_sha)
        outcomes.append(BuildOutcome(graph, action, reasons, plan_path, built.manifest, built.seconds))
    graphs = {o.graph: {"plan": o.plan.name, "plan_sha256": sha256_files([o.plan]),
                        "manifest_sha256": sha256_files([manifest_path(o.plan)])} for o in outcomes}
    index = {"format": INDEX_FORMAT, "builder": {"kind": trt.kind, "version": trt.version},
             "settings": settings.to_dict(), "model_dir": os.path.relpath(model_dir, target), "graphs": graphs}
    write_atomically(target / INDEX, json.dumps(index, indent=1))
    return outcomes


def read_index(model_dir: Path, target: Path) -> dict:
    """engines.json, checked: format, one entry per graph the model folder has, plans inside the folder."""
    rebuild = f"rebuild with `freedit build {model_dir} --force`"
    path = target / INDEX
    if not path.is_file():
        raise StalePlanError(f"{target} has no {INDEX}; build the engines with `freedit build {model_dir}`")
    try:
        index = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise StalePlanError(f"{path} is not valid JSON ({exc}); {rebuild}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise StalePlanError(f"{path} has index format {got!r}, this freedit needs {INDEX_FORMAT} (with checksums); "
                             f"{rebuild}")
    graphs, settings = index.get("graphs"), index.get("settings")
    entry = {"plan": str, "plan_sha256": str, "manifest_sha256": str}
    if not isinstance(settings, dict) or not isinstance(graphs, dict) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in entry.items()) for e in graphs.values()):
        raise StalePlanError(f"{path} is not a complete engine index (settings, graphs with plan and checksums); "
                             f"{rebuild}")
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown:
        raise StalePlanError(f"{path} names unknown graph(s) {unknown}; {rebuild}")
    needed = [g for g in GRAPHS if (Path(model_dir) / f"{g}.onnx").is_file()]
    missing = [g for g in needed if g not in graphs]
    if missing:
        raise StalePlanError(f"{target} is an incomplete unit: no plan for {', '.join(missing)} although "
                             f"{model_dir} has {', '.join(g + '.onnx' for g in missing)}; {rebuild}")
    root = target.resolve()
    for graph, e in graphs.items():
        name = e["plan"]
        inside = Path(name).name == name and name not in ("", ".", "..") and (target / name).resolve().parent == root
        if not inside:
            raise StalePlanError(f"{path}: the {graph} plan {name!r} is not a file inside {target}; refusing a unit "
                                 f"that points elsewhere; {rebuild}")
    return index


@dataclass
class EngineSet:
    """Plans checked against their ONNX files, the installed TensorRT and this GPU: safe to deserialize."""

    directory: Path
    plans: dict[str, Path]
    manifests: dict[str, Manifest]
    settings: BuildSettings

    def max_rows(self) -> dict[str, int]:
        """The most rows each plan takes in one call (its profiles' largest maximum), from the
        manifests: what the runtime checks a request against before sampling."""
        return {g: max(p["rows"][2] for p in m.data["profiles"]) for g, m in self.manifests.items()}


def open_engines(model_dir: Path, trt: TensorRT, out: Path | None = None, device_cc: str | None = "auto") -> EngineSet:
    """Check every plan of the unit; raise StalePlanError naming each reason if any must not be used."""
    model_dir = Path(model_dir)
    target = engines_dir(model_dir, out)
    index = read_index(model_dir, target)
    cc = device_compute_capability() if device_cc == "auto" else device_cc
    problems, plans, manifests = [], {}, {}
    for graph, entry in index["graphs"].items():
        plan_path, onnx_path = target / entry["plan"], model_dir / f"{graph}.onnx"
        try:
            manifest = Manifest.read(plan_path)
        except StalePlanError as exc:
            problems.append(str(exc))
            continue
        if manifest.data["graph"] != graph:
            problems.append(f"{graph}: {manifest_path(plan_path).name} describes a {manifest.data['graph']} plan")
            continue
        if not onnx_path.is_file():
            problems.append(f"{graph}: {onnx_path} is missing")
            continue
        plan_sha = sha256_files([plan_path]) if plan_path.is_file() else None
        reasons = manifest.reasons_stale(plan_path, sha256_files(onnx_files(onnx_path)), trt.kind, trt.version,
                                         None, cc, plan_sha=plan_sha)
        problems += [f"{graph}: {r}" for r in reasons]
        # The index's own checksums: a plan swapped together with a manifest that describes it passes the
        # manifest's check but not these.
        if sha256_files([manifest_path(plan_path)]) != entry["manifest_sha256"]:
            problems.append(f"{graph}: {manifest_path(plan_path).name} is not the manifest {INDEX} recorded")
        if plan_sha is not None and plan_sha != entry["plan_sha256"]:
            problems.append(f"{graph}: {plan_path.name} is not the plan {INDEX} recorded")
        if manifest.data["settings"] != index["settings"]:
            problems.append(f"{graph}: built with other settings than the rest of {target}")
        plans[graph], manifests[graph] = plan_path, manifest
    if problems:
        raise StalePlanError(f"engines in {target} must not be used: " + "; ".join(problems)
                             + f". Rebuild with `freedit build {model_dir}`")
    return EngineSet(target, plans, manifests, BuildSettings.from_dict(index["settings"]))
