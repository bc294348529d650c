"""freedit on Ray Serve (runtime/serving.py), on loopback with the bundled digits DiT and a 2-CPU Ray.

Bounded concurrent load (every answer correct or an explicit error, images equal to
Pipeline.generate alone, batching observed), fuzzed bodies (4xx, the replica survives), overload
(503 fast), a replica killed (the other serves, /health reports, Ray restarts it) and draining.
"""
from __future__ import annotations

import asyncio
import base64
import email
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
import ray  # noqa: E402
from PIL import Image  # noqa: E402

from freedit.runtime import serving  # noqa: E402
from freedit.runtime.pipeline import Pipeline  # noqa: E402

STEPS = 20  # small: the point is the serving, not the images
TIMEOUT = httpx.Timeout(120.0)  # any hang fails the test instead of blocking it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One Serve instance on loopback; the main application has one replica."""
    port = free_port()
    config = serving.ServeConfig(threads=1, cpus_per_replica=0.25, max_batch_size=16, batch_wait_timeout_s=0.1,
                                 max_ongoing_requests=32, max_queued_requests=64)
    serving.start(config, port=port, request_timeout_s=120,
                  ray_init=dict(num_cpus=2, include_dashboard=False, log_to_driver=False))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    return Pipeline.default(threads=1)


def decode(b64: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in b64])


def check_against_reference(reference, replies: list[dict]) -> None:
    """Each reply's images = Pipeline.generate(...) at its seed and sample indices (few reference calls)."""
    groups: list[tuple[int, dict[int, int], list[dict]]] = []  # seed, sample index -> label, replies
    for r in replies:
        mine = dict(zip(r["sample_indices"], r["class_labels"]))
        group = next((g for g in groups if g[0] == r["seed"] and all(g[1].get(i, y) == y for i, y in mine.items())),
                     None) or groups.append((r["seed"], {}, [])) or groups[-1]
        group[1].update(mine)
        group[2].append(r)
    for seed, placed, members in groups:
        labels = [placed.get(i, 0) for i in range(max(placed) + 1)]  # gaps: any label, samples are independent
        images = reference.generate(labels, steps=STEPS, seed=seed).images
        for r in members:
            np.testing.assert_array_equal(decode(r["images"]), images[r["sample_indices"]])


async def post_all(url: str, bodies: list, path: str = "/generate") -> list[tuple[int, dict | str, float]]:
    async def one(client, body):
        t0 = time.perf_counter()
        r = await client.post(path, json=body)
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        return r.status_code, payload, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        return await asyncio.gather(*(one(client, b) for b in bodies))


def load_bodies(n: int = 64) -> list[dict]:
    """Distinct seeds, a family of one seed with prefix labels (mergeable), and unseeded requests (packed)."""
    bodies = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            body = {"class_labels": [(3 * i + k) % 10 for k in range(1 + i % 3)]}
        elif kind == 1:
            body = {"class_labels": [4, 2, 7][: 1 + i % 3], "seed": 7}
        else:
            body = {"class_labels": [(i + k) % 10 for k in range(1 + i % 3)], "seed": 1000 + i}
        bodies.append({**body, "steps": STEPS})
    return bodies


def test_concurrent_load_is_exact_and_batched(server, reference):
    t0 = time.perf_counter()
    replies = asyncio.run(post_all(server, load_bodies(64)))
    elapsed = time.perf_counter() - t0
    bad = [(status, body) for status, body, _ in replies if status != 200]
    assert not bad, bad[:3]
    results = [body for _, body, _ in replies]
    for body, r in zip(load_bodies(64), results):
        assert r["class_labels"] == body["class_labels"] and len(r["images"]) == len(body["class_labels"])
        if "seed" in body:  # a seeded request keeps its own sample indices: it equals the request made alone
            assert r["seed"] == body["seed"] and r["sample_indices"] == list(range(len(body["class_labels"])))
        assert [s["label"] for s in r["samples"]] == body["class_labels"]
        assert r["summary"]["images"] == len(body["class_labels"]) and r["settings"]["num_steps"] == STEPS
    check_against_reference(reference, results)
    # Batching: @serve.batch gathered several requests, and some generate call served several of them.
    assert max(r["summary"]["batch_requests"] for r in results) > 1
    assert max(r["summary"]["call_requests"] for r in results) > 1
    stats = httpx.get(f"{server}/stats", timeout=TIMEOUT).json()
    assert max(map(int, stats["batch_sizes"])) > 1 and stats["generate_calls"] < stats["requests"]["ok"]
    print(f"64 requests in {elapsed:.1f} s; batches {stats['batch_sizes']}, requests per call {stats['call_sizes']}")


