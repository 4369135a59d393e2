"""The optional C++/CUDA extension ``fastbert._C``: loading it, and saying whether and how it is built.

Importing ``fastbert._C`` registers ``torch.ops.fastbert.embedding_layer_norm`` (CPU kernel, plus a
CUDA kernel when it was built with CUDA). Its fake implementation, which ``torch.compile``,
``torch.export`` and CUDA-graph capture trace through, and its backward (which differentiates the
PyTorch reference) are registered here: the C++ library names this
module (``set_python_module``), so torch imports it when it needs the fake implementation.

The extension is built by setup.py when a compiler (and for the CUDA kernel, nvcc and a CUDA build of
torch) is present; without it fastbert runs its Triton and PyTorch paths.
"""

from __future__ import annotations

import functools
import os
import re

import torch

OP_NAME = "fastbert::embedding_layer_norm"

_module = None
_error: BaseException | None = None
_loaded = False


def load():
    """``fastbert._C`` once imported (the op then registered), or None when it is not built or does not load."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            from . import _C
        except ImportError as error:  # not built, or built against another torch
            _error = error
        else:
            _module = _C
            _register_fake()
            _register_autograd()
    return _module


def is_built() -> bool:
    """Whether ``fastbert._C`` imports (and so ``torch.ops.fastbert.embedding_layer_norm`` exists)."""
    return load() is not None


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernel."""
    module = load()
    return module is not None and bool(module.with_cuda)


@functools.cache
def cuda_kernel_runs_on(device_index: int) -> bool:
    """Whether GPU ``device_index`` can run the compiled CUDA kernel (the binary holds code for its
    architecture); asked of the CUDA runtime, so only meaningful with a GPU."""
    module = load()
    if module is None or not module.with_cuda:
        return False
    try:
        return bool(module.cuda_kernel_image_available(device_index))
    except RuntimeError:  # no usable device there: the Triton/PyTorch paths decide for themselves
        return False


def usable_on(device: torch.device | str) -> bool:
    """Whether the extension's op runs on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return is_built()
    if device.type != "cuda" or not has_cuda_kernels() or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_kernel_runs_on(index)


def built_cuda_archs() -> list[str]:
    """The GPU architectures compiled in, as ``sm_XY`` names (empty without CUDA kernels). An
    architecture-specific build (``sm_90a``) shows as its base (``sm_90``): nvcc's ``__CUDA_ARCH_LIST__``
    does not carry the suffix."""
    module = load()
    if module is None or not module.cuda_archs:
        return []
    return [f"sm_{int(code) // 10}" for code in module.cuda_archs.split(",")]


def extension_status() -> str:
    """One line for ``fastbert info``: whether the extension is built, with what, and where from."""
    module = load()
    if module is None:
        if _error is not None and "No module named" in str(_error):
            return "not built (fastbert runs its Triton/PyTorch paths; see setup.py to build it)"
        return f"not loadable ({type(_error).__name__}: {_error}); fastbert runs its Triton/PyTorch paths"
    where = os.path.basename(module.__file__ or "")
    built_for = re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)
    mismatch = "" if module.torch_version == built_for else (
        f"; WARNING: built against torch {module.torch_version}, running torch {built_for}: rebuild")
    if not module.with_cuda:
        return f"built, CPU kernel only ({where}){mismatch}"
    version = f"{module.cuda_runtime_version // 1000}.{module.cuda_runtime_version % 1000 // 10}"
    return f"built with CUDA {version} for {', '.join(built_cuda_archs())} ({where}){mismatch}"


def _register_fake() -> None:
    @torch.library.register_fake(OP_NAME)
    def _embedding_layer_norm_fake(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                                   token_type_weight, ln_weight, ln_bias, eps, check_indices=True):
        torch._check(input_ids.dim() == 1, lambda: f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
        torch._check(position_ids.shape == input_ids.shape and token_type_ids.shape == input_ids.shape,
                     lambda: "input_ids, position_ids and token_type_ids must have one entry per token")
        torch._check(word_weight.dim() == 2, lambda: "word_weight must be [vocab, hidden]")
        hidden = word_weight.shape[1]
        for name, t in (("position_weight", position_weight), ("token_type_weight", token_type_weight),
                        ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            torch._check(t.dtype == word_weight.dtype, lambda: f"{name} must be {word_weight.dtype}, got {t.dtype}")
            torch._check(t.shape[-1] == hidden, lambda: f"{name} must end in the hidden size {hidden}")
        return word_weight.new_empty((input_ids.shape[0], hidden))



def _register_autograd() -> None:
    """A backward for the op (the kernels have none): it recomputes the PyTorch reference and
    differentiates that, so that a direct call under autograd gives correct gradients. fastbert's own
    ``ops.embeddings`` runs the reference itself when autograd is needed."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:8])
        ctx.eps = inputs[8]

    def backward(ctx, grad_output):
        from .ops.embeddings import embeddings_reference

        ids, positions, types, *floats = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:8]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(floats, needs)]
            out = embeddings_reference(ids, positions, types, *leaves, ctx.eps)
            wanted = [leaf for leaf, need in zip(leaves, needs) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad_output))
        return (None, None, None, *(next(grads) if need else None for need in needs), None, None)

    torch.library.register_autograd(OP_NAME, backward, setup_context=setup_context)


# Load now: importing this module is what torch does to find the fake implementation (the C++ op names
# this module), and fastbert.ops imports it to choose a backend.
load()
