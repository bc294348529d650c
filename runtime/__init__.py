"""Inference without torch: samplers, backends, the public Pipeline API."""
