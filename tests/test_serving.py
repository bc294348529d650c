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
import os
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


async def post_all(url: str, bodies: list, path: str = "/generate",
                   timeout: httpx.Timeout = TIMEOUT) -> list[tuple[int, dict | str, float]]:
    async def one(client, body):
        t0 = time.perf_counter()
        r = await client.post(path, json=body)
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        return r.status_code, payload, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
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
    body = spec["paths"]["/generate"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] is True and schema["title"] == "GenerateRequest"
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


def test_cli_rejects_bad_settings_in_one_line(capsys, tmp_path, bundled_dir):
    import shutil

    from freedit.cli import main

    assert main(["serve", "--replicas", "0"]) == 2
    assert main(["serve", "--max-images", "5000"]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    truncated = tmp_path / "truncated"  # issue 15: a replica's 193-line traceback before
    truncated.mkdir()
    data = (bundled_dir / "dit.onnx").read_bytes()
    (truncated / "dit.onnx").write_bytes(data[: len(data) // 2])
    shutil.copy(bundled_dir / "pipeline.json", truncated / "pipeline.json")
    assert main(["serve", "--model", str(truncated)]) == 2
    (tmp_path / "short.token").write_text("abc\n")
    assert main(["serve", "--token-file", str(tmp_path / "short.token")]) == 2
    assert main(["serve", "--max-body-bytes", "10"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 6 and all(e.startswith("freedit serve: error: ") for e in errors), errors
    assert "--replicas" in errors[0] and "--max-images" in errors[1] and "cannot listen" in errors[2]
    assert "not a loadable ONNX model" in errors[3] and "at least 16 ASCII characters" in errors[4]
    assert "--max-body-bytes" in errors[5]
    with pytest.raises(SystemExit) as exit_code:  # argparse: one line too, exit 2
        main(["serve", "--port", "99999"])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "value must be an integer >= 1 and <= 65,535, got 99999" in err[0]


def test_plan_merges_only_what_stays_exact():
    free, ddim = {"sampler": "free"}, {"sampler": "ddim"}
    jobs = [serving._Job([1, 2], 7, free), serving._Job([1], 7, free), serving._Job([3], None, free),
            serving._Job([1, 2, 3], 7, free), serving._Job([1, 2, 5], 7, free), serving._Job([4], None, ddim),
            serving._Job([1], 8, free), serving._Job([3], None, free)]
    calls = serving.plan_calls(jobs)
    seeded = [(c.seed, c.labels, c.members) for c in calls if not c.secret]
    # seed 7: the prefix [1] shares a call with [1, 2, 3]; [1, 2, 5] conflicts at index 2; seed 8 alone.
    assert seeded == [(7, [1, 2, 3], {0: 0, 1: 0, 3: 0}), (7, [1, 2, 5], {4: 0}), (8, [1], {6: 0})]
    # Every seedless job has a call of its own, at indices 0.., with its own secret seed.
    secret = [c for c in calls if c.secret]
    assert [(c.labels, c.members) for c in secret] == [([3], {2: 0}), ([4], {5: 0}), ([3], {7: 0})]
    assert secret[1].settings == ddim and len({c.seed for c in secret}) == 3
    assert not any(c.seed in (7, 8) for c in secret)


# -- issue 15: hardening ------------------------------------------------------------------------------

def test_seedless_requests_get_secret_seeds_of_their_own(server, reference):
    """16 identical seedless requests and 16 seeded ones, concurrently: every seedless answer has its own
    seed and its own images (never another request's noise), the seeded ones stay exact and batched."""
    seedless = [{"class_labels": [3, 8], "steps": STEPS} for _ in range(16)]
    seeded = [{"class_labels": [3, 8], "steps": STEPS, "seed": 7} for _ in range(16)]
    bodies = [b for pair in zip(seedless, seeded) for b in pair]
    replies = asyncio.run(post_all(server, bodies))
    assert all(status == 200 for status, _, _ in replies), [r[:2] for r in replies if r[0] != 200][:3]
    free = [body for (_, body, _), sent in zip(replies, bodies) if "seed" not in sent]
    fixed = [body for (_, body, _), sent in zip(replies, bodies) if "seed" in sent]
    assert len({r["seed"] for r in free}) == 16 and 7 not in {r["seed"] for r in free}
    assert all(r["sample_indices"] == [0, 1] and r["summary"]["call_requests"] == 1 for r in free)
    images = [decode(r["images"]).tobytes() for r in free]
    assert len(set(images)) == 16, "two seedless requests got the same images"
    seeded_images = decode(fixed[0]["images"]).tobytes()
    assert all(decode(r["images"]).tobytes() == seeded_images for r in fixed) and seeded_images not in images
    check_against_reference(reference, free[:2] + fixed[:1])  # the returned seed reproduces the images


STRICT = [
    ({"class_labels": [1], "cfg_scale": "1.5"}, "cfg_scale"), ({"class_labels": [1], "cfg_scale": True}, "cfg_scale"),
    ({"class_labels": [1], "relax": "2"}, "relax"), ({"class_labels": [1], "window": True}, "window"),
    ({"class_labels": [1], "steps": 20.0}, "steps"), ({"class_labels": [1], "cfg_scale": 100.5}, "cfg_scale"),
    ({"class_labels": [1], "seed": "3"}, "seed"), ({"class_labels": ["1"]}, "class_labels"),
]


def test_verifier_and_relax_score_reach_the_pipeline(server, reference):
    """Block verification and the relax score are request settings like the others; block beside
    relax is refused with 422 before any sampling."""
    body = {"class_labels": [3, 8], "steps": STEPS, "seed": 4, "verifier": "block"}
    relax = {"class_labels": [5], "steps": STEPS, "seed": 4, "sampler": "free-relax", "relax": 4.0,
             "relax_score": "variance"}
    bad = {**relax, "verifier": "block"}
    (s1, block, _), (s2, relaxed, _), (s3, refused, _) = asyncio.run(post_all(server, [body, relax, bad]))
    assert (s1, s2, s3) == (200, 200, 422), (block, relaxed, refused)
    assert block["settings"]["verifier"] == "block" and relaxed["settings"]["relax_score"] == "variance"
    np.testing.assert_array_equal(decode(block["images"]),
                                  reference.generate([3, 8], steps=STEPS, seed=4, verifier="block").images)
    assert "verifier" in refused["error"] and "exact-only" in refused["error"]


def test_draft_guidance_reaches_the_pipeline(server, reference):
    """Guided FREE's draft rule is a request setting; where it changes nothing (no guidance, no drafter)
    it is left out of the settings, so such calls still batch with the rest; an unknown rule is a 422."""
    both = {"class_labels": [2, 7], "steps": STEPS, "seed": 5, "cfg_scale": 3.0, "draft_guidance": "drafter"}
    default = {**both, "draft_guidance": None}
    unguided = {**both, "cfg_scale": 1.0}
    bad = {**both, "draft_guidance": "null-row"}
    (s1, a, _), (s2, b, _), (s3, c, _), (s4, d, _) = asyncio.run(post_all(server, [both, default, unguided, bad]))
    assert (s1, s2, s3, s4) == (200, 200, 200, 422), (a, b, c, d)
    assert a["settings"]["draft_guidance"] == "drafter" and b["settings"]["draft_guidance"] == "parent"
    assert "draft_guidance" not in c["settings"] and "draft_guidance" in d["error"]
    for got, rule in ((a, "drafter"), (b, "parent")):
        np.testing.assert_array_equal(decode(got["images"]), reference.generate(
            [2, 7], steps=STEPS, seed=5, cfg_scale=3.0, draft_guidance=rule).images)
    assert not np.array_equal(decode(a["images"]), decode(b["images"]))  # the rule really changed the call


def test_serve_load_asks_for_its_rules_and_records_what_was_applied(server):
    """benchmarks/serve_load.py's --verifier / --draft-guidance go into every request; the records take the
    verifier and NFE speed-up off the server's answers, so a report names what the server really ran."""
    import random

    from freedit.benchmarks import serve_load

    rows = {}
    for verifier in ("step", None):  # None: the server's default (block for the bundled model)
        bodies = serve_load.make_bodies(3, "seeded", STEPS, (1, 2), random.Random(0),
                                        {"verifier": verifier, "draft_guidance": "drafter" if verifier else None})
        assert all(b.get("verifier") == verifier for b in bodies) and all(("verifier" in b) == bool(verifier)
                                                                          for b in bodies)
        records, wall = asyncio.run(serve_load.drive(server, bodies, 2, 120.0))
        assert all(r["status"] == 200 for r in records), records
        rows[verifier] = serve_load.summarize(records, wall, "seeded", 2)
        assert all(r["nfe_speedup"] > 1 for r in records)
        assert all(r.get("draft_guidance") == ("drafter" if verifier else "parent") for r in records)
    assert rows["step"]["verifiers"] == ["step"] and rows[None]["verifiers"] == ["block"]
    assert rows["step"]["mean_nfe_speedup"] > 1


def test_strict_types_duplicate_keys_and_content_type(server):
    with httpx.Client(base_url=server, timeout=TIMEOUT) as client:
        for body, field in STRICT:
            r = client.post("/generate", json=body)
            assert r.status_code == 422 and field in r.json()["error"], (body, r.status_code, r.text)
        dup = b'{"class_labels": [1], "seed": 1, "seed": 2}'
        r = client.post("/generate", content=dup, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "duplicate key(s) ['seed']" in r.json()["error"], r.text
        nested = b'{"class_labels": [1], "format": {"a": {"b": 1}, "a": 2}}'
        r = client.post("/generate", content=nested, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "duplicate key(s) ['a']" in r.json()["error"], r.text
        r = client.post("/generate", content=b'{"class_labels": [1]}', headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["status"] == 415


def test_body_cap_refuses_before_parsing(server):
    with httpx.Client(base_url=server, timeout=TIMEOUT) as client:
        big = b'{"class_labels": [1], "pad": "' + b"x" * (50 * 2**20) + b'"}'  # the issue's 50 MB body
        r = client.post("/generate", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "at most 65,536 bytes" in r.json()["error"], r.text[:200]

        def chunks():  # no Content-Length: counted while it streams
            yield b'{"class_labels": [1], "pad": "'
            for _ in range(40):
                yield b"y" * 4096
            yield b'"}'

        r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"].startswith("request body"), r.text[:200]
        ok = client.post("/generate", json={"class_labels": [4], "steps": STEPS, "seed": 2})
        assert ok.status_code == 200


def test_health_and_answers_name_the_model_not_its_path(server, bundled_dir):
    from freedit.runtime.serving import model_identity

    with httpx.Client(base_url=server, timeout=TIMEOUT) as client:
        health = client.get("/health").text
        reply = client.post("/generate", json={"class_labels": [1], "steps": STEPS, "seed": 4}).json()
        bad = client.post("/generate", json={"class_labels": [1], "sampler": "sequential", "steps": 5000}).text
    for text in (health, json.dumps({k: v for k, v in reply.items() if k != "images"}), bad):
        assert str(bundled_dir) not in text and str(bundled_dir.resolve()) not in text
    identity = model_identity(bundled_dir)
    assert json.loads(health)["model"] == identity and identity["name"] == "digits"
    assert identity["files"] == ["dit.onnx", "drafter.onnx"] and len(identity["sha256"]) == 64
    assert reply["settings"]["model"] == "digits" and reply["settings"]["model_sha256"] == identity["sha256"]


def test_errors_the_application_answers_are_json(server):
    with httpx.Client(base_url=server, timeout=TIMEOUT) as client:
        for method, path, code in (("GET", "/nowhere", 404), ("GET", "/generate", 405), ("DELETE", "/health", 405)):
            r = client.request(method, path)
            assert r.status_code == code and r.json() == {"error": r.json()["error"], "status": code}, r.text


def test_bearer_token_guards_generate_only(server):
    token = "s3cret-token-for-the-test"
    config = serving.ServeConfig(threads=1, cpus_per_replica=0.25, token_sha256=serving.token_digest(token))
    serve.run(serving.build_app(config), name="auth", route_prefix="/auth")
    body = {"class_labels": [5], "steps": STEPS, "seed": 9}
    try:
        with httpx.Client(base_url=f"{server}/auth", timeout=TIMEOUT) as client:
            for headers in ({}, {"authorization": "Bearer wrong-token-xxxxxxxx"}, {"authorization": token}):
                r = client.post("/generate", json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
                assert "bearer token" in r.json()["error"]
            r = client.post("/generate", json=body, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200 and len(r.json()["images"]) == 1
            health = client.get("/health").json()
            assert health["auth"] == "bearer" and token not in json.dumps(health)
    finally:
        serve.delete("auth")


def test_200_concurrent_requests_report(server):
    """200 requests at once against a replica that holds 32 and queues 64: every answer is 200 or 503,
    the 200s are complete, the seedless ones all distinct, the 503s are Ray's overload refusals (plain
    text, documented) or the application's JSON; no other 5xx unless a replica death is reported."""
    before = httpx.get(f"{server}/health", timeout=TIMEOUT).json()["replica"]
    bodies = [{"class_labels": [(i + k) % 10 for k in range(1 + i % 3)], "steps": 5,  # the load, not the images
               **({"seed": 5000 + i} if i % 2 else {})} for i in range(200)]
    t0 = time.perf_counter()
    replies = asyncio.run(post_all(server, bodies, timeout=httpx.Timeout(600.0)))
    elapsed = time.perf_counter() - t0
    after = httpx.get(f"{server}/health", timeout=TIMEOUT).json()["replica"]
    counts = {"200": 0, "503": 0, "other": 0}
    for status, _, _ in replies:
        counts[str(status) if status in (200, 503) else "other"] += 1
    death = before != after
    print(f"200 concurrent requests in {elapsed:.1f} s: {counts}; replica death: {'yes' if death else 'none'}")
    ray_texts = [b for s, b, _ in replies if s == 503 and not isinstance(b, dict)]
    assert all("backpressure" in b.lower() or "queue" in b.lower() for b in ray_texts), ray_texts[:2]
    assert all(b["error"] for s, b, _ in replies if s == 503 and isinstance(b, dict))
    if not death:
        assert counts["other"] == 0, [(s, b) for s, b, _ in replies if s not in (200, 503)][:3]
    assert counts["200"] >= 32 and counts["503"] >= 1, counts  # the replica's room, and overload refused
    ok = [(sent, b) for sent, (s, b, _) in zip(bodies, replies) if s == 200]
    assert all(len(b["images"]) == len(sent["class_labels"]) for sent, b in ok)
    seedless = [b for sent, b in ok if "seed" not in sent]
    assert len({b["seed"] for b in seedless}) == len(seedless)
    assert len({"".join(b["images"]) for b in seedless}) == len(seedless)


def _listening_sockets(pids: set[int]) -> list[str]:
    """host:port of every listening TCP socket held by ``pids`` (from /proc: no psutil needed)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                host = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append(f"{host}:{int(port, 16)}")
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_freedit_serve_binds_every_ray_port_to_loopback(tmp_path):
    """`freedit serve` on 127.0.0.1: the proxy and all of Ray's own ports (GCS, raylet, object manager,
    workers, dashboard agent) listen on loopback only. Stopped with SIGTERM (drain, then exit 0)."""
    import signal
    import subprocess
    import sys

    import selectors

    port = free_port()
    env = dict(os.environ)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set by this module's own server: `freedit serve` must set it
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "freedit", "serve", "--port", str(port), "--threads", "1",
                             "--cpus-per-replica", "0.25"], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            start_new_session=True)
    try:
        with selectors.DefaultSelector() as sel:  # "serving freedit at http://127.0.0.1:PORT/ ..." once up
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=300)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("serving freedit at http://127.0.0.1:"), (line, (tmp_path / "serve.log").read_text()[-2000:])
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT).status_code == 200
        sockets = _listening_sockets(_descendants(proc.pid))
        assert f"127.0.0.1:{port}" in sockets and len(sockets) >= 5, sockets  # the proxy and Ray's own
        outside = [s for s in sockets if not (s.startswith("127.") or s.startswith("::ffff:127.") or
                                              s.startswith("::1:"))]
        assert not outside, f"listening beyond loopback: {outside} (all: {sockets})"
        print(f"freedit serve listens on {len(sockets)} sockets, all loopback: {sorted(sockets)}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
