"""The CUDA kernels library (runtime/csrc, runtime/kernels.py, docs/KERNELS.md).

Without a GPU (CI): build for SM 80/86/89/90/120, exported C ABI, SASS per architecture, ABI
version, the binding's refusals of bad input (also on the host emulation, with real emulated device
memory), the library's host references (its own Philox and residual code on the CPU) against the
numpy oracle. The kernels themselves run in CI on the host emulation of the same sources
(tests/test_kernels_emulated.py). With a GPU (marked ``gpu``): every kernel against the numpy
oracle (runtime/noise.py, ops.py, coupling.py), cupy buffers, and the ``--selftest`` entry point.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from freedit.runtime import coupling, kernels, noise
from freedit.runtime.round import ATTEMPT_SHIFT
from freedit.runtime.kernels import DeviceArray

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 86, 89, 90, 120)


def _gpu_status() -> tuple[bool, str]:
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        return False, "no CUDA GPU: cuda-python is not installed, cudaGetDeviceCount cannot be asked"
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0:
        return False, f"no CUDA GPU: cudaGetDeviceCount returned {int(err)} ({getattr(err, 'name', err)})"
    if count < 1:
        return False, "no CUDA GPU: cudaGetDeviceCount returned 0 devices"
    return True, ""


HAVE_GPU, NO_GPU_REASON = _gpu_status()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON or "a GPU is present")]


# ---- building ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def built_library(tmp_path_factory):
    """One CMake build of the library for the five architectures, shared by every test."""
    missing = [tool for tool in ("nvcc", "cmake") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"cannot build the CUDA kernels: {' and '.join(missing)} not on PATH")
    build = tmp_path_factory.mktemp("kernels_build")
    archs = ";".join(str(a) for a in ARCHS)
    start = time.perf_counter()
    for command in (["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CUDA_ARCHITECTURES={archs}"],
                    ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            pytest.fail(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    seconds = time.perf_counter() - start
    lib = build / kernels.LIB_NAME
    assert lib.is_file(), f"the build made no {kernels.LIB_NAME} in {build}"
    return {"path": lib, "seconds": seconds, "log": result.stdout + result.stderr}


@pytest.fixture(scope="session")
def lib(built_library):
    return kernels.load(built_library["path"])


def _nv_fatbin_entries(path: Path) -> list[tuple[str, int]]:
    """(kind 'ptx'|'sass', sm) of every entry in the ELF section .nv_fatbin (cuobjdump's --list-elf/-ptx)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(offset):
        return data[names_at + offset:data.index(b"\0", names_at + offset)].decode()

    fatbin = next((data[s[4]:s[4] + s[5]] for s in sections if name(s[0]) == ".nv_fatbin"), None)
    assert fatbin is not None, "no .nv_fatbin section: no device code in the library"
    entries, pos = [], 0
    while pos + 16 <= len(fatbin):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", fatbin, pos)
        if magic != 0xBA55ED50:  # padding between the per-object fatbins
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, entry)
            arch = struct.unpack_from("<I", fatbin, entry + 28)[0]
            entries.append(({1: "ptx", 2: "sass"}.get(kind, f"kind{kind}"), arch))
            entry += entry_header + payload
        pos = end
    return entries


def test_build_for_five_architectures_exports_the_abi(built_library):
    path = built_library["path"]
    assert "warning" not in built_library["log"].lower(), built_library["log"]
    if shutil.which("nm"):
        out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
        exported = set(re.findall(r"\sT\s(\w+)$", out.stdout, re.MULTILINE))
        assert set(kernels.ENTRY_POINTS) <= exported, f"missing exports: {set(kernels.ENTRY_POINTS) - exported}"
        leaked = sorted(s for s in exported if s.startswith("cuda"))
        assert not leaked, f"the static CUDA runtime leaks symbols: {leaked[:5]}"
    else:
        import ctypes

        handle = ctypes.CDLL(str(path))
        assert all(hasattr(handle, name) for name in kernels.ENTRY_POINTS)
    # SASS for every architecture (cuobjdump where installed, else the fatbin headers directly)
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", str(path)], capture_output=True, text=True,
                                 check=True).stdout
        sass = {int(m) for m in re.findall(r"\.sm_(\d+)\w*\.cubin", listing)}
    else:
        sass = {arch for kind, arch in _nv_fatbin_entries(path) if kind == "sass"}
    assert sass == set(ARCHS), f"SASS for {sorted(sass)}, expected {ARCHS}"


