"""The one place where an op chooses between its PyTorch reference and its fast kernel.

``FASTBERT_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): fast kernels on CUDA tensors, the PyTorch reference on the CPU;
- ``torch``: always the PyTorch reference;
- ``triton``: always the Triton kernels, also on CPU tensors when ``TRITON_INTERPRET=1``.

``FASTBERT_GEMM`` (read at every call) picks how a matmul with a fused epilogue runs when the Triton
backend is active:

- ``cublaslt`` (default): cuBLASLt's bias + activation epilogue (``torch._addmm_activation``) on
  CUDA tensors, one cuBLAS kernel. Its GELU is the tanh approximation: exact for ``gelu_tanh`` and
  ``relu`` models; for erf-GELU models (BERT's ``gelu``) it is taken in fp16 / bf16 only, where the
  approximation (at most 4.7e-4) is inside the 16-bit error budget; fp32 erf-GELU, autocast, CPU
  tensors and autograd run as ``cublas``. The default since the third H200 measurement, where it was faster than
  ``cublas`` at every measured shape (benchmarks/RESULTS.md).
- ``cublas``: PyTorch's matmul (cuBLAS), then the epilogue as its own Triton kernel (exact erf-GELU
  in every dtype);
- ``triton``: one Triton GEMM with the epilogue applied to its accumulator (``linear_activation``).
  Not the default: on the H200 it ran at 0.72 to 0.96x cuBLAS + the separate epilogue.

A call that must record autograd history (gradients enabled and an input that requires them) takes
the reference, whatever the setting, unless the op says it is differentiable: the Triton ops for
attention, bias + activation and bias + residual + LayerNorm register a backward (it recomputes the
PyTorch reference), so they keep their Triton forward under autograd; the embeddings do not.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("auto", "torch", "triton")
GEMMS = ("cublaslt", "cublas", "triton")
DEFAULT_GEMM = "cublaslt"
# use_backend / use_gemm overrides, per thread (one thread's block leaves the others' settings alone).
# threading.local rather than a ContextVar: torch.compile traces (and guards on) its reads with torch
# 2.11, where a ContextVar read breaks a fullgraph compile.
_overrides = threading.local()


def _setting(kind: str, variable: str, default: str, allowed: tuple[str, ...]) -> str:
    """This thread's override of ``kind``, else the environment ``variable`` (else ``default``),
    validated against ``allowed``."""
    name = (getattr(_overrides, kind, None) or os.environ.get(variable, default)).strip().lower()
    if name not in allowed:
        raise ValueError(f"{variable}={name!r} is not one of {', '.join(allowed)}")
    return name


def backend_setting() -> str:
    """The configured backend name (``use_backend``, else ``FASTBERT_BACKEND``), validated."""
    return _setting("backend", "FASTBERT_BACKEND", "auto", BACKENDS)


def gemm_setting() -> str:
    """The configured GEMM choice (``use_gemm``, else ``FASTBERT_GEMM``), validated."""
    return _setting("gemm", "FASTBERT_GEMM", DEFAULT_GEMM, GEMMS)


@contextlib.contextmanager
def _override(kind: str, name: str, allowed: tuple[str, ...], what: str):
    if name not in allowed:
        raise ValueError(f"{what} {name!r} is not one of {', '.join(allowed)}")
    previous = getattr(_overrides, kind, None)
    setattr(_overrides, kind, name)
    try:
        yield
    finally:
        setattr(_overrides, kind, previous)


def use_backend(name: str):
    """Force a backend inside a ``with`` block, in this thread (overrides ``FASTBERT_BACKEND``)."""
    return _override("backend", name, BACKENDS, "backend")


def use_gemm(name: str):
    """Force a GEMM choice inside a ``with`` block, in this thread (overrides ``FASTBERT_GEMM``). A CUDA
    graph keeps the kernels it captured: capture inside the block."""
    return _override("gemm", name, GEMMS, "GEMM")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (``torch.autograd.forward_ad.dual_level``, ``torch.func.jvp``):
    the fused ops register a backward only, so their kernels would drop the tangents (a jvp through
    them came out 0); the PyTorch references carry them."""
    return _forward_ad._current_level >= 0


