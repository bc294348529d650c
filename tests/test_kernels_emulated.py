"""The host emulation of the kernels library (runtime/csrc/emulation, docs/KERNELS.md "Host emulation").

The library's own .cu sources, compiled by the host compiler against the CUDA-runtime shim, run
every kernel check of ``kernels.CHECKS`` against the numpy oracle in CI, under each scheduling
order of the CUDA threads of a block. The shim's own semantics are tested through its probe
kernels (libfreedit_emulation_probes.so) and the library's device runtime (freedit_rt_*), and
variants of the sources with planted bugs show that the checks catch them.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from freedit.runtime import kernels, noise, ops

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = tuple(kernels.Emulation.SCHEDULES)


@pytest.fixture(scope="session")
def probes(emulated_build):
    return kernels.load_probes(emulated_build.probes)


@pytest.fixture
def emu(emulated_kernels):
    """The emulated kernels with the default settings restored afterwards (and no stale error)."""
    yield emulated_kernels
    emulated_kernels.emulation.set_schedule("mixed")
    emulated_kernels.emulation.set_null_launch(False)
    emulated_kernels.emulation.set_threads(0)
    emulated_kernels.emulation.last_error(reset=True)


@pytest.fixture
def probe(probes):
    yield probes
    probes.emulation.set_schedule("mixed")
    probes.emulation.set_null_launch(False)
    probes.emulation.set_threads(0)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _dims(*values: int):
    return (ctypes.c_uint * 3)(*values)


# ---- the build -----------------------------------------------------------------------------------
def test_emulated_build_needs_only_the_host_compiler(emulated_build):
    assert "warning" not in emulated_build.log.lower(), emulated_build.log
    cache = (emulated_build.library.parent / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_COMPILER" not in cache, "the emulated build configured CUDA"
    assert emulated_build.seconds < 300, f"the emulated build took {emulated_build.seconds:.0f} s"
    if shutil.which("nm"):
        out = subprocess.run(["nm", "-D", str(emulated_build.library)], capture_output=True, text=True, check=True).stdout
        exported = set(re.findall(r"\sT\s(\w+)$", out, re.MULTILINE))
        emulation = set(kernels._EMULATION_SIGNATURES)
        assert set(kernels.ENTRY_POINTS) | emulation <= exported, set(kernels.ENTRY_POINTS) - exported
        assert not sorted(s for s in exported if s.startswith("cuda")), "the shim's CUDA API must stay private"
        undefined = set(re.findall(r"\sU\s(\w+)", out))
        assert not {s for s in undefined if s.startswith(("cuda", "cu"))}, undefined
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", str(emulated_build.library)], capture_output=True, text=True, check=False).stdout
        assert "libcuda" not in deps and "libcudart" not in deps, deps


def test_load_finds_the_emulation(emulated_build, monkeypatch):
    monkeypatch.setenv(kernels.ENV_EMU_LIB, str(emulated_build.library))
    assert kernels.find_library(emulated=True) == emulated_build.library
    k = kernels.load(emulated=True)
    assert k.emulated and k.emulation is not None and k.abi_version == kernels.ABI_VERSION
    assert k.device_count() == (1, 0)


# ---- every kernel check on the emulated kernels ---------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("check", list(kernels.CHECKS))
def test_kernel_matches_numpy_oracle_emulated(emu, check, schedule):
    emu.emulation.set_schedule(schedule)
    mem = kernels.LibraryMemory(emu)
    try:
        result = kernels.CHECKS[check](emu, mem, np.random.default_rng([2024, len(check)]))
    finally:
        mem.close()
    assert result["passed"], json.dumps(result, indent=1, default=str)


def test_selftest_entry_point_emulated(emulated_build):
    result = subprocess.run([sys.executable, "-m", "freedit.runtime.kernels", "--selftest", "--emulated", "--lib",
                             str(emulated_build.library)], capture_output=True, text=True, timeout=600, check=False)
    summary = json.loads(result.stdout)
    assert result.returncode == 0 and summary["passed"], result.stdout + result.stderr
    assert summary["emulated"] and summary["compute_capability"] == "8.0"
    assert set(summary["checks"]) == set(kernels.CHECKS)


# ---- the shim: blocks, barriers, warps ------------------------------------------------------------
def _neighbour_expected(grid: int, block: int, rounds: int) -> np.ndarray:
    t = np.arange(block)
    per_thread = sum(((t + 1) % block) + r * 1000 for r in range(rounds))
    return np.tile(per_thread, grid).astype(np.int32)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barriers_wait_for_every_thread(probe, schedule):
    probe.emulation.set_schedule(schedule)
    for grid, block in ((1, 1024), (7, 256), (3, 100), (2, 32), (1, 1)):
        out = np.full(grid * block, -1, dtype=np.int32)
        assert probe.probe_neighbours(grid, block, 3, 1, _ptr(out)) == 0
        assert np.array_equal(out, _neighbour_expected(grid, block, 3)), (grid, block)


def test_threads_interleave_at_barriers_only(probe):
    """Without the barriers the same kernel reads values not yet written: the threads of a block do
    not run one after the other (else the emulation could not show a missing barrier)."""
    wrong = {}
    for schedule in SCHEDULES:
        probe.emulation.set_schedule(schedule)
        out = np.zeros(256, dtype=np.int32)
        assert probe.probe_neighbours(1, 256, 3, 0, _ptr(out)) == 0
        wrong[schedule] = int(np.sum(out != _neighbour_expected(1, 256, 3)))
    assert all(n > 0 for n in wrong.values()), wrong


def _shuffle_model(grid, block, width, idx_mul, idx_add, up, down, xor_mask):
    """CUDA's semantics of shuffle_kernel (probes.cu): mask = the warp's live lanes; a source lane
    outside the group, or in a later segment for xor, gives the lane's own value."""
    out = np.zeros((grid * block, 8), dtype=np.int64)
    for b in range(grid):
        for w in range((block + 31) // 32):
            lanes = min(32, block - 32 * w)
            mask = (1 << lanes) - 1
            value = [1000 * b + 10 * lane + 1 for lane in range(lanes)]
            ballot = sum(1 << lane for lane in range(lanes) if lane % 3 == 0)
            for lane in range(lanes):
                segment, offset = lane & ~(width - 1), lane & (width - 1)

                def read(src, lane=lane, value=value, lanes=lanes):
                    return value[src] if 0 <= src < lanes else value[lane]

                xor_src = lane ^ xor_mask
                row = out[b * block + 32 * w + lane]
                row[0] = read(segment + ((lane * idx_mul + idx_add) & (width - 1)))
                row[1] = read(lane - up if offset >= up else lane)
                row[2] = read(lane + down if offset + down < width else lane)
                row[3] = read(xor_src if xor_src < segment + width else lane)
                row[4] = ballot
                row[5] = int(lanes > 5)
                row[6] = int(lanes <= 7)
                row[7] = mask
    return out


@pytest.mark.parametrize("block", [64, 48])  # 48: a partial last warp
def test_warp_shuffles_exchange_between_lanes(probe, block):
    for width in (32, 16, 8, 2, 1):
        args = (2, block, width, 7, 3, 3, 5, 6)
        out = np.zeros((2 * block, 8), dtype=np.int64)
        assert probe.probe_shuffles(*args, _ptr(out)) == 0
        expected = _shuffle_model(*args)
        bad = np.argwhere(out != expected)
        assert not len(bad), f"width {width}: first mismatch (thread, result) {bad[0]}: {out[tuple(bad[0])]} " \
                             f"!= {expected[tuple(bad[0])]}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warp_then_block_reduction(probe, schedule):
    probe.emulation.set_schedule(schedule)
    rng = np.random.default_rng(3)
    for grid, block in ((5, 256), (2, 1024), (3, 96)):
        values = rng.integers(-(10**12), 10**12, grid * block)
        out = np.zeros(grid, dtype=np.int64)
        assert probe.probe_warp_sum(grid, block, _ptr(values), _ptr(out)) == 0
        assert np.array_equal(out, values.reshape(grid, block).sum(axis=1)), (grid, block)


def test_block_barrier_votes_and_returned_threads(probe):
    """__syncthreads_count/and/or over the live threads; threads that returned count as arrived."""
    rng = np.random.default_rng(5)
    for live in (256, 200, 1):
        pred = (rng.random(256) < 0.6).astype(np.int32)
        pred[:live][0] = 1
        out = np.full(3 * 256, -7, dtype=np.int32)
        assert probe.probe_barrier_votes(256, _ptr(pred), live, _ptr(out)) == 0
        votes = out.reshape(256, 3)[:live]
        p = pred[:live]
        assert np.all(votes == [int(p.sum()), int(p.all()), int(p.any())]), live


def test_shared_memory_is_per_block(probe):
    """Blocks running at the same time on different host threads each see their own __shared__."""
    probe.emulation.set_threads(4)
    grid, block = 32, 64
    out = np.zeros(2 * grid, dtype=np.int32)
    assert probe.probe_shared_per_block(grid, block, 1500, _ptr(out)) == 0
    counts, foreign = out[0::2], out[1::2]
    assert np.all(counts == block) and not foreign.any(), (counts, foreign)


class _Counters(ctypes.Structure):
    _fields_ = [("add_i", ctypes.c_int), ("add_u", ctypes.c_uint), ("add_ll", ctypes.c_longlong),
                ("add_ull", ctypes.c_ulonglong), ("add_f", ctypes.c_float), ("add_d", ctypes.c_double),
                ("max_i", ctypes.c_int), ("min_i", ctypes.c_int), ("or_u", ctypes.c_uint), ("and_u", ctypes.c_uint),
                ("xor_u", ctypes.c_uint), ("max_ll", ctypes.c_longlong), ("min_ll", ctypes.c_longlong),
                ("max_ull", ctypes.c_ulonglong), ("cas_i", ctypes.c_int), ("inc_u", ctypes.c_uint),
                ("exch_i", ctypes.c_int), ("sub_i", ctypes.c_int)]


def test_atomics_across_concurrent_blocks(probe):
    assert probe.probe_counters_size() == ctypes.sizeof(_Counters)
    probe.emulation.set_threads(4)
    grid, block = 300, 256
    n = grid * block
    c = _Counters(max_i=-1, and_u=0xFFFFFFFF)
    assert probe.probe_atomics(grid, block, ctypes.addressof(c)) == 0
    g = np.arange(n, dtype=np.int64)
    xor = 0
    for bit in range(4):
        xor |= (int(np.sum(g % 4 == bit)) % 2) << bit
    expected = {"add_i": n, "add_u": 2 * n, "add_ll": int(g.sum()), "add_ull": 3 * n, "add_f": float(n),
                "add_d": 0.5 * n, "max_i": n - 1, "min_i": -(n - 1), "or_u": 0xFFFFFFFF, "and_u": 0xFFFF0000,
                "xor_u": xor, "max_ll": (n - 1) << 33, "min_ll": -((n - 1) << 33), "max_ull": (n - 1) << 40,
                "cas_i": n, "inc_u": n % 10, "exch_i": 7, "sub_i": -n}
    got = {name: getattr(c, name) for name, _ in _Counters._fields_}
    assert got == expected


def test_builtin_indices_of_3d_grids(probe):
    grid, block = (3, 2, 2), (4, 3, 2)
    threads, blocks = int(np.prod(block)), int(np.prod(grid))
    out = np.zeros((blocks, threads, 12), dtype=np.uint32)
    assert probe.probe_indices(_dims(*grid), _dims(*block), _ptr(out)) == 0
    b = np.arange(blocks)
    t = np.arange(threads)
    bx, by, bz = b % grid[0], (b // grid[0]) % grid[1], b // (grid[0] * grid[1])
    tx, ty, tz = t % block[0], (t // block[0]) % block[1], t // (block[0] * block[1])
    assert np.array_equal(out[:, :, 0:3], np.broadcast_to(np.stack([tx, ty, tz], 1), (blocks, threads, 3)))
    assert np.array_equal(out[:, :, 3:6], np.broadcast_to(np.stack([bx, by, bz], 1)[:, None], (blocks, threads, 3)))
    assert np.all(out[:, :, 6:9] == block) and np.all(out[:, :, 9:12] == grid)


def test_half_and_bfloat16_round_to_nearest_even(probe):
    rng = np.random.default_rng(11)
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf, np.nan,
                        2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-25 * 1.0000001, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                        1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38], dtype=np.float32)
    scaled = (rng.standard_normal(30000) * 10.0 ** rng.integers(-9, 6, 30000)).astype(np.float32)
    bits = rng.integers(0, 2**32, 36000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([special, scaled, bits])
    assert values.dtype == np.float32
    n = len(values)
    assert n >= 65536
    half_bits, bf16_bits = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    from_half, from_bf16 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    assert probe.probe_convert(_ptr(values), n, _ptr(half_bits), _ptr(bf16_bits), _ptr(from_half),
                               _ptr(from_bf16)) == 0
    nan = np.isnan(values)
    with np.errstate(over="ignore"):
        ref_half = values.astype(np.float16).view(np.uint16)
    assert np.array_equal(half_bits[~nan], ref_half[~nan])
    assert np.all(half_bits[nan] == 0x7FFF) and np.all(bf16_bits[nan] == 0x7FFF)  # CUDA's canonical NaN
    assert np.array_equal(bf16_bits[~nan], kernels.to_bfloat16_bits(values)[~nan])
    patterns = np.arange(n, dtype=np.uint32) & 0xFFFF
    ref_from_half = patterns.astype(np.uint16).view(np.float16).astype(np.float32)
    half_nan = np.isnan(ref_from_half)
    assert np.array_equal(np.isnan(from_half), half_nan)
    assert np.array_equal(from_half[~half_nan].view(np.uint32), ref_from_half[~half_nan].view(np.uint32))
    assert np.array_equal(from_bf16.view(np.uint32), kernels.from_bfloat16_bits(patterns).view(np.uint32))


# ---- launches: configuration, stuck barriers, null launches, the pool ------------------------------
def test_invalid_configurations_are_launch_errors(probe):
    cases = {((0, 1, 1), (32, 1, 1), 0): 9, ((1, 1, 1), (0, 1, 1), 0): 9, ((1, 1, 1), (1025, 1, 1), 0): 9,
             ((1, 1, 1), (32, 32, 2), 0): 9, ((1, 1, 1), (1, 1, 65), 0): 9, ((1, 65536, 1), (32, 1, 1), 0): 9,
             ((2**31, 1, 1), (32, 1, 1), 0): 9, ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1): 1,
             ((2**31 - 1, 1, 1), (32, 1, 1), 0): None}  # valid, not run: only the null-launch path
    before = probe.emulation.counters()
    probe.emulation.set_null_launch(True)
    for (grid, block, shared), code in cases.items():
        got = probe.probe_configured(_dims(*grid), _dims(*block), shared, None)
        assert got == (code or 0), (grid, block, shared, got)
    probe.emulation.set_null_launch(False)
    assert probe.emulation.counters() == before
    assert probe.probe_configured(_dims(3, 2, 1), _dims(32, 4, 2), 48 * 1024, None) == 0  # the error was consumed


def _launch_with_timeout(fn, seconds=60.0):
    """fn() on another host thread (a hang fails the test instead of the session)."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the launch hung for {seconds} s instead of failing"
    return result[0]


@pytest.mark.parametrize("kind, detail", [
    (0, r"a barrier can never complete: 63 thread\(s\) wait at __syncthreads, 1 at a warp collective"),
    (1, r"a barrier can never complete: 62 thread\(s\) wait at __syncthreads, 2 at a warp collective"),
    (2, r"thread \(5,0,0\) of block \(0,0,0\): __trap\(\) called"),
    (3, r"a warp shuffle's width 12 is not a power of two"),
])
def test_stuck_barrier_or_trap_fails_the_launch(probe, kind, detail):
    out = np.zeros(64, dtype=np.int32)
    # the failure's description belongs to the host thread that launched
    code, text = _launch_with_timeout(lambda: (probe.probe_stuck(kind, 64, _ptr(out)),
                                               probe.emulation.last_error_detail()))
    assert code == 719  # cudaErrorLaunchFailure
    assert re.search(detail, text), text
    assert "stuck_kernel" in text
    assert probe.probe_empty(4, 64, None) == 0  # not sticky: the next launch runs


def test_null_launch_is_validated_and_counted_but_not_run(emu):
    mem = kernels.LibraryMemory(emu)
    try:
        keys = [mem.upload(np.arange(3, dtype=np.uint32)) for _ in range(3)]
        out = mem.upload(np.full((3, 4), 7, dtype=np.uint32))
        launches, executed = emu.lib.freedit_launch_count(), emu.emulation.counters()
        with emu.emulation.null_launches():
            emu.philox_bits(1, *keys, out)
        assert emu.lib.freedit_launch_count() == launches + 1
        assert emu.emulation.counters() == executed
        assert np.all(mem.download(out) == 7)
        emu.philox_bits(1, *keys, out)
        assert emu.emulation.counters()["grids"] == executed["grids"] + 1
        assert np.array_equal(mem.download(out), noise._blocks(1, *[np.arange(3, dtype=np.uint32)] * 3, 4)[:, :4])
    finally:
        mem.close()


def _pool_threads() -> int:
    """The shim's helper threads (named "freedit-emu"): counting every thread of the process raced with
    threads other code starts and stops (a CI run once found one thread too many after the pool stopped)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended between listdir and read
            pass
    return names.count("freedit-emu")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to count threads")
def test_pool_threads_are_reused(probe):
    probe.emulation.set_threads(3)
    assert probe.probe_empty(8, 64, None) == 0  # starts the pool: the launching thread and 2 helpers
    assert _pool_threads() == 2
    for _ in range(50):
        assert probe.probe_empty(8, 64, None) == 0
    assert _pool_threads() == 2
    probe.emulation.set_threads(1)
    assert _pool_threads() == 0  # the helpers are stopped, none is started for one thread


# ---- the device runtime on the shim ---------------------------------------------------------------
class _Runtime:
    """The library's freedit_rt_* entry points as plain ctypes calls (the tests assert on the codes)."""

    def __init__(self, k: kernels.Kernels):
        self.lib, self._keep = k.lib, []

    def __getattr__(self, name):
        return getattr(self.lib, f"freedit_rt_{name}")

    def _handle(self, create, *args) -> int:
        handle = ctypes.c_void_p()
        code = create(ctypes.byref(handle), *args)
        assert code == 0, f"{create.__name__} returned {code}"
        return handle.value

    def stream(self) -> int:
        return self._handle(self.lib.freedit_rt_stream_create)

    def event(self, timing: bool = False) -> int:
        return self._handle(self.lib.freedit_rt_event_create, int(timing))

    def pinned(self, count: int, dtype) -> np.ndarray:
        """A numpy view of pinned host memory (freed at the end of the test's process: small)."""
        nbytes = count * np.dtype(dtype).itemsize
        ptr = self._handle(self.lib.freedit_rt_host_alloc, nbytes)
        return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr)).view(dtype)

    def capturing(self, stream) -> bool:
        flag = ctypes.c_int(-1)
        assert self.lib.freedit_rt_is_capturing(stream, ctypes.byref(flag)) == 0
        return bool(flag.value)

    def end_capture(self, stream) -> tuple[int, int | None]:
        exec_ = ctypes.c_void_p()
        code = self.lib.freedit_rt_end_capture(stream, ctypes.byref(exec_))
        return code, exec_.value

    def host_fn(self, fn) -> kernels.HOST_FN:
        callback = kernels.HOST_FN(fn)
        self._keep.append(callback)  # alive as long as a graph may call it
        return callback

    def copy_bytes(self) -> tuple[int, int]:
        h2d, d2h = ctypes.c_longlong(), ctypes.c_longlong()
        self.lib.freedit_copy_bytes(ctypes.byref(h2d), ctypes.byref(d2h))
        return h2d.value, d2h.value


