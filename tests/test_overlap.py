"""Micro-batches in flight (runtime/overlap.py): same images, real overlap, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from freedit.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(bundled_dir):
    return Pipeline.from_directory(bundled_dir, threads=1)


def test_overlapped_micro_batches_give_the_same_images(pipe):
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    one = pipe.generate(labels, steps=30, seed=2, batch_size=9)
    two = pipe.generate(labels, steps=30, seed=2, batch_size=3, micro_batches=2)
    np.testing.assert_array_equal(one.samples, two.samples)
    assert [s["accepted"] for s in one.stats] == [s["accepted"] for s in two.stats]
    assert two.settings["micro_batches"] == 2 and one.timeline is None


def test_drafting_overlaps_verification(pipe):
    result = pipe.generate(list(range(10)) * 2, steps=40, seed=0, batch_size=5, micro_batches=2)
    events = result.timeline
    assert {e["lane"] for e in events} == {"draft", "verify"}
    assert {e["micro_batch"] for e in events} == {0, 1}
    for lane in ("draft", "verify"):  # one stream per lane: events of a lane never overlap each other
        spans = sorted((e["start"], e["end"]) for e in events if e["lane"] == lane)
        assert all(a_end <= b_start + 1e-6 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    overlapping = [(d, v) for d in events if d["lane"] == "draft" for v in events if v["lane"] == "verify"
                   if min(d["end"], v["end"]) > max(d["start"], v["start"])]
    assert overlapping and all(d["micro_batch"] != v["micro_batch"] for d, v in overlapping)
    assert result.summary["draft_verify_overlap_s"] > 0


def test_micro_batches_are_validated(pipe):
    with pytest.raises(ValueError, match="micro batches must be an integer >= 1"):
        pipe.generate([0], steps=10, micro_batches=0)
    with pytest.raises(ValueError, match="does not draft"):
        pipe.generate([0], steps=10, sampler="sequential", micro_batches=2)


def test_overlap_timeline_records_the_draft_guidance(tmp_path):
    """The benchmark CLI at its tiniest, with the rule of records made before --draft-guidance existed."""
    pytest.importorskip("matplotlib")
    import json

    from freedit.benchmarks.overlap_timeline import main

    argv = ["--n", "4", "--steps", "6", "--window", "2", "--repeats", "1", "--draft-guidance", "drafter",
            "--verifier", "step", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["settings"]["draft_guidance"] == "drafter" and record["draft_guidance"] == "drafter"
    assert record["settings"]["verifier"] == "step" and record["verifier"] == "step"
    assert record["identical_images"] and record["command"].endswith("--verifier step --out " + argv[-1])
    assert "draft guidance: drafter; verifier: step" in (tmp_path / "o.md").read_text()
