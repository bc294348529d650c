"""The manifest beside each plan: what it was built from, with what, for which GPUs and shapes.

A plan is used only if its manifest says it was built from the ONNX file now beside it (checksum),
by the TensorRT now installed, for this GPU and these settings; otherwise it is rebuilt
(`freedit build`) or refused (the runtime), with the reason, never used silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from freedit.errors import StalePlanError

FORMAT = 1


def sha256_files(paths) -> str:
    """One checksum over a graph and its external data files, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def write_atomically(path: Path, text: str) -> None:
    """Temporary name, then rename; no temporary left behind if the write fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: What a manifest must hold, and of which JSON type; read before any field is used.
SCHEMA = {"graph": str, "onnx": {"file": str, "sha256": str, "precision": str, "config": (str, type(None))},
          "plan": {"file": str, "bytes": int, "sha256": str}, "builder": {"kind": str, "version": str},
          "targets": list, "settings": dict, "profiles": list}


def _fields(schema: dict, data, prefix: str = ""):
    """(dotted key, expected type) for every field of ``data`` that does not match ``schema``."""
    for key, kind in schema.items():
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                yield prefix + key, dict
            else:
                yield from _fields(kind, value, f"{prefix}{key}.")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            yield prefix + key, kind


def manifest_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".json")


@dataclass
class Manifest:
    data: dict

    @classmethod
    def read(cls, plan_path: Path) -> "Manifest":
        path = manifest_path(plan_path)
        if not path.is_file():
            raise StalePlanError(f"{plan_path} has no manifest ({path.name}): a plan not built by `freedit build`; "
                                 "refusing to use it (rebuild with `freedit build --force`)")
        try:
            data = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:
            raise StalePlanError(f"{path} is not valid JSON ({exc}); rebuild with `freedit build --force`") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise StalePlanError(f"{path} has manifest format {got!r}, this freedit writes {FORMAT}")
        problems = [f"{key} is missing or not {getattr(kind, '__name__', 'a string')}"
                    for key, kind in _fields(SCHEMA, data)]
        if problems:
            raise StalePlanError(f"{path} is not a complete manifest ({'; '.join(problems[:4])}); rebuild with "
                                 f"`freedit build --force`")
        return cls(data)

    def write(self, plan_path: Path) -> None:
        path = manifest_path(plan_path)
        write_atomically(path, json.dumps(self.data, indent=1))

    def reasons_stale(self, plan_path: Path, onnx_sha: str, builder: str, version: str,
                      settings: dict | None = None, device_cc: str | None = None,
                      plan_sha: str | None = None) -> list[str]:
        """Why this plan must not be used now ([] = it may). ``settings`` only when building; ``plan_sha``
        when the caller has already hashed the plan."""
        d, reasons = self.data, []
        plan = d["plan"]
        if not plan_path.is_file() or plan_path.stat().st_size != plan["bytes"] or \
                (plan_sha or sha256_files([plan_path])) != plan["sha256"]:
            reasons.append(f"{plan_path.name} is missing or not the plan its manifest describes (replaced by a foreign plan?)")
        if d["onnx"]["sha256"] != onnx_sha:
            reasons.append(f"{d['onnx']['file']} changed since the plan was built")
        if (d["builder"]["kind"], d["builder"]["version"]) != (builder, version):
            reasons.append(f"built by {d['builder']['kind']} {d['builder']['version']}, installed is {builder} {version}")
        if settings is not None and d["settings"] != settings:
            changed = sorted(k for k in set(settings) | set(d["settings"]) if settings.get(k) != d["settings"].get(k))
            reasons.append("build settings changed: " + ", ".join(
                f"{k} {d['settings'].get(k)} -> {settings.get(k)}" for k in changed))
        if device_cc is not None and d["targets"] and device_cc not in d["targets"]:
            reasons.append(f"built for compute capabilities {', '.join(d['targets'])}, this GPU is {device_cc}")
        return reasons