def test_loads_and_checks_the_abi_version(built_library, monkeypatch):
    header = (REPO / "runtime" / "csrc" / "freedit_kernels.h").read_text()
    declared = int(re.search(r"#define FREEDIT_KERNELS_ABI_VERSION (\d+)", header).group(1))
    assert declared == kernels.ABI_VERSION
    monkeypatch.setenv(kernels.ENV_LIB, str(built_library["path"]))
    assert kernels.find_library() == built_library["path"]
    k = kernels.Kernels()
    assert k.abi_version == kernels.ABI_VERSION
    count, code = k.device_count()
    assert (code == 0 and count >= 1) if HAVE_GPU else (code != 0 and count == 0)
    built = kernels.ABI_VERSION
    monkeypatch.setattr(kernels, "ABI_VERSION", built + 1)
    stale = rf"(?s)ABI version {built}, this binding needs {built + 1} \(a stale build\); to build it.*cmake -S \. -B"
    with pytest.raises(RuntimeError, match=stale):
        kernels.Kernels(built_library["path"])


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV_LIB, str(tmp_path / "nope.so"))
    with pytest.raises(kernels.KernelsNotFound, match="nope.so is not a file"):
        kernels.load()
    monkeypatch.delenv(kernels.ENV_LIB)
    monkeypatch.setattr(kernels, "library_candidates", lambda emulated=False: [tmp_path / "a" / kernels.LIB_NAME])
    with pytest.raises(kernels.KernelsNotFound) as info:
        kernels.find_library()
    message = str(info.value)
    assert "cmake -S . -B build/kernels -DCMAKE_BUILD_TYPE=Release" in message
    assert "cmake --build build/kernels -j2" in message and str(tmp_path / "a") in message


def test_missing_emulation_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV_EMU_LIB, str(tmp_path / "nope_emu.so"))
    with pytest.raises(kernels.KernelsNotFound, match=r"FREEDIT_KERNELS_EMU_LIB=.*nope_emu.so is not a file"):
        kernels.load(emulated=True)
    monkeypatch.delenv(kernels.ENV_EMU_LIB)
    candidates = kernels.library_candidates(emulated=True)
    assert candidates[-1] == REPO / "build" / "kernels-emu" / kernels.EMU_LIB_NAME
    monkeypatch.setattr(kernels, "library_candidates", lambda emulated=False: [tmp_path / "b" / kernels.EMU_LIB_NAME])
    with pytest.raises(kernels.KernelsNotFound) as info:
        kernels.find_library(emulated=True)
    message = str(info.value)
    assert "host emulation" in message and str(tmp_path / "b") in message
    assert "cmake -S . -B build/kernels-emu -DFREEDIT_KERNELS_EMULATION=ON" in message
    assert "cmake --build build/kernels-emu -j2" in message


# ---- the library's host references against the numpy oracle (no GPU needed) ---------------------
def _keys(rng, rows):
    sample = rng.integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32)
    step = rng.integers(0, 1000, rows).astype(np.uint32)
    purpose = (rng.integers(1, 7, rows) + (rng.integers(0, 1 << 20, rows) << 8)).astype(np.uint32)
    return sample, step, purpose


