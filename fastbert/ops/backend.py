"""The one place where an op chooses between its PyTorch reference and its fast kernel.

``FASTBERT_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): fast kernels on CUDA tensors, the PyTorch reference on the CPU;
- ``torch``: always the PyTorch reference;
- ``triton``: always the Triton kernels, also on CPU tensors when ``TRITON_INTERPRET=1``.

The fused kernels have no backward of their own yet, so a call that must record autograd history
(gradients enabled and an input that requires them) takes the reference, whatever the setting.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_override: str | None = None


def backend_setting() -> str:
    """The configured backend name, validated."""
    name = _override if _override is not None else os.environ.get("FASTBERT_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"FASTBERT_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (overrides ``FASTBERT_BACKEND``)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op called on ``tensors`` runs its Triton kernel (True) or its reference (False)."""
    name = backend_setting()
    if name == "torch" or needs_autograd(*tensors):
        return False
    device = next(t for t in tensors if t is not None).device
    if name == "triton":
        if not triton_available():
            raise RuntimeError("FASTBERT_BACKEND=triton, but triton is not installed")
        if device.type != "cuda" and not triton_interpreter():
            raise RuntimeError(
                f"FASTBERT_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
                "(Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter)"
            )
        return True
    return device.type == "cuda" and triton_available()