def test_multipart_equals_base64(server):
    body = {"class_labels": [0, 5, 9], "steps": STEPS, "seed": 3}
    as_json = httpx.post(f"{server}/generate", json=body, timeout=TIMEOUT).json()
    r = httpx.post(f"{server}/generate", json={**body, "format": "multipart"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/mixed; boundary=")
    message = email.message_from_bytes(b"Content-Type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content)
    meta, *pngs = message.get_payload()
    assert meta.get_content_type() == "application/json" and [p.get_content_type() for p in pngs] == ["image/png"] * 3
    meta = json.loads(meta.get_payload(decode=True))
    assert meta["sample_indices"] == as_json["sample_indices"] == [0, 1, 2] and meta["class_labels"] == [0, 5, 9]
    assert [s["decisions"] for s in meta["samples"]] == [s["decisions"] for s in as_json["samples"]]
    images = np.stack([np.asarray(Image.open(io.BytesIO(p.get_payload(decode=True)))) for p in pngs])
    np.testing.assert_array_equal(images, decode(as_json["images"]))


def test_openapi_describes_the_bounded_request(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=TIMEOUT).json()
    assert {"/generate", "/health", "/stats"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["GenerateRequest"]
    assert schema["additionalProperties"] is False and schema["required"] == ["class_labels"]
    assert schema["properties"]["class_labels"]["maxItems"] == serving.MAX_LABELS_SCHEMA
    assert schema["properties"]["steps"]["anyOf"][0]["maximum"] == 1000
    assert httpx.get(f"{server}/docs", timeout=TIMEOUT).status_code == 200


FUZZ = [
    b"", b"not json", b"[]", b"null", b"42", b'{"class_labels": [1', b"[" * 100_000,
    b'{"class_labels": [' + b"9" * 5000 + b"]}",
    b'{"class_labels": [1], "cfg_scale": Infinity}', b'{"class_labels": [1], "relax": NaN}',
    {}, {"class_labels": []}, {"class_labels": "3"}, {"class_labels": [1.5]}, {"class_labels": [True]},
    {"class_labels": [-1]}, {"class_labels": [10]}, {"class_labels": [10**30]}, {"class_labels": [1] * 65},
    {"class_labels": [1] * 100_000}, {"class_labels": [1], "steps": 10**9}, {"class_labels": [1], "steps": 251},
    {"class_labels": [1], "steps": 0}, {"class_labels": [1], "steps": "20"}, {"class_labels": [1], "seed": -1},
    {"class_labels": [1], "seed": 2**70}, {"class_labels": [1], "cfg_scale": -1}, {"class_labels": [1], "window": 0},
    {"class_labels": [1], "sampler": "magic"}, {"class_labels": [1], "format": "gif"}, {"class_labels": [1], "bogus": 1},
    {"class_labels": [1], "batch_size": 4}, {"labels": [1]},
]


def test_fuzzed_bodies_get_4xx_and_the_replica_survives(server):
    before = httpx.get(f"{server}/health", timeout=TIMEOUT).json()["replica"]
    with httpx.Client(base_url=server, timeout=TIMEOUT) as client:
        for body in FUZZ:
            if isinstance(body, bytes):
                r = client.post("/generate", content=body, headers={"content-type": "application/json"})
            else:
                r = client.post("/generate", json=body)
            assert 400 <= r.status_code < 500, (body if len(str(body)) < 200 else str(body)[:200], r.status_code, r.text)
            assert r.json()["error"], r.text  # always a JSON error that says what is wrong
        r = client.post("/generate", content=b'{"class_labels": [1]}', headers={"content-type": "text/plain"})
        assert 400 <= r.status_code < 500
        assert client.get("/generate").status_code == 405
        assert "at most 64 images" in client.post("/generate", json={"class_labels": [1] * 65}).json()["error"]
        assert "unknown class label" in client.post("/generate", json={"class_labels": [10]}).json()["error"]
        ok = client.post("/generate", json={"class_labels": [2], "steps": STEPS, "seed": 1})
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1
        health = client.get("/health").json()
    assert health["replica"] == before and health["status"] == "ok"  # the same replica, never restarted
    assert health["deployment"]["status"] == "HEALTHY"


def test_overload_gets_503_quickly(server):
    # A second application with room for one request running and one waiting.
    tiny = serving.ServeConfig(threads=1, cpus_per_replica=0.25, max_batch_size=1, max_ongoing_requests=1,
                               max_queued_requests=1)
    serve.run(serving.build_app(tiny), name="tiny", route_prefix="/tiny")
    try:
        bodies = [{"class_labels": [1, 2, 3, 4], "steps": 100, "seed": i} for i in range(12)]
        replies = asyncio.run(post_all(server, bodies, "/tiny/generate"))
        codes = sorted(status for status, _, _ in replies)
        assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 6, codes
        slowest_ok = max(t for status, _, t in replies if status == 200)
        assert all(t < slowest_ok / 2 for status, _, t in replies if status == 503)  # refused, not queued
    finally:
        serve.delete("tiny")


def recovered(deployment: dict) -> bool:
    return deployment["status"] == "HEALTHY" and deployment["replica_states"] == {"RUNNING": 2}


def test_a_killed_replica_is_survived_and_reported(server):
    serve.run(serving.build_app(serving.ServeConfig(threads=1, cpus_per_replica=0.25, num_replicas=2)),
              name="pair", route_prefix="/pair")
    try:
        with httpx.Client(base_url=f"{server}/pair", timeout=TIMEOUT) as client:
            victim = client.get("/health").json()["replica"]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            body = {"class_labels": [6], "steps": STEPS, "seed": 11}
            codes, seen, deadline = [], [], time.monotonic() + 90
            while time.monotonic() < deadline:
                r = client.post("/generate", json=body)
                codes.append(r.status_code)
                assert r.status_code == 200 or r.status_code >= 500, r.text  # served, or an explicit error
                health = client.get("/health")
                assert health.status_code == 200 or health.status_code >= 500, health.text
                if health.status_code == 200:
                    seen.append(health.json()["deployment"])
                    if recovered(seen[-1]) and not all(map(recovered, seen)) and codes[-1] == 200:
                        break  # it was reported short of a replica, and is whole again
                time.sleep(0.2)
            assert codes.count(200) >= 1 and codes[-1] == 200, codes
            # The survivor kept answering /health while the other was replaced, and said it was short of one.
            assert not all(map(recovered, seen)), seen
            assert recovered(seen[-1]), seen[-1]  # Ray restarted it
            print(f"after the kill: answers {sorted(set(codes))} over {len(codes)} requests, deployment states seen "
                  f"{[d['replica_states'] for d in seen if not recovered(d)][:3]}...")
            names = {client.get("/health").json()["replica"] for _ in range(10)}
            assert victim not in names
    finally:
        serve.delete("pair")


def test_stop_drains_refuses_new_work_and_finishes_old(server):
    serve.run(serving.build_app(serving.ServeConfig(threads=1, cpus_per_replica=0.25)), name="drain",
              route_prefix="/drain")
    url, slow = f"{server}/drain", {}

    def run_slow():
        slow["reply"] = httpx.post(f"{url}/generate", json={"class_labels": list(range(10)) * 2, "steps": 100,
                                                            "seed": 5}, timeout=TIMEOUT)

    worker = threading.Thread(target=run_slow)
    worker.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/stats", timeout=TIMEOUT).json()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopper = threading.Thread(target=serving.stop, args=("drain",))
    stopper.start()
    time.sleep(4 * serving.POLL_S)  # the replica has seen the switch
    r = httpx.post(f"{url}/generate", json={"class_labels": [1], "steps": STEPS}, timeout=TIMEOUT)
    assert r.status_code == 503 and "draining" in r.json()["error"]
    health = httpx.get(f"{url}/health", timeout=TIMEOUT)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert stopper.is_alive()  # stop() waits for the work in hand ...
    worker.join(120)
    stopper.join(120)
    assert slow["reply"].status_code == 200 and len(slow["reply"].json()["images"]) == 20  # ... which finished
    assert not stopper.is_alive() and "drain" not in serve.status().applications
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).json()["status"] == "ok"  # other applications untouched


def test_cli_rejects_bad_settings_in_one_line(capsys):
    from freedit.cli import main

    assert main(["serve", "--replicas", "0"]) == 2
    assert main(["serve", "--max-images", "5000"]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("freedit serve: error: ") for e in errors), errors
    assert "--replicas" in errors[0] and "--max-images" in errors[1] and "cannot listen" in errors[2]


def test_plan_merges_only_what_stays_exact():
    free, ddim = {"sampler": "free"}, {"sampler": "ddim"}
    jobs = [serving._Job([1, 2], 7, free), serving._Job([1], 7, free), serving._Job([3], None, free),
            serving._Job([1, 2, 3], 7, free), serving._Job([1, 2, 5], 7, free), serving._Job([4], None, ddim),
            serving._Job([1], 8, free)]
    calls = serving.plan_calls(jobs)
    # seed 7: the prefix [1] and the unseeded [3] (at index 2) share a call with [1, 2, 3]; [1, 2, 5] conflicts at 2.
    assert [(c.seed, c.labels, c.members) for c in calls[:2]] == [(7, [1, 2, 3], {0: 0, 1: 0, 2: 2, 3: 0}),
                                                                  (7, [1, 2, 5], {4: 0})]
    assert calls[2].labels == [4] and calls[2].settings == ddim  # other settings, other call
    assert (calls[3].seed, calls[3].members) == (8, {6: 0})