def test_host_philox_is_noise_py(lib, rng):
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    keys = _keys(rng, 5)
    for count in (1, 6, 13, 64):
        assert np.array_equal(lib.philox_host(seed, *keys, count, "bits"),
                              noise._blocks(seed, *keys, count)[:, :count])
        uniform = lib.philox_host(seed, *keys, count, "uniform")
        assert np.array_equal(uniform.view(np.uint64), noise.uniform(seed, *keys, count).view(np.uint64))
        normal = lib.philox_host(seed, *keys, count, "normal")
        assert np.max(np.abs(normal - noise.normal(seed, *keys, (count,)))) <= 1e-6


def test_host_residual_is_coupling_sample_residual(lib, rng):
    """Same keys (round_numpy.py's residual draw) -> the same accepted attempt, the same sample."""
    rows, shape = 10, (2, 4, 4)
    seed = int(rng.integers(0, 2**62))
    gauss = kernels._gaussian_pair(rng, (rows, *shape), np.geomspace(0.003, 1.0, rows))
    ids = rng.integers(0, 1000, rows).astype(np.uint32)
    steps = rng.integers(1, 250, rows).astype(np.uint32)

    def draw(r, attempts):
        purpose = attempts.astype(np.int64) << ATTEMPT_SHIFT
        return (noise.normal(seed, ids[r], steps[r], noise.Purpose.RESIDUAL + purpose, shape),
                noise.uniform(seed, ids[r], steps[r], noise.Purpose.RESIDUAL_ACCEPT + purpose, 1)[:, 0])

    for cap in (coupling.MAX_RESIDUAL_ATTEMPTS, 3):
        ref_out, ref_props, ref_cap = coupling.sample_residual(*gauss, draw, max_attempts=cap)
        out, props, cap_hit = lib.residual_host(*gauss, seed=seed, sample=ids, step=steps, max_attempts=cap)
        assert np.array_equal(props, ref_props) and np.array_equal(cap_hit, ref_cap)
        assert kernels._rel_err(out, ref_out) <= 1e-5
        if cap > 3:  # attempts beyond two of the kernel's 8-attempt rounds are exercised
            assert ref_props.max() > 16
    index = np.array([2, -1, 7], dtype=np.int32)
    sentinel = lib.residual_host(*gauss, seed=seed, sample=ids[:3], step=steps[:3], index=index)
    assert sentinel[1][1] == 0 and not sentinel[2][1]


# ---- the binding refuses bad input before CUDA (fake device pointers without a GPU) --------------
@pytest.fixture
def dev(lib):
    """dev(shape, dtype): a device array; real device memory where there is a GPU, else a fake pointer
    (nothing is ever launched on those: every case below is refused first)."""
    if HAVE_GPU:
        mem = kernels.LibraryMemory(lib)
        yield mem.empty
        mem.close()
    else:
        counter = iter(range(1, 1 << 20))
        yield lambda shape, dtype: DeviceArray(0x7F0000000000 + (next(counter) << 20), shape, dtype)


class _Strided:
    """A __cuda_array_interface__ object with explicit, non-contiguous strides."""

    def __init__(self, ptr, shape, typestr="<f4", strides=None, readonly=False):
        self.__cuda_array_interface__ = {"data": (ptr, readonly), "shape": shape, "typestr": typestr,
                                         "strides": strides, "version": 3}