def test_device_memory_pointer_attributes_and_info(emu):
    rt = _Runtime(emu)
    assert emu.memory_type(np.zeros(4).ctypes.data) == "unregistered host memory"
    pinned = rt.pinned(16, np.uint8)
    assert emu.memory_type(pinned.ctypes.data) == "pinned host memory"
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert rt.mem_get_info(ctypes.byref(free), ctypes.byref(total)) == 0
    assert total.value == 80 << 30
    big = ctypes.c_void_p()
    assert rt.malloc(ctypes.byref(big), 16 << 30) == 0  # lazily mapped: nothing is touched
    assert big.value % 256 == 0
    assert emu.memory_type(big.value) == emu.memory_type(big.value + (16 << 30) - 1) == "device memory"
    free_after = ctypes.c_size_t()
    assert rt.mem_get_info(ctypes.byref(free_after), ctypes.byref(total)) == 0
    assert free.value - free_after.value == 16 << 30
    too_much = ctypes.c_void_p()
    assert rt.malloc(ctypes.byref(too_much), 100 << 30) == 2  # cudaErrorMemoryAllocation
    assert emu.emulation.last_error() == 2
    assert rt.free(big) == 0
    assert emu.memory_type(big.value) == "unregistered host memory"
    assert rt.free(big) == 1 and emu.emulation.last_error() == 1  # a second free is refused
    small = kernels.LibraryMemory(emu)
    try:
        fresh = small.empty((64,), "uint8")
        assert emu.memory_type(fresh.ptr) == "device memory"
        assert np.all(small.download(fresh) == 0xFF)  # fresh device memory is poisoned (NaN, -1)
    finally:
        small.close()
    major, minor, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(-1)
    assert rt.compute_capability(0, ctypes.byref(major), ctypes.byref(minor)) == 0 and (major.value, minor.value) == (8, 0)
    assert rt.compute_capability(1, ctypes.byref(major), ctypes.byref(minor)) == 101  # cudaErrorInvalidDevice
    assert rt.set_device(0) == 0 and rt.set_device(1) == 101
    assert rt.get_device(ctypes.byref(device)) == 0 and device.value == 0


