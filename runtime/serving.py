"""freedit as a Ray Serve application: POST /generate, GET /health, GET /stats, OpenAPI at /docs.

Each replica owns one Pipeline. Requests that reach a replica together are collected by
``@serve.batch`` and merged into as few ``Pipeline.generate`` calls as exactness allows. Noise is
keyed by (seed, sample index, step, purpose), so a sample depends only on its seed, its index and
its label, never on its neighbours. Hence:

- a request with a seed keeps indices 0..n-1 and may share a call with requests of the same seed
  and settings whose labels agree on the indices they share (identical requests, prefixes);
- a request without a seed gets a fresh secret seed of its own (``secrets``), returned in the
  response, and a call of its own: it never shares noise keys with another request, so no client
  can predict or reproduce another's "random" images.

Hardening: request bodies are capped before they are parsed, JSON with duplicate keys is refused,
types are strict (``"1.5"`` or ``true`` is not a number), ``/generate`` takes an optional bearer
token, and neither ``/health`` nor any answer shows the model's filesystem path (a name and a
checksum instead). Every error the application answers is a JSON envelope; docs/SERVING.md lists
the few that Ray's proxy answers itself.

Run it with ``freedit serve`` (see docs/SERVING.md), or ``serve run freedit.runtime.serving:build_app``.
"""
# No `from __future__ import annotations`: FastAPI must see GenerateRequest itself, not a string, once
# serve.ingress has rebound the methods.
import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException

from freedit.runtime.images import png_bytes
from freedit.runtime.limits import MAX_CFG_SCALE, MAX_RELAX, MAX_WINDOW
from freedit.runtime.outputs import json_safe
from freedit.runtime.contract import DRAFT_GUIDANCE, RELAX_SCORES, VERIFIERS
from freedit.runtime.pipeline import (SAMPLERS, SPECULATIVE, draft_guidance_applies, resolve_verifier,
                                      speculative_summary)
from freedit.runtime.schedule import NUM_TRAIN_TIMESTEPS, Schedule

import ray
from ray import serve

APP_NAME = "freedit"
#: Hard ceilings of the request schema; the configured limits (ServeConfig) sit below them.
MAX_LABELS_SCHEMA = 1024
MAX_CLASS_LABEL = 1_000_000


#: Default cap of a /generate body: 1024 labels of 7 digits and every other field fit in 16 KiB.
MAX_BODY_BYTES = 64 * 1024


class GenerateRequest(BaseModel):
    """Body of POST /generate. Omitted settings take the model's defaults (pipeline.json).

    Strict: numbers must be JSON numbers (not strings, not booleans), integers must be integers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    class_labels: list[Annotated[StrictInt, Field(ge=0, le=MAX_CLASS_LABEL)]] = Field(
        min_length=1, max_length=MAX_LABELS_SCHEMA, description="one image per label; at most max_images (server limit)")
    sampler: Optional[Literal[SAMPLERS]] = Field(None, description="default: free when the model has a drafter")
    steps: Optional[StrictInt] = Field(None, ge=1, le=NUM_TRAIN_TIMESTEPS,
                                       description="at most max_steps (server limit)")
    cfg_scale: Optional[float] = Field(None, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False, description="1 = no guidance")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63,
                                      description="omit to let the server pick one (and batch freely)")
    window: Optional[StrictInt] = Field(None, ge=1, le=MAX_WINDOW, description="FREE's draft window L")
    relax: Optional[float] = Field(None, ge=0, le=MAX_RELAX, allow_inf_nan=False, description="free-relax lambda")
    relax_score: Optional[Literal[RELAX_SCORES]] = Field(None, description="what free-relax tempers by (DESIGN §3.4)")
    verifier: Optional[Literal[VERIFIERS]] = Field(None, description="step or block verification of FREE's window "
                                                   "(DESIGN §3.3.1)")
    draft_guidance: Optional[Literal[DRAFT_GUIDANCE]] = Field(
        None, description="guided FREE: parent (draft the conditional row, take the guidance gap from the last "
        "verified state) or drafter (draft both rows); default: the model's (DESIGN §3.1)")
    format: Literal["base64", "multipart"] = Field("base64",
                                                   description="PNGs as base64 in JSON, or multipart/mixed parts")


class ServeConfig(BaseModel):
    """Everything `freedit serve` and `serve run freedit.runtime.serving:build_app key=value` accept."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="model directory (default: the bundled digits DiT)")
    backend: str = "onnxruntime"
    threads: Optional[int] = Field(None, ge=1, description="CPU threads per replica (ONNX Runtime / torch)")
    batch_size: Optional[int] = Field(None, ge=1, description="samples in flight per DiT call (default: the model's)")
    num_replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(1.0, ge=0)
    max_images: int = Field(64, ge=1, le=MAX_LABELS_SCHEMA, description="images per request")
    max_steps: int = Field(250, ge=1, le=NUM_TRAIN_TIMESTEPS, description="sampling steps per request")
    max_batch_size: int = Field(16, ge=1, description="requests merged by @serve.batch")
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=10)
    max_ongoing_requests: int = Field(32, ge=1, description="per replica, batch queue included")
    max_queued_requests: int = Field(64, ge=-1, description="waiting per caller (proxy) before 503; -1 = unbounded")
    graceful_shutdown_timeout_s: float = Field(120.0, ge=0, description="how long a stopping replica finishes its work")
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, le=64 * 2**20, description="largest /generate body (413 above)")
    token_sha256: Optional[str] = Field(None, pattern="^[0-9a-f]{64}$",
                                        description="sha256 of the bearer token /generate requires (none: open)")