def _refusals(dev, lib):
    """(id, call, exception, message regex) for every refusal case."""
    B, C, H, W = 3, 4, 2, 2
    x, ev = dev((B, C, H, W), "float32"), dev((B, 2 * C, H, W), "float32")
    steps, table = dev((B,), "int32"), dev((50, 6), "float32")
    mean, lv = dev((B, C, H, W), "float32"), dev((B, C, H, W), "float32")
    keys = [dev((B,), "uint32") for _ in range(3)]
    r1, r2 = dev((7,), "float64"), dev((7,), "float64")
    win, acc = dev((3,), "int32"), dev((3,), "int32")
    host = np.zeros((B, C, H, W), dtype=np.float32)
    null = DeviceArray(0, (B, C, H, W), "float32")
    T = lib.transition
    return [
        ("transition-x-dtype", lambda: T(dev((B, C, H, W), "float64"), ev, steps, table, mean, lv), TypeError,
         r"x: dtype float64, expected float32"),
        ("transition-eps-channels", lambda: T(x, dev((B, 3, H, W), "float32"), steps, table, mean, lv), ValueError,
         r"eps_v: 3 channels, expected 4 \(eps\) or 8"),
        ("transition-eps-dtype", lambda: T(x, dev((B, 8, H, W), "int32"), steps, table, mean, lv), TypeError,
         r"eps_v: dtype int32"),
        ("transition-eps-rows", lambda: T(x, dev((B + 1, 8, H, W), "float16"), steps, table, mean, lv), ValueError,
         r"eps_v: shape .* does not match x"),
        ("transition-steps-rows", lambda: T(x, ev, dev((B + 1,), "int32"), table, mean, lv), ValueError,
         r"steps: shape \(4,\), expected \(3,\)"),
        ("transition-steps-dtype", lambda: T(x, ev, dev((B,), "int64"), table, mean, lv), TypeError,
         r"steps: dtype int64, expected int32"),
        ("transition-table", lambda: T(x, ev, steps, dev((50, 5), "float32"), mean, lv), ValueError,
         r"table: shape \(50, 5\), expected \(num_steps, 6\)"),
        ("transition-out-shape", lambda: T(x, ev, steps, table, dev((B, C, H, 3), "float32"), lv), ValueError,
         r"mean: shape .* does not match x"),
        ("transition-variance", lambda: T(x, dev((B, C, H, W), "float32"), steps, table, mean, lv,
                                          fixed_variance="medium"), ValueError, r"unknown fixed variance"),
        ("transition-host-array", lambda: T(host, ev, steps, table, mean, lv), TypeError,
         r"x: got a host \(numpy\) array; the kernels need device memory"),
        ("transition-null", lambda: T(null, ev, steps, table, mean, lv), ValueError, r"x: null device pointer"),
        ("transition-list", lambda: T([1.0], ev, steps, table, mean, lv), TypeError, r"x: expected a device array"),
        ("transition-noncontiguous", lambda: T(_Strided(0x7E0000000000, (B, C, H, W), strides=(128, 32, 8, 4)),
                                               ev, steps, table, mean, lv), ValueError, r"x: not C-contiguous"),
        ("transition-readonly-out", lambda: T(x, ev, steps, table, _Strided(0x7E0000000000, (B, C, H, W),
                                                                            readonly=True), lv),
         ValueError, r"mean: read-only array passed as an output"),
        ("transition-bf16-typestr", lambda: T(x, _Strided(0x7E0000000000, (B, 8, H, W), typestr="<V2"), steps,
                                              table, mean, lv), TypeError, r"DeviceArray.of\(array_of_uint16"),
        ("transition-stream", lambda: T(x, ev, steps, table, mean, lv, stream="default"), TypeError, r"stream:"),
        ("cfg-odd-rows", lambda: lib.cfg_combine(dev((3, 8, H, W), "float32"), dev((1, 8, H, W), "float32"),
                                                 channels=4, scale=4.0), ValueError, r"\[cond; null\], an even"),
        ("cfg-out-shape", lambda: lib.cfg_combine(dev((4, 8, H, W), "float32"), dev((4, 8, H, W), "float32"),
                                                  channels=4, scale=4.0), ValueError,
         r"out: shape .* \(half of eps_v's rows\)"),
        ("cfg-channels", lambda: lib.cfg_combine(dev((4, 4, H, W), "float32"), dev((2, 4, H, W), "float32"),
                                                 channels=5, scale=4.0), ValueError, r"channels = 5 must be in"),
        ("cfg-mode", lambda: lib.cfg_combine(dev((4, 4, H, W), "float32"), dev((2, 4, H, W), "float32"),
                                             channels=4, scale=4.0, mode="some"), ValueError, r"unknown CFG mode"),
        ("cfg-out-dtype", lambda: lib.cfg_combine(dev((4, 4, H, W), "float16"), dev((2, 4, H, W), "float16"),
                                                  channels=4, scale=4.0), TypeError, r"out: dtype float16"),
        ("philox-rows", lambda: lib.philox_uniform(1, dev((B + 1,), "uint32"), keys[1], keys[2],
                                                   dev((B, 5), "float64")), ValueError,
         r"sample: shape \(4,\), expected \(3,\): one value per row of out"),
        ("philox-out-dtype", lambda: lib.philox_uniform(1, *keys, dev((B, 5), "float32")), TypeError,
         r"out: dtype float32, expected float64"),
        ("philox-key-dtype", lambda: lib.philox_bits(1, dev((B,), "float32"), keys[1], keys[2],
                                                     dev((B, 4), "uint32")), TypeError, r"sample: dtype float32"),
        ("philox-seed", lambda: lib.philox_normal("7", *keys, dev((B, 4), "float32")), TypeError, r"seed must be"),
        ("ddpm-noise-shape", lambda: lib.ddpm_step(mean, lv, steps, dev((B, C, H, 3), "float32"), mean),
         ValueError, r"noise: shape .* does not match mean"),
        ("log-ratio-out", lambda: lib.log_ratio(x, mean, lv, mean, lv, dev((B,), "float32")), TypeError,
         r"out: dtype float32, expected float64"),
        ("log-ratio-rows", lambda: lib.log_ratio(x, mean, lv, dev((B, C, H, 1), "float32"), lv,
                                                 dev((B,), "float64")), ValueError, r"mean_q: shape"),
        ("accept-uniform-length", lambda: lib.accept_window(r1, dev((6,), "float64"), win, acc), ValueError,
         r"uniform: 6 window rows but log_r has 7"),
        ("accept-gamma-length", lambda: lib.accept_window(r1, r2, win, acc, gamma=dev((8,), "float64")),
         ValueError, r"gamma: 8 window rows but log_r has 7"),
        ("accept-accepted-length", lambda: lib.accept_window(r1, r2, win, dev((4,), "int32")), ValueError,
         r"accepted: shape \(4,\), expected \(3,\): one value per sample \(as windows\)"),
        ("accept-reject-row-length", lambda: lib.accept_window(r1, r2, win, acc, reject_row=dev((2,), "int32")),
         ValueError, r"reject_row: shape \(2,\), expected \(3,\)"),
        ("accept-windows-2d", lambda: lib.accept_window(r1, r2, dev((3, 1), "int32"), acc), ValueError,
         r"windows: shape \(3, 1\), expected \(samples,\)"),
        ("accept-windows-dtype", lambda: lib.accept_window(r1, r2, dev((3,), "int64"), acc), TypeError,
         r"windows: dtype int64, expected int32"),
        ("accept-windows-host", lambda: lib.accept_window(r1, r2, np.array([2, 2, 3], dtype=np.int32), acc),
         TypeError, r"windows: got a host \(numpy\) array"),
        ("accept-log-r-2d", lambda: lib.accept_window(dev((7, 1), "float64"), r2, win, acc), ValueError,
         r"log_r: shape \(7, 1\), expected \(rows,\)"),
        ("accept-missing-uniform", lambda: lib.accept_window(r1, None, win, acc), ValueError,
         r"log_r and uniform are both needed"),
        ("reflect-rows", lambda: lib.reflect(x, mean, mean, lv, dev((B + 2, C, H, W), "float32")), ValueError,
         r"out has 5 rows but the inputs 3: pass index"),
        ("reflect-index-length", lambda: lib.reflect(x, mean, mean, lv, dev((B + 2, C, H, W), "float32"),
                                                     index=dev((B,), "int32")), ValueError,
         r"index: shape \(3,\), expected \(5,\)"),
        ("reflect-out-elements", lambda: lib.reflect(x, mean, mean, lv, dev((B, C, H, 1), "float32")), ValueError,
         r"out: shape .* does not match x"),
        ("residual-proposals", lambda: lib.residual(mean, lv, mean, lv, dev((B, C, H, W), "float32"),
                                                    dev((B + 1,), "int32"), dev((B,), "int32"), seed=1,
                                                    sample=keys[0], step=keys[1]), ValueError,
         r"proposals: shape \(4,\), expected \(3,\)"),
        ("residual-keys", lambda: lib.residual(mean, lv, mean, lv, dev((B, C, H, W), "float32"),
                                               dev((B,), "int32"), dev((B,), "int32"), seed=1,
                                               sample=dev((B - 1,), "uint32"), step=keys[1]), ValueError,
         r"sample: shape \(2,\), expected \(3,\)"),
        ("residual-max-attempts", lambda: lib.residual(mean, lv, mean, lv, dev((B, C, H, W), "float32"),
                                                       dev((B,), "int32"), dev((B,), "int32"), seed=1,
                                                       sample=keys[0], step=keys[1], max_attempts=0), ValueError,
         r"max_attempts must be in 1\.\."),
        ("residual-index-dtype", lambda: lib.residual(mean, lv, mean, lv, dev((2, C, H, W), "float32"),
                                                      dev((2,), "int32"), dev((2,), "int32"), seed=1,
                                                      sample=dev((2,), "int32"), step=dev((2,), "int32"),
                                                      index=dev((2,), "uint32")), TypeError,
         r"index: dtype uint32, expected int32"),
    ]


