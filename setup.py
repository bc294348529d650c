"""Build hook: `pip install .` also builds the CUDA kernels library where nvcc and cmake are found.

All metadata is in pyproject.toml; this file only extends build_py. The library
(libfreedit_kernels.so, runtime/csrc + CMakeLists.txt) is copied into freedit/runtime/lib/, where
freedit.runtime.kernels finds it. Without nvcc or cmake, or if the build fails, the package installs
as before (the numpy runtime needs no kernels) and one warning line says why.

Architectures: $FREEDIT_KERNEL_ARCHS (CMake syntax, e.g. "80;86;89;90;120"), else SASS for the GPUs
nvidia-smi reports, else PTX for compute_80 only (one architecture: fast on a CPU-only machine; the
driver JIT-compiles it for any GPU from SM 8.0 on). FREEDIT_BUILD_KERNELS=0 skips the build.
An editable install (pip install -e .) builds into build/kernels/ unless a library is already there.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
LIB_NAME = "libfreedit_kernels.so"
BUILD_TIMEOUT_S = 1800


def _say(message: str) -> None:
    print(f"freedit: {message}", file=sys.stderr, flush=True)


def kernels_wanted(env=os.environ) -> bool:
    return env.get("FREEDIT_BUILD_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def missing_tools(env=os.environ) -> list[str]:
    """Which of nvcc and cmake cannot be found (nvcc: $CUDACXX or PATH)."""
    path = env.get("PATH")
    missing = []
    if not (env.get("CUDACXX") and Path(env["CUDACXX"]).is_file()) and not shutil.which("nvcc", path=path):
        missing.append("nvcc")
    if not shutil.which("cmake", path=path):
        missing.append("cmake")
    return missing


def kernel_archs(env=os.environ) -> str:
    """CMAKE_CUDA_ARCHITECTURES for this build (see the module docstring)."""
    override = env.get("FREEDIT_KERNEL_ARCHS", "").strip()
    if override:
        return override
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        try:
            result = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], check=False,
                                    capture_output=True, text=True, timeout=60)
            caps = sorted({int(major) * 10 + int(minor)
                           for major, minor in re.findall(r"^\s*(\d+)\.(\d+)\s*$", result.stdout, re.MULTILINE)})
            if result.returncode == 0 and caps:
                return ";".join(f"{cap}-real" for cap in caps)
        except (OSError, subprocess.SubprocessError):
            pass
    return "80-virtual"


def build_kernels(build_dir: Path, archs: str) -> Path:
    """Configure and build the library in ``build_dir``; its path. Raises on failure."""
    cmake = shutil.which("cmake")
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    for command in ([cmake, "-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CUDA_ARCHITECTURES={archs}"],
                    [cmake, "--build", str(build_dir), "-j", jobs]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if result.returncode:
            lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            compiler = [line for line in lines if re.search(r"(\(\d+\)|:\d+:\d+): (fatal )?error", line)]
            cmake = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("CMake Error at")]
            other = [line for line in lines if "error" in line.lower()]
            reason = (compiler or cmake or other or lines[-1:] or ["no output"])[0]
            raise RuntimeError(f"`{Path(command[0]).name} {command[1]} ...` exited {result.returncode}: {reason}")
    lib = build_dir / LIB_NAME
    if not lib.is_file():
        raise RuntimeError(f"the build made no {LIB_NAME}")
    return lib


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        self.build_kernels()

    def build_kernels(self) -> None:
        editable = bool(getattr(self, "editable_mode", False))
        dest = Path(self.build_lib) / "freedit" / "runtime" / "lib"
        if not editable and (dest / LIB_NAME).is_file():  # never ship a stale library from an earlier build
            (dest / LIB_NAME).unlink()
        if not kernels_wanted():
            _say("FREEDIT_BUILD_KERNELS=0: CUDA kernels not built")
            return
        missing = missing_tools()
        if missing:
            _say(f"WARNING: CUDA kernels not built ({' and '.join(missing)} not found); "
                 "the numpy runtime works without them, see docs/KERNELS.md to build them")
            return
        archs = kernel_archs()
        start = time.perf_counter()
        try:
            if editable:  # freedit.runtime.kernels looks in build/kernels/ of the checkout
                build_dir = HERE / "build" / "kernels"
                if (build_dir / LIB_NAME).is_file():
                    _say(f"CUDA kernels already built in {build_dir}; not rebuilt")
                    return
                lib = build_kernels(build_dir, archs)
            else:
                with tempfile.TemporaryDirectory(prefix="freedit-kernels-") as tmp:
                    lib = build_kernels(Path(tmp), archs)
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(lib, dest / LIB_NAME)
                    lib = dest / LIB_NAME
        except Exception as err:  # noqa: BLE001 - never fail the install: the kernels are optional
            _say(f"WARNING: CUDA kernels not built ({type(err).__name__}: {err}); "
                 "the numpy runtime works without them, see docs/KERNELS.md to build them")
            return
        _say(f"built CUDA kernels for {archs} in {time.perf_counter() - start:.0f} s: {lib}")


class KernelsDistribution(Distribution):
    """A platform wheel when it may carry the kernels library (a shared object)."""

    def has_ext_modules(self):
        return kernels_wanted() and not missing_tools()


def _cmdclass() -> dict:
    commands = {"build_py": BuildPyWithKernels}
    try:
        from setuptools.command.bdist_wheel import bdist_wheel
    except ImportError:  # setuptools < 70.1
        try:
            from wheel.bdist_wheel import bdist_wheel
        except ImportError:
            return commands

    class BdistWheel(bdist_wheel):
        def get_tag(self):  # the library does not depend on the Python version: py3-none-<platform>
            python, abi, plat = super().get_tag()
            return ("py3", "none", plat) if not self.root_is_pure else (python, abi, plat)

    commands["bdist_wheel"] = BdistWheel
    return commands


if __name__ == "__main__":
    setup(cmdclass=_cmdclass(), distclass=KernelsDistribution)