def transform_active() -> bool:
    """Whether forward-mode AD or a ``torch.func`` transform (grad, vjp, jacrev, vmap) is on: the fused
    ops' autograd (``register_autograd``) has no functorch support (an error under ``torch.func.grad``)
    and no forward-mode rule (tangents dropped); the PyTorch references support both."""
    return forward_ad_active() or torch._C._are_functorch_transforms_active()


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    # Loops rather than any(<generator>) here and below: these run several times per op call, and a
    # generator costs about a microsecond of host time each (an eager small batch waits on it).
    if transform_active():  # any tensor may carry a tangent or be a transform's wrapper
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def use_triton(*tensors: torch.Tensor | None, differentiable: bool = False) -> bool:
    """Whether an op called on ``tensors`` runs its Triton kernel (True) or its reference (False).

    ``differentiable``: the op's Triton path has a backward, so needing autograd does not force the
    reference."""
    name = backend_setting()
    if name == "torch" or transform_active() or (not differentiable and needs_autograd(*tensors)):
        return False
    device = (tensors[0] if tensors[0] is not None else next(t for t in tensors if t is not None)).device
    if name == "triton":
        _check_triton_runs_on(device)
        return True
    return device.type == "cuda" and triton_available()


def _check_triton_runs_on(device: torch.device) -> None:
    if not triton_available():
        raise RuntimeError("FASTBERT_BACKEND=triton, but triton is not installed")
    if device.type != "cuda" and not triton_interpreter():
        raise RuntimeError(
            f"FASTBERT_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
            "(Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter)"
        )


def runnable_backend(device: torch.device) -> str:
    """The backend setting, after checking that its kernels can run on ``device``: what a job checks
    before it loads a model, rather than failing at its first batch."""
    name = backend_setting()
    if name == "triton":
        _check_triton_runs_on(torch.device(device))
    return name


def direct_launch(*tensors: torch.Tensor | None) -> bool:
    """Whether a Triton op may launch its kernel straight from Python rather than through its
    ``torch.library`` op: a plain eager call. The op's own path (dispatcher, ``wrap_triton``, the
    kernel-wrapper higher-order op) costs about 37 us more host time per call (measured with the
    launch itself stubbed out, 2-core development VM: 51 us against 14 us); a BERT-base forward
    makes 48 such calls (4 per layer). The op stays the path whenever something must see it:
    ``torch.compile`` tracing, a functorch transform, a dispatch mode (``FakeTensorMode``, a
    recorder), tensor subclasses, or autograd (its backward is registered on the op)."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _get_current_dispatch_mode() is not None):
        return False
    for t in tensors:
        if t is not None and type(t) not in PLAIN_TENSOR_TYPES:
            return False
    return not needs_autograd(*tensors)


# Tensors that are not subclasses: no fake, functional or other wrapper tensor.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

_SAME_DEVICE = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """A context that makes ``t``'s GPU the current CUDA device around a Triton launch. Triton launches
    on the current device (and its current stream), so tensors on another GPU (a model moved to
    ``cuda:1`` while ``cuda:0`` is current) would fail ("cannot be accessed from Triton") or run on the
    wrong device; PyTorch's own ops switch devices themselves. A shared no-op context for CPU tensors,
    for tensors on the current device, and where there is no CUDA device (fake CUDA tensors traced
    without a GPU). A plain CUDA tensor proves there is a GPU (``torch.cuda.is_available`` costs ~1.5 us
    a call, most of it an environment read)."""
    if t.is_cuda and (type(t) in PLAIN_TENSOR_TYPES or torch.cuda.is_available()):
        index = t.get_device()
        if index != torch.cuda.current_device():
            return torch.cuda.device(index)
    return _SAME_DEVICE


def check_eps(eps, what: str) -> float:
    """``eps`` as a float, refused unless finite and >= 0 (a negative or NaN one makes every row NaN)."""
    value = float(eps)
    if not 0 <= value < math.inf:  # NaN too; comparisons, not math.isfinite: a SymFloat under dynamic shapes
        raise ValueError(f"{what}: eps must be a finite number >= 0, got {eps}")
    return value


def check_dropout(dropout_p, what: str) -> None:
    """Refuse a dropout probability outside [0, 1] (NaN too), on every path alike: the kernels' paths
    tested only ``> 0`` (a negative or NaN one ran without dropout) where the references raised."""
    if not 0 <= dropout_p <= 1:  # comparisons: a SymFloat under dynamic shapes
        raise ValueError(f"{what}: dropout_p must be in [0, 1], got {dropout_p}")


def may_read_back(t: torch.Tensor) -> bool:
    """Whether reading ``t`` on the host is allowed here: not while tracing (torch.compile), not on fake
    tensors (FakeTensorMode), not inside CUDA-graph capture."""
    if torch.compiler.is_compiling() or is_fake(t):
        return False
    return not capturing(t)


def capturing(t: torch.Tensor) -> bool:
    """Whether work on ``t``'s device is being captured into a CUDA graph (its current stream). False
    for CPU tensors and where there is no CUDA device (fake CUDA tensors traced without a GPU)."""
    return t.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _gpu(index: int) -> tuple[int, int]:
    """(compute capability as 10 * major + minor, SM count) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count