def test_copy_byte_counters(emu):
    rt, mem = _Runtime(emu), kernels.LibraryMemory(emu)
    try:
        dev = mem.empty((256,), "uint8")
        host = np.arange(256, dtype=np.uint8)
        back = np.zeros(256, dtype=np.uint8)
        before = rt.copy_bytes()
        for dst, src, n, kind in ((dev.ptr, host.ctypes.data, 100, 1), (back.ctypes.data, dev.ptr, 60, 2),
                                  (dev.ptr + 128, dev.ptr, 50, 3), (back.ctypes.data + 100, host.ctypes.data, 10, 0),
                                  (dev.ptr + 200, host.ctypes.data, 7, 4), (back.ctypes.data, dev.ptr, 3, 4)):
            assert rt.memcpy_async(dst, src, n, kind, None) == 0
        h2d, d2h = rt.copy_bytes()
        assert (h2d - before[0], d2h - before[1]) == (100 + 7, 60 + 3)  # kind 4 resolved from the pointers
        assert np.array_equal(back[:60], host[:60]) and np.array_equal(back[100:110], host[:10])
        assert rt.memcpy_async(dev.ptr, host.ctypes.data, 1, 9, None) == 21  # cudaErrorInvalidMemcpyDirection
    finally:
        mem.close()


