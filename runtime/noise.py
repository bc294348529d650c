"""Counter-based noise keyed by (seed, sample, step, purpose[, stream]).

Philox4x32-10 (Salmon et al., SC'11) in vectorised numpy, so that the CUDA kernels can
reproduce the same bits: a draw depends only on its key, never on batch composition or on how
many numbers were drawn before it. Gaussians come from Box-Muller on pairs of uniforms.
The optional ``stream`` (< 2^16, in the high half of the step word; 0 = the plain key) separates
draws about the same transition made by different rounds (block verification, DESIGN §3.3.1).
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


class Purpose(IntEnum):
    """What a draw is for; part of the key so different uses never share numbers."""

    INIT = 1  # the starting noise x_T
    STEP = 2  # the noise of a committed DDPM transition (sequential sampler, bonus step)
    DRAFT = 3  # the drafter's proposal noise
    ACCEPT = 4  # the uniform of the accept test
    RESIDUAL = 5  # residual proposals; the attempt number is added in the high bits
    RESIDUAL_ACCEPT = 6


def philox4x32(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on ``counters`` [..., 4] uint32 with a 2-word key -> [..., 4] uint32."""
    c = [counters[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for round_index in range(10):
        if round_index:  # the key schedule: Weyl sequence, mod 2**32
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0, p1 = _M0 * c[0], _M1 * c[2]
        c = [
            ((p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0)) & _MASK32,
            p1 & _MASK32,
            ((p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1)) & _MASK32,
            p0 & _MASK32,
        ]
    return np.stack(c, axis=-1).astype(np.uint32)


#: Steps and streams share the counter's third word: step in the low half, stream in the high half.
STREAM_SHIFT = 16


def _blocks(seed: int, samples: np.ndarray, step, purpose, count: int, stream=0) -> np.ndarray:
    """[rows, 4*ceil(count/4)] uint32 of raw bits; counter = (block, sample, step | stream << 16, purpose).

    ``step``, ``purpose`` and ``stream`` are scalars or one value per row.
    """
    samples = np.asarray(samples, dtype=np.uint64).reshape(-1)
    steps = np.broadcast_to(np.asarray(step, dtype=np.uint64), samples.shape)
    streams = np.broadcast_to(np.asarray(stream, dtype=np.uint64), samples.shape)
    if streams.any():  # stream 0 leaves the step word as it was (any uint32, wrapped)
        if (steps >> np.uint64(STREAM_SHIFT)).any() or (streams >> np.uint64(STREAM_SHIFT)).any():
            raise ValueError("noise keys with a stream hold steps and streams below 2**16")
        steps = steps | (streams << np.uint64(STREAM_SHIFT))
    purposes = np.broadcast_to(np.asarray(purpose, dtype=np.uint64), samples.shape)
    n_blocks = (count + 3) // 4
    counters = np.empty((len(samples), n_blocks, 4), dtype=np.uint32)
    counters[..., 0] = np.arange(n_blocks, dtype=np.uint32)[None, :]
    counters[..., 1] = samples[:, None].astype(np.uint32)
    counters[..., 2] = steps[:, None].astype(np.uint32)
    counters[..., 3] = purposes[:, None].astype(np.uint32)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    bits = philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32))
    return bits.reshape(len(samples), -1)


def uniform(seed: int, samples, step, purpose, count: int, stream=0) -> np.ndarray:
    """[rows, count] float64 uniforms in (0, 1), one row per sample index."""
    bits = _blocks(seed, samples, step, purpose, count, stream)[:, :count]
    return (bits.astype(np.float64) + 0.5) * 2.0**-32


def normal(seed: int, samples, step, purpose, shape: tuple[int, ...], stream=0) -> np.ndarray:
    """[rows, *shape] float32 standard normals (Box-Muller), one row per sample index."""
    count = int(np.prod(shape))
    u = uniform(seed, samples, step, purpose, count + (count & 1), stream)
    u1, u2 = u[:, 0::2], u[:, 1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.empty_like(u)
    z[:, 0::2] = radius * np.cos(2.0 * np.pi * u2)
    z[:, 1::2] = radius * np.sin(2.0 * np.pi * u2)
    return z[:, :count].astype(np.float32).reshape((-1, *shape))