def token_digest(token: str) -> str:
    """What ServeConfig.token_sha256 holds: replicas keep the digest, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class ServeError(HTTPException):
    """An HTTP error answered as {"error": message}."""


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


app = FastAPI(title="freedit", version="1", description="Class-conditional DiT sampling with FREE speculative sampling.")


def _invalid(errors: list[dict], drop_loc: int = 0) -> JSONResponse:
    # One readable line ("class_labels.0: Input should be ..."), plus where and what, without echoing the input.
    problems = [_problem(e, drop_loc) for e in errors]
    line = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems[:5])
    return _error(422, f"invalid request: {line}", problems=problems[:20])


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _invalid(exc.errors(), drop_loc=1)  # FastAPI's loc starts with "body" / "query"


def _problem(e: dict, drop_loc: int = 0) -> dict:
    if e["type"] == "json_invalid":  # pydantic's loc is empty, FastAPI's is (body, character offset)
        return {"loc": ["body"], "msg": f"invalid JSON ({e.get('ctx', {}).get('error', e['msg'])})", "type": e["type"]}
    return {"loc": [str(p) for p in e["loc"][drop_loc:]] or ["body"], "msg": e["msg"], "type": e["type"]}


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything the handlers did not expect is still a JSON envelope, without the traceback."""
    return _error(500, f"internal error: {type(exc).__name__}")


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ServeError(422, f"invalid request: duplicate key(s) {duplicated} in a JSON object; each field once")
    return dict(pairs)