def test_events_and_host_functions_in_stream_order(emu):
    rt = _Runtime(emu)
    s, start, end, untimed, never = rt.stream(), rt.event(True), rt.event(True), rt.event(False), rt.event(True)
    pinned = rt.pinned(4, np.int32)
    pinned[:] = 0
    seen = []
    fill = np.array([5, 6, 7, 8], dtype=np.int32)
    assert rt.event_record(start, s) == 0
    assert rt.memcpy_async(pinned.ctypes.data, fill.ctypes.data, 16, 0, s) == 0
    assert rt.launch_host_func(s, rt.host_fn(lambda data: seen.append((data, pinned.tolist()))), 42) == 0
    time.sleep(0.01)
    assert rt.event_record(end, s) == 0 and rt.event_record(untimed, s) == 0
    assert seen == [(42, [5, 6, 7, 8])]  # ran in order, after the copy
    assert rt.event_query(end) == 0 and rt.event_synchronize(end) == 0 and rt.stream_synchronize(s) == 0
    ms = ctypes.c_float()
    assert rt.event_elapsed_ms(ctypes.byref(ms), start, end) == 0 and 9.0 <= ms.value < 5000.0
    assert rt.event_elapsed_ms(ctypes.byref(ms), start, untimed) == 400  # timing disabled
    assert rt.event_elapsed_ms(ctypes.byref(ms), never, end) == 400  # never recorded
    assert rt.stream_wait_event(s, end) == 0
    assert rt.stream_synchronize(12345) == 400  # not a stream
    for handle in (start, end, untimed, never):
        assert rt.event_destroy(handle) == 0
    assert rt.stream_destroy(s) == 0 and rt.stream_destroy(s) == 400


