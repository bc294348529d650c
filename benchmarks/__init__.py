"""Latency, speed-up and quality benchmarks; ``quality`` holds the digits evaluator (numpy only)."""
