"""setuptools entry point; the metadata lives in pyproject.toml.

This file adds the optional extension ``fastbert._C`` (csrc/): the fused embeddings + LayerNorm op with
a CPU kernel and, when a CUDA toolkit and a CUDA build of torch are present, a CUDA kernel. It is built
with torch.utils.cpp_extension against the torch that is already installed, hence
``pip install --no-build-isolation``. Without it fastbert runs its Triton and PyTorch paths.

Environment:

- ``FASTBERT_BUILD_CUDA``: unset = build what is possible (CUDA + CPU kernels with nvcc and a CUDA
  torch; CPU kernels only with a CPU-only torch, or without nvcc; nothing without torch or a compiler),
  say what and why, and never fail the install; ``1`` = the CUDA extension is required: anything
  missing or any compile error fails the install; ``0`` = no extension.
- ``CUDA_HOME`` (or ``CUDA_PATH``): the CUDA toolkit root. If unset, the root that ``nvcc --dryrun``
  reports (``nvcc`` may be a wrapper script outside the toolkit, where torch's own guess fails).
- ``TORCH_CUDA_ARCH_LIST``: the GPU architectures, default ``8.0;9.0;12.0`` (sm_80, sm_90, sm_120).
- ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "fastbert._C"
CPP_SOURCES = ["csrc/ops.cpp"]
CUDA_SOURCES = ["csrc/embedding_layer_norm.cu"]
DEFAULT_ARCHS = "8.0;9.0;12.0"


def log(message: str) -> None:
    print(f"fastbert setup.py: {message}", file=sys.stderr, flush=True)


def _run(command: list[str], cwd: str | None = None) -> str:
    """The output of ``command``, or "" when it cannot run."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout + result.stderr


def cuda_root_from_nvcc(nvcc: str) -> str | None:
    """The toolkit root nvcc itself uses: the ``#$ TOP=`` line of ``nvcc --dryrun``."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "probe.cu"), "w") as f:
            f.write("\n")
        output = _run([nvcc, "--dryrun", "-c", "probe.cu", "-o", "probe.o"], cwd=tmp)
    for line in output.splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            root = os.path.realpath(match.group(1).strip())
            if os.path.isfile(os.path.join(root, "bin", "nvcc")):
                return root
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            return value, f"{var}={value}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:  # no guessed default location: the toolkit is the one nvcc on PATH reports, or none
        return None, "no nvcc on PATH and CUDA_HOME is not set"
    root = cuda_root_from_nvcc(nvcc)
    if root is None:
        return None, f"`{nvcc} --dryrun` did not report a toolkit root (set CUDA_HOME)"
    return root, f"`{nvcc} --dryrun` reports {root}"


def nvcc_version(cuda_home: str) -> str | None:
    output = _run([os.path.join(cuda_home, "bin", "nvcc"), "--version"])
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else None


def extension_kwargs() -> dict:
    mode = os.environ.get("FASTBERT_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FASTBERT_BUILD_CUDA={mode!r}: use 1 (require the CUDA extension), 0 (skip it), or unset")
    if mode == "0":
        log("FASTBERT_BUILD_CUDA=0: not building the fastbert._C extension")
        return {}
    required = mode == "1"

    def without(reason: str) -> dict:
        if required:
            raise SystemExit(f"FASTBERT_BUILD_CUDA=1, but {reason}")
        log(f"not building the fastbert._C extension: {reason}. fastbert will use its Triton/PyTorch paths.")
        return {}

    try:
        import torch
    except ImportError:
        return without("torch is not importable (install torch first, then this project with "
                       "`pip install --no-build-isolation`)")

    with_cuda, cuda_reason = False, ""
    cuda_home, how = find_cuda_home()
    if torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        cuda_reason = f"no CUDA toolkit found ({how})"
    else:
        toolkit = nvcc_version(cuda_home)
        if toolkit is None:
            cuda_reason = f"{cuda_home}/bin/nvcc --version did not run"
        elif toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
            cuda_reason = f"nvcc {toolkit} (at {cuda_home}) and torch's CUDA {torch.version.cuda} differ in major version"
        else:
            with_cuda = True
    if not with_cuda:
        if required:
            raise SystemExit(f"FASTBERT_BUILD_CUDA=1, but {cuda_reason}")
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return without(f"{cuda_reason}, and there is no C++ compiler ({compiler})")
        log(f"{cuda_reason}: building fastbert._C with its CPU kernel only")

    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported (its own guess from the nvcc on
        # PATH is wrong when nvcc is a wrapper script); set both the variable and the module global.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        log(f"building fastbert._C with CUDA: toolkit {cuda_home} ({how}), "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    from torch.utils import cpp_extension

    if with_cuda and cpp_extension.CUDA_HOME != cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    cxx_flags = ["-O3"]
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            EXTENSION,
            CPP_SOURCES + CUDA_SOURCES,
            define_macros=[("FASTBERT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--threads=2"]},
        )
    else:
        extension = cpp_extension.CppExtension(EXTENSION, CPP_SOURCES, extra_compile_args={"cxx": cxx_flags})

    # optional: setuptools then skips copying a module that was not built (editable and --inplace builds).
    extension.optional = not required

    class BuildExtension(cpp_extension.BuildExtension):
        """cpp_extension's builder (ninja); unless the extension is required, a failed build is reported
        and the install goes on without it (tests/test_extension_build.py then fails where the extension
        should have been built)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler or toolchain failure
                if required:
                    raise
                # A stale module from an earlier build must not be picked up instead.
                for stale in glob.glob(os.path.join(HERE, "fastbert", "_C.*")):
                    os.remove(stale)
                log(f"building fastbert._C FAILED ({type(error).__name__}: {error}); installing without it. "
                    "fastbert will use its Triton/PyTorch paths. Set FASTBERT_BUILD_CUDA=1 to make this an error.")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":  # also under setuptools' build backend; tests import this file for find_cuda_home
    setup(**extension_kwargs())