def test_binding_refuses_bad_input_before_cuda(dev, lib):
    cases = _refusals(dev, lib)
    assert len({case[0] for case in cases}) == len(cases)
    for case_id, call, exception, pattern in cases:
        with pytest.raises(exception, match=pattern):
            call()


def test_binding_refuses_bad_input_on_the_emulation(emulated_kernels):
    """The same refusals with real (emulated) device memory, where the pointer query answers."""
    mem = kernels.LibraryMemory(emulated_kernels)
    try:
        before = emulated_kernels.lib.freedit_launch_count()
        for case_id, call, exception, pattern in _refusals(mem.empty, emulated_kernels):
            with pytest.raises(exception, match=pattern):
                call()
        assert emulated_kernels.lib.freedit_launch_count() == before, "a refused call reached a kernel"
    finally:
        mem.close()


def test_host_memory_refused_by_the_emulation(emulated_kernels):
    k, host = emulated_kernels, np.zeros((2, 4), dtype=np.float32)
    mem = kernels.LibraryMemory(k)
    pinned = ctypes.c_void_p()
    assert k.lib.freedit_rt_host_alloc(ctypes.byref(pinned), host.nbytes) == 0
    try:
        keys = [mem.empty((2,), "uint32") for _ in range(3)]
        with pytest.raises(ValueError, match=r"out: pointer 0x[0-9a-f]+ is unregistered host memory, not device"):
            k.philox_normal(1, *keys, DeviceArray(host.ctypes.data, host.shape, "float32"))
        with pytest.raises(ValueError, match=r"out: pointer 0x[0-9a-f]+ is pinned host memory, not device"):
            k.philox_normal(1, *keys, DeviceArray(pinned.value, host.shape, "float32"))
        out = k.philox_normal(1, *keys, mem.empty((2, 4), "float32"))  # device memory: accepted
        assert np.isfinite(mem.download(out)).all()
    finally:
        k.lib.freedit_rt_host_free(pinned)
        mem.close()


