"""One graph's cost per call: N calls of a dit or drafter ONNX graph at one batch size.

    farm-bench --timeout 600 -- python -m freedit.benchmarks.call_cost GRAPH_A.onnx --calls 2000 \\
        --vs 'python -m freedit.benchmarks.call_cost GRAPH_B.onnx --calls 2000'

The process does nothing else (inputs are made once, outside the loop), so two such processes
timed side by side by farm-bench give the two graphs' cost ratio per call, diluted only by the
start-up both share (ONNX Runtime import and session creation; measure it with --calls 0).
Inputs are random but valid for the freedit contracts: x, feat ~ N(0, 1), timesteps in [0, 1000),
labels in [0, 10). Prints one JSON line with the in-process seconds per call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def feeds(session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every input of ``session``; dimension 0 is the batch, the others must be static."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in session.get_inputs():
        shape = [batch, *spec.shape[1:]]
        if not all(isinstance(d, int) for d in shape):
            raise SystemExit(f"error: input {spec.name} has a dynamic dimension besides the batch: {spec.shape}")
        if spec.type == "tensor(int64)":
            out[spec.name] = rng.integers(0, 10, size=shape, dtype=np.int64)
        elif spec.name in ("t", "t_feat"):
            out[spec.name] = rng.uniform(0, 1000, size=shape).astype(np.float32)
        else:
            out[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path, help="a dit.onnx or drafter.onnx")
    parser.add_argument("--calls", type=int, default=1000, help="timed calls (0: start-up only)")
    parser.add_argument("--batch", type=int, default=128, help="rows per call (a CFG batch of 64 is 128 rows)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    if not args.graph.is_file():
        raise SystemExit(f"error: {args.graph}: no such file")
    if args.calls < 0 or args.batch < 1 or args.threads < 1:
        raise SystemExit("error: --calls >= 0, --batch >= 1, --threads >= 1")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(args.graph), options, providers=["CPUExecutionProvider"])
    inputs = feeds(session, args.batch)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        session.run(None, inputs)
    seconds = time.perf_counter() - t0
    print(json.dumps({"graph": str(args.graph), "calls": args.calls, "batch": args.batch, "threads": args.threads,
                      "seconds_per_call": seconds / args.calls if args.calls else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