def test_capture_records_and_replays_in_order(emu):
    """Copies, a kernel and a host function captured on a stream run only when the graph is
    launched; the graph keeps pointers (the data they point to is read at each replay) and scalar
    arguments as captured."""
    rt, mem = _Runtime(emu), kernels.LibraryMemory(emu)
    try:
        rows, count, seed = 3, 8, 77
        keys = rt.pinned(3 * rows, np.uint32)
        keys[:] = np.arange(3 * rows, dtype=np.uint32) * 5 + 1
        dev_keys = [mem.empty((rows,), "uint32") for _ in range(3)]
        out = mem.upload(np.zeros((rows, count), dtype=np.uint32))
        result = rt.pinned(rows * count, np.uint32).reshape(rows, count)
        result[:] = 9
        calls = []
        s = rt.stream()
        launches = emu.lib.freedit_launch_count()
        assert rt.begin_capture(s) == 0 and rt.capturing(s)
        for i, key in enumerate(dev_keys):
            assert rt.memcpy_async(key.ptr, keys.ctypes.data + 4 * rows * i, 4 * rows, 1, s) == 0
        emu.philox_bits(seed, *dev_keys, out, stream=s)
        assert rt.memcpy_async(result.ctypes.data, out.ptr, result.nbytes, 2, s) == 0
        assert rt.launch_host_func(s, rt.host_fn(lambda data: calls.append(result.copy())), 0) == 0
        code, graph = rt.end_capture(s)
        assert code == 0 and graph and not rt.capturing(s)
        assert emu.lib.freedit_launch_count() == launches + 1  # counted when enqueued
        assert not calls and np.all(result == 9), "captured work ran during capture"
        executed = emu.emulation.counters()["grids"]

        def expected():
            k = keys.reshape(3, rows).copy()
            return noise._blocks(seed, k[0], k[1], k[2], count)[:, :count]

        assert rt.graph_launch(graph, s) == 0 and rt.stream_synchronize(s) == 0
        assert np.array_equal(result, expected()) and len(calls) == 1 and np.array_equal(calls[0], expected())
        keys[:] = keys[::-1].copy()  # new data behind the same pointers
        assert rt.graph_launch(graph, s) == 0
        assert np.array_equal(result, expected()) and len(calls) == 2
        assert emu.emulation.counters()["grids"] == executed + 2
        assert emu.lib.freedit_launch_count() == launches + 1  # replays are not library launches
        assert rt.memset_async(out.ptr, 0, out.nbytes, s) == 0
        with emu.emulation.null_launches():  # the kernel node does not run, the copies do
            assert rt.graph_launch(graph, s) == 0
        assert np.all(result == 0) and len(calls) == 3
        assert rt.graph_destroy(graph) == 0 and rt.graph_destroy(graph) == 400
    finally:
        mem.close()