def test_valid_call_without_a_gpu_raises_the_cuda_error_text(lib):
    if HAVE_GPU:
        pytest.skip("a GPU is present: the fake pointers below would be refused as host memory instead")
    fake = lambda shape, dtype: DeviceArray(0x7F0000000000, shape, dtype)
    with pytest.raises(kernels.CudaError) as info:
        lib.philox_normal(1, fake((2,), "uint32"), fake((2,), "uint32"), fake((2,), "uint32"),
                          fake((2, 4), "float32"))
    err = info.value
    assert err.entry == "freedit_philox_normal" and err.code != 0
    assert err.text == lib.error_string(err.code) and err.name.startswith("cudaError")
    assert f"CUDA error {err.code} ({err.name}): {err.text}" in str(err)


def test_setup_hook_chooses_architectures(tmp_path):
    spec = importlib.util.spec_from_file_location("freedit_setup_hook", REPO / "setup.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)  # not __main__: setup() is not called
    empty = tmp_path / "empty"
    empty.mkdir()
    assert hook.kernel_archs({"FREEDIT_KERNEL_ARCHS": "86;90", "PATH": str(empty)}) == "86;90"
    assert hook.kernel_archs({"PATH": str(empty)}) == "80-virtual"
    smi = tmp_path / "smi" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\nprintf '9.0\\n8.6\\n9.0\\n'\n")
    smi.chmod(0o755)
    assert hook.kernel_archs({"PATH": str(smi.parent)}) == "86-real;90-real"
    assert not hook.kernels_wanted({"FREEDIT_BUILD_KERNELS": "0"}) and hook.kernels_wanted({})
    assert hook.missing_tools({"PATH": str(empty)}) == ["nvcc", "cmake"]


# ---- on a GPU: every kernel against the numpy oracle ---------------------------------------------
class CupyMemory:
    """The checks' allocator on cupy (imported only here, on a GPU)."""

    def __init__(self):
        import cupy

        self.cp = cupy

    def empty(self, shape, dtype):
        if dtype == "bfloat16":
            return DeviceArray.of(self.cp.empty(shape, dtype=self.cp.uint16), "bfloat16")
        return self.cp.empty(shape, dtype=dtype)

    def upload(self, host, dtype=None):
        return self.cp.asarray(np.ascontiguousarray(host))

    def download(self, arr):
        if isinstance(arr, DeviceArray):
            raise TypeError("the checks download only arrays they allocated through this memory")
        return self.cp.asnumpy(arr)

    def close(self):
        self.cp.cuda.Stream.null.synchronize()


@pytest.mark.parametrize("check", list(kernels.CHECKS))
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON or "a GPU is present")
def test_kernel_matches_numpy_oracle(lib, check):
    pytest.importorskip("cupy", reason="the GPU oracle tests allocate with cupy")
    mem = CupyMemory()
    result = kernels.CHECKS[check](lib, mem, np.random.default_rng([2024, len(check)]))
    mem.close()
    assert result["passed"], json.dumps(result, indent=1, default=str)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON or "a GPU is present")
def test_selftest_entry_point(built_library):
    result = subprocess.run([sys.executable, "-m", "freedit.runtime.kernels", "--selftest", "--lib",
                             str(built_library["path"])], capture_output=True, text=True, timeout=600, check=False)
    summary = json.loads(result.stdout)
    assert result.returncode == 0 and summary["passed"], result.stdout + result.stderr
    assert set(summary["checks"]) == set(kernels.CHECKS)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON or "a GPU is present")
def test_host_memory_refused_on_a_gpu(lib):
    host = np.zeros((2, 4), dtype=np.float32)
    mem = kernels.LibraryMemory(lib)
    try:
        keys = [mem.empty((2,), "uint32") for _ in range(3)]
        with pytest.raises(ValueError, match=r"out: pointer 0x[0-9a-f]+ is unregistered host memory, not device"):
            lib.philox_normal(1, *keys, DeviceArray(host.ctypes.data, host.shape, "float32"))
    finally:
        mem.close()