async def read_request(request: Request, max_bytes: int) -> GenerateRequest:
    """The body of /generate: JSON, at most ``max_bytes`` (refused before it is read in full), no duplicate
    keys, then GenerateRequest's strict validation. Every refusal is a ServeError or a 422 JSONResponse."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ServeError(415, f"the body must be application/json, got {kind!r}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise ServeError(413, f"request body of {declared} bytes; at most {max_bytes:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ServeError(413, f"request body over {max_bytes:,} bytes")
    try:
        json.loads(body, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ServeError(422, "invalid request: JSON nested too deeply") from None
    except ValueError:
        pass  # not JSON at all: pydantic's parser below says where
    return GenerateRequest.model_validate_json(bytes(body))


def model_identity(model_dir: str | Path) -> dict:
    """What /health and responses show instead of a path: the folder's name and a sha256 over its graph
    files (dit.onnx, drafter.onnx and their external data files, name and content)."""
    folder = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.split(".onnx")[0] in ("dit", "drafter")
                   and (p.name.endswith(".onnx") or ".onnx." in p.name) and not p.name.endswith(".tmp"))
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return {"name": folder.name, "sha256": h.hexdigest(), "files": [p.name for p in files]}


@dataclass
class _Job:
    """One validated request waiting for its batch."""

    labels: list[int]
    seed: Optional[int]
    settings: dict  # sampler, steps, cfg_scale, window, relax (+ relax_score, verifier, draft_guidance): resolved,
    # so equal means "same call"

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.settings.items()))


@dataclass
class _Call:
    """One Pipeline.generate call serving several jobs: job index -> first sample index."""

    key: tuple
    settings: dict
    seed: int
    labels: list[int]
    members: dict[int, int] = field(default_factory=dict)

    secret: bool = False  # a seedless request's own call: nobody else may join it

    def admit(self, i: int, job: _Job) -> bool:
        if job.key != self.key or job.seed is None or self.secret:
            return False
        if job.seed == self.seed and all(a == b for a, b in zip(self.labels, job.labels)):
            self.members[i] = 0  # same indices as alone; only the tail is new
            self.labels += job.labels[len(self.labels):]
            return True
        return False


def plan_calls(jobs: list[_Job]) -> list[_Call]:
    """Merge jobs into generate calls; each job gets exactly Pipeline.generate's images at its seed and indices.

    Seeded jobs share calls where exactness allows. A seedless job gets a fresh secret seed and a call of
    its own, so its noise keys (seed, index, step) are never another request's."""
    calls: list[_Call] = []
    for i, job in enumerate(jobs):
        if job.seed is None:
            calls.append(_Call(job.key, job.settings, secrets.randbelow(2**63), list(job.labels), {i: 0}, secret=True))
        elif not any(call.admit(i, job) for call in calls):
            calls.append(_Call(job.key, job.settings, job.seed, list(job.labels), {i: 0}))
    return calls


def multipart(meta: dict, pngs: list[bytes]) -> Response:
    """multipart/mixed: the JSON metadata first, then one image/png part per image, in request order."""
    boundary = f"freedit-{secrets.token_hex(12)}"
    parts = [(b"Content-Type: application/json", json.dumps(meta, allow_nan=False).encode())]
    parts += [(f"Content-Type: image/png\r\nContent-ID: <image-{i}>".encode(), png) for i, png in enumerate(pngs)]
    body = b"".join(b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), head, data) for head, data in parts)
    return Response(body + b"--%s--\r\n" % boundary.encode(), media_type=f"multipart/mixed; boundary={boundary}")


POLL_S = 0.2  # how often replicas read the drain switch and report their in-flight requests


@ray.remote(num_cpus=0)
class DrainSwitch:
    """An application's drain switch. Replicas poll it and report what they hold, so stop() knows when to delete."""

    def __init__(self):
        self.draining, self.reports = False, {}

    def set(self, draining: bool) -> None:
        self.draining, self.reports = draining, {}

    def poll(self, replica: str, in_flight: int) -> bool:
        self.reports[replica] = (time.monotonic(), in_flight)
        return self.draining

    def in_flight(self) -> int:
        """Requests held by the replicas that reported lately (a dead replica's last word does not count)."""
        return sum(n for t, n in self.reports.values() if time.monotonic() - t < 5 * POLL_S)


def _drain_switch(app_name: str):
    # Named per application and detached: it must outlive whichever replica created it (a crashed one included).
    return DrainSwitch.options(name=f"freedit-drain-{app_name}", namespace="freedit", get_if_exists=True,
                               lifetime="detached").remote()


def _replica_grpc_on_loopback() -> None:
    """Ray Serve (2.60) starts an inter-deployment gRPC server in every replica on "[::]:0", every
    interface, with no setting for it. In loopback-only mode this replica gives it "127.0.0.1:0"
    instead; called from the replica's constructor, which runs before Ray starts that server."""
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "freedit_loopback", False):
        return

    def on_loopback(server, address: str):
        return original(server, "127.0.0.1:" + address[len("[::]:"):] if address.startswith("[::]:") else address)

    on_loopback.freedit_loopback = True
    replica_module.add_port_to_grpc_server = on_loopback