def test_fork_join_capture_across_streams(emu):
    """A stream that waits on an event of a capturing stream joins its capture; its work is part of
    the graph, ordered by the events, and the capture ends only once it has joined back."""
    rt, mem = _Runtime(emu), kernels.LibraryMemory(emu)
    rng = np.random.default_rng(9)
    try:
        shape, seed = (4, 2, 3, 3), 5
        mean = rng.standard_normal(shape).astype(np.float32)
        log_var = rng.uniform(-3, 0, shape).astype(np.float32)
        steps = np.array([0, 3, 1, 2], dtype=np.int32)
        ids = np.arange(4, dtype=np.uint32)
        dev = {name: mem.upload(a) for name, a in (("mean", mean), ("log_var", log_var), ("steps", steps),
                                                   ("ids", ids))}
        z, x = mem.empty(shape, "float32"), mem.empty(shape, "float32")
        result = rt.pinned(int(np.prod(shape)), np.float32).reshape(shape)
        a, b, forked, joined = rt.stream(), rt.stream(), rt.event(), rt.event()
        assert rt.begin_capture(a) == 0
        emu.philox_normal(seed, dev["ids"], dev["ids"], dev["ids"], z, stream=a)
        assert rt.event_record(forked, a) == 0 and rt.stream_wait_event(b, forked) == 0
        assert rt.capturing(b), "the waiting stream joins the capture"
        emu.ddpm_step(dev["mean"], dev["log_var"], dev["steps"], z, x, stream=b)
        assert rt.event_record(joined, b) == 0 and rt.stream_wait_event(a, joined) == 0
        assert rt.memcpy_async(result.ctypes.data, x.ptr, result.nbytes, 2, a) == 0
        code, graph = rt.end_capture(a)
        assert code == 0 and graph and not rt.capturing(a) and not rt.capturing(b)
        result[:] = np.nan
        assert rt.graph_launch(graph, a) == 0
        expected = ops.ddpm_step(mean, log_var, steps, noise.normal(seed, ids, ids, ids, shape[1:]))
        assert kernels._rel_err(result, expected) <= 1e-6
        assert rt.graph_destroy(graph) == 0

        # a fork that never joins back: no graph, both streams out of capture
        assert rt.begin_capture(a) == 0
        assert rt.event_record(forked, a) == 0 and rt.stream_wait_event(b, forked) == 0
        emu.ddpm_step(dev["mean"], dev["log_var"], dev["steps"], z, x, stream=b)
        assert rt.end_capture(a) == (904, None)  # cudaErrorStreamCaptureUnjoined
        assert not rt.capturing(a) and not rt.capturing(b)
        emu.ddpm_step(dev["mean"], dev["log_var"], dev["steps"], z, x, stream=b)  # usable again
    finally:
        mem.close()