def gpu_description(t: torch.Tensor) -> tuple[int, int]:
    """(compute capability as 10 * major + minor, SM count) of ``t``'s GPU: what sizes the kernels'
    tiles and grids. An H100's where there is no GPU to ask (CPU tensors under the interpreter, fake
    CUDA tensors traced without a GPU). A plain CUDA tensor proves there is a GPU (see
    ``device_guard``), so a launch pays a dictionary lookup here."""
    if t.is_cuda and (type(t) in PLAIN_TENSOR_TYPES or torch.cuda.is_available()):
        return _gpu(t.get_device())
    return 90, 132


# Launch helpers shared by the ops' ``_launch`` functions. An eager forward of a small batch waits on
# its host time, and these are the cheap forms (measured on the development VM, one call each):
# ``torch.empty(shape, dtype=..., device=...)`` and ``x.view(x.shape)`` cost ~3.5 us where
# ``torch.empty_like`` costs 1.2 and skipping a no-op reshape or view costs nothing.

def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last dim]`` with unit column stride (a view where possible, else a copy)."""
    if t.dim() != 2:
        t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: there may be no column
    return t if t.stride(1) == 1 else t.contiguous()


def empty_rows(rows: torch.Tensor, dtype: torch.dtype, columns: int | None = None) -> torch.Tensor:
    """A new contiguous ``[rows.shape[0], columns]`` tensor (default: ``rows``' columns) of ``dtype``
    on ``rows``' device."""
    if columns is None and dtype == rows.dtype:
        return torch.empty_like(rows, memory_format=torch.contiguous_format)
    shape = rows.shape if columns is None else (rows.shape[0], columns)
    return torch.empty(shape, dtype=dtype, device=rows.device)


def unrows(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` ``[rows, columns]`` back in ``like``'s leading shape (no-op for 2-D ``like``)."""
    return out if like.dim() == 2 else out.view(*like.shape[:-1], out.shape[-1])


def triton_backend_for(device: torch.device | str) -> bool:
    """Whether a Triton op (an inference call on floating-point tensors it supports) runs its kernel
    on ``device`` under the current setting: what ``active_backend`` of each op reports. Under
    ``FASTBERT_BACKEND=triton`` this is True on every device (on the CPU without
    ``TRITON_INTERPRET=1`` the op then raises and says why)."""
    name = backend_setting()
    if name == "torch":
        return False
    if name == "triton":
        return True
    return torch.device(device).type == "cuda" and triton_available()


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (runs on CPU tensors, in Python)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_kernel_runs_here(kernel, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error when ``kernel`` (a ``@triton.jit`` function) cannot run on ``device``
    tensors of ``dtype``: CPU tensors need a kernel defined under ``TRITON_INTERPRET=1`` (Triton reads
    that variable when the kernel module is first imported, not at the call), and not bfloat16, which
    Triton's interpreter stores as raw 16-bit integers (its results would be silently wrong)."""
    if device.type == "cuda":
        return
    name = getattr(kernel, "__name__", kernel)
    if not is_interpreted(kernel):
        raise RuntimeError(
            f"Triton kernel {name} cannot run on {device.type} tensors: "
            "it was defined without TRITON_INTERPRET=1. Set TRITON_INTERPRET=1 before importing fastbert "
            "(Triton reads it when the kernels are defined), or use FASTBERT_BACKEND=torch."
        )
    if dtype == torch.bfloat16:
        raise NotImplementedError(
            f"Triton kernel {name} cannot compute bfloat16 under TRITON_INTERPRET=1: the interpreter stores "
            "bfloat16 as raw 16-bit integers, so its results would be wrong. Use float32 or float16 there, "
            "or FASTBERT_BACKEND=torch."
        )