# Everything FreeditServer uses must be defined above it: Ray serializes the class together with the
# module globals that exist when these decorators run.
@serve.deployment
@serve.ingress(app)
class FreeditServer:
    def __init__(self, config: dict):
        from freedit.runtime.pipeline import Pipeline, default_model_dir

        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":  # a loopback-only Ray (loopback_only_ray)
            _replica_grpc_on_loopback()
        self.config = ServeConfig(**config)
        model_dir = Path(self.config.model or default_model_dir())
        self.pipe = Pipeline.from_directory(model_dir, backend=self.config.backend, threads=self.config.threads)
        self.model = model_identity(model_dir)
        self._paths = sorted({str(model_dir), str(model_dir.resolve())}, key=len, reverse=True)
        self.generate_batch.set_max_batch_size(self.config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        context = serve.get_replica_context()
        self.app_name, self.deployment, self.replica = context.app_name, context.deployment, context.replica_id
        self.switch, self.draining = _drain_switch(self.app_name), False
        self.counts: Counter = Counter()  # requests: ok, rejected, failed, refused (draining)
        self.batch_sizes: Counter = Counter()  # requests per @serve.batch batch
        self.call_sizes: Counter = Counter()  # requests per Pipeline.generate call
        self.in_flight = 0  # requests past the drain check and not yet answered
        self.watcher = asyncio.get_running_loop().create_task(self._watch_switch())  # on the replica's event loop

    async def _watch_switch(self) -> None:
        while True:
            try:
                self.draining = await self.switch.poll.remote(self.replica.to_full_id_str(), self.in_flight)
            except ray.exceptions.RayActorError:  # stop() removed it: keep the last answer, look it up again
                self.switch = _drain_switch(self.app_name)
            await asyncio.sleep(POLL_S)

    def _resolve(self, req: GenerateRequest) -> _Job:
        """Apply the model's defaults and the server's limits; check the rest with Pipeline.validate."""
        d, cfg = self.pipe.defaults, self.config
        if len(req.class_labels) > cfg.max_images:
            raise ServeError(422, f"class_labels: at most {cfg.max_images} images per request, got {len(req.class_labels)}")
        sampler = req.sampler or d["sampler"]
        cfg_scale = float(d["cfg_scale"] if req.cfg_scale is None else req.cfg_scale)
        settings = dict(sampler=sampler, steps=d["steps"] if req.steps is None else req.steps, cfg_scale=cfg_scale,
                        window=int(d["window"] if req.window is None or sampler not in SPECULATIVE else req.window),
                        relax=float(d["relax"] if req.relax is None else req.relax) if sampler == "free-relax" else 0.0)
        try:
            _, spacing = self.pipe.validate(req.class_labels, seed=req.seed or 0, batch_size=self._batch_size(), **settings)
        except ValueError as exc:
            raise ServeError(422, self._scrub(str(exc))) from None
        steps = Schedule.create(spacing).num_steps  # the model's default may be a spacing such as 'ddim50'
        if steps > cfg.max_steps:
            raise ServeError(422, f"steps: at most {cfg.max_steps} on this server, got {steps}")
        if sampler == "free-relax":
            settings["relax_score"] = req.relax_score or d["relax_score"]
        if sampler in SPECULATIVE:
            try:
                settings["verifier"] = resolve_verifier(req.verifier, d["verifier"], settings["relax"])
            except ValueError as exc:
                raise ServeError(422, f"verifier: {exc}") from None
        if draft_guidance_applies(sampler, cfg_scale):  # elsewhere it changes nothing: keep such calls batchable
            settings["draft_guidance"] = req.draft_guidance or d["draft_guidance"]
        return _Job(list(req.class_labels), req.seed, settings)

    def _batch_size(self) -> int:
        return self.config.batch_size or int(self.pipe.defaults["batch_size"])

    def _scrub(self, text: str) -> str:
        """Messages from the pipeline or a backend may name the model's folder: show its name instead."""
        for path in self._paths:
            text = text.replace(path, self.model["name"])
        return text

    def _authorize(self, request: Request) -> None:
        if self.config.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), self.config.token_sha256):
            raise ServeError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                             headers={"WWW-Authenticate": "Bearer"})

    @app.post("/generate", responses={200: {"description": "PNG images with per-sample statistics"},
                                      401: {"description": "bearer token missing or wrong (when the server has one)"},
                                      413: {"description": "body over max_body_bytes"},
                                      415: {"description": "body not application/json"},
                                      422: {"description": "invalid request"},
                                      503: {"description": "overloaded or draining"}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": GenerateRequest.model_json_schema()}}}})
    async def generate(self, request: Request):
        if self.draining:
            self.counts["refused"] += 1
            return _error(503, "server is draining: not accepting new work")
        try:
            self._authorize(request)
            try:
                req = await read_request(request, self.config.max_body_bytes)
            except ValidationError as exc:
                self.counts["rejected"] += 1
                return _invalid(exc.errors())
            job = self._resolve(req)
        except ServeError:
            self.counts["rejected"] += 1
            raise
        self.in_flight += 1
        try:
            outcome = await self.generate_batch(job)
        finally:
            self.in_flight -= 1
        if isinstance(outcome, Exception):
            self.counts["failed"] += 1
            return _error(500, self._scrub(f"generation failed: {type(outcome).__name__}: {outcome}"))
        self.counts["ok"] += 1
        meta, images = self._reply(job, *outcome)
        pngs = [png_bytes(image) for image in images]
        if req.format == "multipart":
            return multipart(meta, pngs)
        return JSONResponse({**meta, "images": [base64.b64encode(p).decode() for p in pngs]})

    def _reply(self, job: _Job, result, offset: int, batch: dict) -> tuple[dict, np.ndarray]:
        """This job's slice of a shared result, with statistics recomputed over its own samples."""
        n = len(job.labels)
        stats = result.stats[offset:offset + n]
        calls = np.array([s["target_calls"] for s in stats])
        summary = {"images": n, "mean_target_calls": float(calls.mean()),
                   "nfe_speedup": float(result.settings["num_steps"] / calls.mean()), **batch,
                   "call_images": len(result.stats), "call_seconds": result.seconds}
        if result.settings["sampler"] in SPECULATIVE:
            summary.update({k: v for k, v in speculative_summary(stats).items() if k != "acceptance_by_step"})
        settings = {**result.settings, "model": self.model["name"], "model_sha256": self.model["sha256"]}
        meta = {"seed": result.settings["seed"], "sample_indices": list(range(offset, offset + n)),
                "class_labels": job.labels, "settings": settings, "summary": summary, "samples": stats}
        return json_safe(meta), result.images[offset:offset + n]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)  # replaced in __init__ from ServeConfig
    async def generate_batch(self, jobs: list[_Job]) -> list:
        calls = plan_calls(jobs)
        self.batch_sizes[len(jobs)] += 1
        outcomes: list = [None] * len(jobs)
        for call in calls:
            self.call_sizes[len(call.members)] += 1
            try:  # in a worker thread, so the event loop keeps answering /health, /stats and refusals; one
                # batch at a time (serve.batch's max_concurrent_batches=1), so the pipeline is never entered twice
                result = await asyncio.to_thread(self.pipe.generate, call.labels, seed=call.seed,
                                                 batch_size=self._batch_size(), **call.settings)
            except Exception as exc:  # one failed call must not take the batch's other calls with it
                for i in call.members:
                    outcomes[i] = exc
                continue
            batch = {"batch_requests": len(jobs), "batch_calls": len(calls), "call_requests": len(call.members)}
            for i, offset in call.members.items():
                outcomes[i] = (result, offset, batch)
        return outcomes

    @app.get("/stats")
    async def stats(self) -> dict:
        """This replica's counters: how requests were batched and answered."""
        return {"replica": self.replica.to_full_id_str(), "requests": dict(self.counts), "in_flight": self.in_flight,
                "batches": sum(self.batch_sizes.values()), "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "generate_calls": sum(self.call_sizes.values()), "call_sizes": dict(sorted(self.call_sizes.items()))}

    @app.get("/health", responses={503: {"description": "draining"}})
    async def health(self):
        """Status of the deployment's replicas (from the Serve controller) and of the replica that answered."""
        try:
            status = await asyncio.to_thread(serve.status)
            dep = status.applications[self.app_name].deployments[self.deployment]
            deployment = {"status": str(dep.status.value), "replica_states": {str(getattr(k, "value", k)): v
                                                                               for k, v in dep.replica_states.items()},
                          "message": self._scrub(str(dep.message))}
        except Exception as exc:  # the controller is restarting: say so rather than fail the probe
            deployment = {"status": "UNKNOWN", "message": f"{type(exc).__name__}: {exc}"}
        draining = self.draining
        body = {"status": "draining" if draining else "ok", "replica": self.replica.to_full_id_str(),
                "deployment": deployment, "model": self.model, "backend": self.pipe.backend.name,
                "num_classes": self.pipe.info.num_classes, "defaults": json_safe(self.pipe.defaults),
                "limits": {"max_images": self.config.max_images, "max_steps": self.config.max_steps,
                           "max_batch_size": self.config.max_batch_size,
                           "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
                           "max_ongoing_requests": self.config.max_ongoing_requests,
                           "max_queued_requests": self.config.max_queued_requests,
                           "max_body_bytes": self.config.max_body_bytes},
                "auth": "bearer" if self.config.token_sha256 else None}
        return JSONResponse(body, status_code=503 if draining else 200)


def build_app(config: ServeConfig | dict | None = None) -> serve.Application:
    """The application; also a Ray Serve builder: ``serve run freedit.runtime.serving:build_app num_replicas=2``."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig(**(config or {}))
    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    return FreeditServer.options(
        num_replicas=cfg.num_replicas, ray_actor_options=actor, max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests, graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
    ).bind(cfg.model_dump())


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback_only_ray() -> None:
    """Make the private Ray this process starts listen on 127.0.0.1 only: GCS, raylet, object manager,
    workers, dashboard agent. This is Ray's single-machine mode (the one it uses on Windows and macOS:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes the node's address the loopback one, and Ray binds its gRPC
    servers to loopback when the node address is). Child processes inherit the variable."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by ray._private.services


def start(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          route_prefix: str = "/", request_timeout_s: float | None = None, address: str | None = None,
          ray_init: dict | None = None) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port and deploy; returns once replicas are up.

    A private Ray (no ``address``) behind a loopback HTTP host binds all its own ports to loopback too;
    with another host it listens where Ray does by default (every interface; see docs/SERVING.md)."""
    if not ray.is_initialized():
        if address is None and host in LOOPBACK_HOSTS:
            loopback_only_ray()
        ray.init(address=address, **(ray_init or {}))
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    ray.get(_drain_switch(name).set.remote(False))  # a switch left on by an earlier run must not refuse this one
    try:
        serve.run(build_app(config), name=name, route_prefix=route_prefix)
    except Exception as exc:  # a replica that cannot start: the controller holds its traceback; keep the cause
        from freedit.errors import FreeditError

        text = str(exc)
        try:
            status = serve.status().applications.get(name)
            if status is not None:
                text += "\n" + "\n".join([status.message, *(d.message for d in status.deployments.values())])
        except Exception:  # the controller itself is gone: Ray's own message is all there is
            pass
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "Error:" in line), lines[0] if lines else repr(exc))
        raise FreeditError(f"application {name!r} did not start: {cause[:300]}") from None


def drain(name: str = APP_NAME) -> None:
    """Replicas of ``name`` refuse new work (503, JSON) within POLL_S; what they hold runs to the end."""
    ray.get(_drain_switch(name).set.remote(True))


def stop(name: str = APP_NAME, timeout_s: float = 120.0) -> None:
    """Drain; once the replicas hold nothing (or after timeout_s), delete the application and its switch.

    While in-flight work finishes the routes stay up, so late arrivals get the explicit 503 rather than a 404.
    """
    switch = _drain_switch(name)
    ray.get(switch.set.remote(True))
    deadline = time.monotonic() + timeout_s
    time.sleep(3 * POLL_S)  # every live replica has seen the switch and reported what it holds since
    while ray.get(switch.in_flight.remote()) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    serve.delete(name)  # Ray's own graceful shutdown covers anything still left
    ray.kill(switch)