def test_capture_rules_invalidate_the_capture(emu):
    rt = _Runtime(emu)
    a, b, e, outside = rt.stream(), rt.stream(), rt.event(), rt.event()
    buf = ctypes.c_void_p()
    assert rt.malloc(ctypes.byref(buf), 64) == 0
    host = np.zeros(64, dtype=np.uint8)

    def invalidated_by(action, code):
        assert rt.begin_capture(a) == 0
        assert action() == code
        assert rt.capturing(a)  # still in capture mode, but invalid
        assert rt.memcpy_async(buf, host.ctypes.data, 8, 1, a) == 901  # cudaErrorStreamCaptureInvalidated
        assert rt.end_capture(a) == (901, None)
        assert not rt.capturing(a) and rt.memcpy_async(buf, host.ctypes.data, 8, 1, a) == 0  # usable again
        emu.emulation.last_error(reset=True)

    invalidated_by(lambda: rt.stream_synchronize(a), 900)  # cudaErrorStreamCaptureUnsupported

    def sync_captured_event():
        assert rt.event_record(e, a) == 0
        return rt.event_synchronize(e)

    invalidated_by(sync_captured_event, 907)  # cudaErrorCapturedEvent
    assert rt.event_query(e) == 907  # last recorded during a capture
    assert rt.event_record(e, None) == 0 and rt.event_query(e) == 0

    other = ctypes.c_void_p()
    invalidated_by(lambda: rt.malloc(ctypes.byref(other), 64), 900)  # allocation by the capturing thread
    invalidated_by(lambda: rt.host_alloc(ctypes.byref(other), 64), 900)

    assert rt.event_record(outside, b) == 0
    invalidated_by(lambda: rt.stream_wait_event(a, outside), 905)  # cudaErrorStreamCaptureIsolation

    def end_on_the_forked_stream():
        assert rt.event_record(e, a) == 0 and rt.stream_wait_event(b, e) == 0
        return rt.end_capture(b)[0]

    invalidated_by(end_on_the_forked_stream, 903)  # cudaErrorStreamCaptureUnmatched
    assert not rt.capturing(b)

    # thread-local mode: another host thread may allocate during the capture
    assert rt.begin_capture(a) == 0
    codes = []
    worker = threading.Thread(target=lambda: codes.append(rt.malloc(ctypes.byref(other), 64)))
    worker.start()
    worker.join()
    assert codes == [0]
    assert rt.begin_capture(a) == 401  # cudaErrorIllegalState: already capturing
    code, graph = rt.end_capture(a)
    assert code == 0 and graph and rt.graph_launch(graph, a) == 0 and rt.graph_destroy(graph) == 0
    assert rt.free(other) == 0
    assert rt.begin_capture(None) == 900  # the legacy stream cannot capture
    assert rt.end_capture(a) == (401, None)  # not capturing
    emu.emulation.last_error(reset=True)
    assert rt.free(buf) == 0


# ---- planted bugs are caught ------------------------------------------------------------------------
# (file under runtime/csrc, text, replacement, what must catch it). Kernel bugs: the named checks,
# under the schedules listed (the bug shows in these orders of a block's threads); shim bugs: a probe test.
MUTANTS = {
    "block_sum_without_first_barrier": (
        "common.cuh", "  __syncthreads();  // scratch may still be read by a previous call\n", "",
        {"checks": ["reflect"], "schedules": ["lifo", "mixed"]}),
    "philox_wrong_multiplier": (
        "common.cuh", "kPhiloxM0 = 0xD2511F53u", "kPhiloxM0 = 0xD2511F57u",
        {"checks": ["philox", "residual"], "schedules": list(SCHEDULES)}),
    "accept_scan_off_by_one": (
        "coupling.cu", "threadIdx.x >= offset ? scan", "threadIdx.x > offset ? scan",
        {"checks": ["accept_window"], "schedules": list(SCHEDULES)}),
    "accept_scan_without_barrier": (
        "coupling.cu", "      __syncthreads();\n      scan[threadIdx.x] += add;\n", "      scan[threadIdx.x] += add;\n",
        {"checks": ["accept_window"], "schedules": ["fifo", "random", "mixed"]}),
    "residual_vote_without_barrier": (
        "round_maths.cuh", "    if (lane == 0) keep[warp] = ok;\n    __syncthreads();\n", "    if (lane == 0) keep[warp] = ok;\n",
        {"checks": ["residual"], "schedules": ["fifo", "random", "mixed"]}),
    "shim_shared_memory_global": (
        "emulation/include/freedit_emu_device.h", "#define __shared__ static thread_local", "#define __shared__ static",
        {"probe": "shared"}),
    "shim_barrier_does_not_wait": (
        "emulation/src/launch.cpp", "    if (at_barrier_ == alive_) release_barrier();\n    wait_here();\n    return barrier_result_;",
        "    release_barrier();\n    wait_here();\n    return barrier_result_;", {"probe": "barrier"}),
}


@pytest.fixture(scope="session")
def mutants(tmp_path_factory, emulated_build):
    """Every mutant built into one folder, one after the other (only the changed files recompile)."""
    root = tmp_path_factory.mktemp("mutants")
    source = root / "csrc"
    shutil.copytree(REPO / "runtime" / "csrc", source)
    built = {}
    for name, (path, old, new, catch) in MUTANTS.items():
        original = (source / path).read_text()
        assert original.count(old) == 1, f"mutant {name}: {old!r} is not in {path} exactly once; update MUTANTS"
        (source / path).write_text(original.replace(old, new))
        target = "freedit_emulation_probes" if "probe" in catch else "freedit_kernels_emu"
        build = kernels.build_emulated(root / "build", source_dir=source, targets=(target,))
        (source / path).write_text(original)
        built[name] = root / f"{name}.so"
        shutil.copy(build.probes if "probe" in catch else build.library, built[name])
    return built


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_planted_bug_is_caught(mutants, mutant):
    catch = MUTANTS[mutant][3]
    if "probe" in catch:
        lib = kernels.load_probes(mutants[mutant])
        if catch["probe"] == "shared":
            lib.emulation.set_threads(4)
            out = np.zeros(64, dtype=np.int32)
            assert lib.probe_shared_per_block(32, 64, 1500, _ptr(out)) == 0
            assert np.any(out[0::2] != 64) or np.any(out[1::2]), "blocks did not see each other's __shared__"
        else:
            out = np.zeros(7 * 256, dtype=np.int32)
            assert lib.probe_neighbours(7, 256, 3, 1, _ptr(out)) == 0
            assert not np.array_equal(out, _neighbour_expected(7, 256, 3))
        return
    k = kernels.Kernels(mutants[mutant])
    outcome = {}
    for schedule in SCHEDULES:
        k.emulation.set_schedule(schedule)
        for check in catch["checks"]:
            mem = kernels.LibraryMemory(k)
            try:
                outcome[(schedule, check)] = kernels.CHECKS[check](k, mem, np.random.default_rng([2024, len(check)]))
            finally:
                mem.close()
    failed = {key for key, result in outcome.items() if not result["passed"]}
    for schedule in catch["schedules"]:
        missed = [check for check in catch["checks"] if (schedule, check) not in failed]
        assert not missed, f"{mutant}: {missed} passed under the {schedule} schedule"
