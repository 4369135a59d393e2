"""Linear + bias + activation, ``act(x @ weight.T + bias)``: BERT's first FFN matmul and its epilogue.

Three fast paths, picked by ``FASTBERT_GEMM`` (``backend.gemm_setting``) when the Triton backend is
active: ``cublaslt`` (default) runs the product in cuBLASLt's epilogue (``torch._addmm_activation``)
where its tanh-approximated GELU is exact or inside the 16-bit error budget (``cublaslt_takes``),
else runs as ``cublas``; ``cublas`` runs PyTorch's matmul and then the ``bias_activation`` kernel;
``triton`` runs one Triton GEMM with the bias and activation applied to its fp32 accumulator
(``kernels/linear_activation.py``), so the pre-activation is never written.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import backend
from .bias_activation import _KINDS, bias_activation, bias_activation_reference


def linear_activation_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                activation: str) -> torch.Tensor:
    return bias_activation_reference(F.linear(x, weight), bias, activation)


# cuBLASLt's GELU epilogue is the tanh approximation (as PyTorch's CUDA ``_addmm_activation``): at
# most 4.7e-4 (absolute, near x = -2.7) from erf-GELU. That is inside DESIGN.md's 16-bit budget
# (2x PyTorch's own error + 1e-3; bf16's spacing at 1 is 7.8e-3, fp16's 9.8e-4), far over fp32's
# (1e-5): erf-GELU in fp32 keeps the separate epilogue.
_EXACT_IN_FP32 = ("gelu_tanh", "relu")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def cublaslt_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> bool:
    """Whether ``FASTBERT_GEMM=cublaslt`` runs this product in cuBLASLt's epilogue: CUDA tensors of one
    dtype with a bias, and an activation that its epilogue computes exactly (``gelu_tanh``, ``relu``)
    or, for erf-GELU, a 16-bit dtype. Anything else runs PyTorch's matmul and the epilogue kernel."""
    return (x.device.type == "cuda" and bias is not None and weight.dtype == x.dtype and bias.dtype == x.dtype
            and weight.shape[1] > 0  # K = 0: PyTorch's CUDA addmm returns the bias, skipping the activation
            and (x.dtype in _HALF_DTYPES or (x.dtype == torch.float32 and activation in _EXACT_IN_FP32)))


def cublaslt_linear_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               activation: str) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` as one cuBLASLt GEMM with its bias + ReLU / GELU epilogue
    (where ``cublaslt_takes``; no autograd: ``_addmm_activation`` has no backward), any leading shape."""
    rows = backend.as_rows(x)
    out = torch._addmm_activation(bias.contiguous(), rows, weight.t(), use_gelu=activation != "relu")
    return backend.unrows(out, x)


# ------------------------------------------------------------------------------------------------
# The Triton op (kernels/linear_activation.py). TRITON_INTERPRET must be set before this module is
# imported for the kernel to run on CPU tensors (triton.jit reads it when the kernel is defined).

TRITON_OP = "fastbert::linear_activation"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if backend.triton_available():
    from torch.library import wrap_triton

    from fastbert.kernels.linear_activation import _linear_activation_fwd_kernel, linear_activation_fwd

    def _launch(x, weight, bias, activation: str, kernel=None) -> torch.Tensor:
        """``activation(x @ weight.T + bias)`` over the last dimension of ``x``, any leading shape.
        ``kernel``: the wrapped kernel inside the op, None for a direct launch."""
        x2 = backend.as_rows(x)
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        out = backend.empty_rows(x2, x.dtype, weight.shape[0])
        bias = x.new_zeros(weight.shape[0]) if bias is None else bias.contiguous()
        capability, num_sms = backend.gpu_description(x)
        with backend.device_guard(x2):
            linear_activation_fwd(x2, weight, bias, activation, out, capability, num_sms, kernel=kernel)
        return backend.unrows(out, x)

    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def _linear_activation_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  activation: str) -> torch.Tensor:
        """``activation(x @ weight.T + bias)``, any leading shape of ``x``. Called directly it checks
        the shapes as the function does: the kernel would read past a narrow weight."""
        _check_args(x, weight, bias, activation)
        interpreted = backend.is_interpreted(_linear_activation_fwd_kernel)
        kernel = _linear_activation_fwd_kernel if interpreted else wrap_triton(_linear_activation_fwd_kernel)
        return _launch(x, weight, bias, activation, kernel)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation

    def _backward(ctx, grad):
        """The PyTorch reference's gradient: the pre-activation is recomputed, the activation's
        gradient taken by autograd, and only the matmul gradients asked for are computed."""
        x, weight, bias = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        _, vjp = torch.func.vjp(lambda z: bias_activation_reference(z, bias, ctx.activation), F.linear(x, weight))
        grad_pre = vjp(grad)[0]
        rows = grad_pre.reshape(-1, grad_pre.shape[-1])
        grad_x = grad_pre @ weight if need_x else None
        grad_weight = rows.mT @ x.reshape(-1, x.shape[-1]) if need_weight else None
        grad_bias = rows.sum(0) if need_bias and bias is not None else None
        return grad_x, grad_weight, grad_bias, None

    _linear_activation_triton.register_autograd(_backward, setup_context=_setup_context)


def _kernel_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fused kernel takes these inputs (else cuBLAS + the epilogue run): one dtype of fp32 /
    fp16 / bf16 for all three, one device, at least one dimension."""
    return (x.dtype in _KERNEL_DTYPES and x.dim() >= 1 and weight.dtype == x.dtype and weight.device == x.device
            and (bias is None or (bias.dtype == x.dtype and bias.device == x.device)))


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> None:
    """What the function and its registered op both refuse (no host sync)."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match a weight of shape {tuple(weight.shape)} "
                         "([out_features, in_features])")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match a weight of shape {tuple(weight.shape)}")
    if activation not in _KINDS:
        raise ValueError(f"unknown activation {activation!r}; expected gelu, gelu_tanh or relu")


def linear_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      activation: str) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` (``weight`` as ``nn.Linear`` stores it, ``[out, in]``);
    ``activation`` is one of ``gelu`` (erf), ``gelu_tanh``, ``relu``."""
    _check_args(x, weight, bias, activation)
    # Under autocast the matmul's dtype is autocast's business: F.linear takes it (this op would run
    # the fp32 inputs as an fp32 GEMM).
    autocast = torch.is_autocast_enabled(x.device.type)
    gemm = backend.gemm_setting()
    if (gemm == "cublaslt" and not autocast and cublaslt_takes(x, weight, bias, activation)
            and backend.use_triton(x, weight, bias)):  # not differentiable: autograd takes the path below
        return cublaslt_linear_activation(x, weight, bias, activation)
    fused = (not autocast and _kernel_takes(x, weight, bias)
             and backend.use_triton(x, weight, bias, differentiable=True) and gemm == "triton")
    if not fused:
        pre = F.linear(x, weight)
        if bias is not None and autocast:
            # As nn.Linear under autocast: the bias joins in the matmul's dtype (autocast's, or fp64,
            # which autocast leaves alone), and so does the result, not the fp32 a float32 bias would
            # promote it to.
            bias = bias.to(pre.dtype)
        return bias_activation(pre, bias, activation)
    backend.check_kernel_runs_here(_linear_activation_fwd_kernel, x.device, x.dtype)
    if backend.direct_launch(x, weight, bias):
        return _launch(x, weight, bias, activation)
    return torch.ops.fastbert.linear_activation(x, weight, bias, activation)


def active_backend(device: torch.device | str) -> str:
    """What ``linear_activation`` runs on tensors of ``device`` under the current settings:
    ``"triton"`` (the fused GEMM), ``"cublaslt"`` (cuBLASLt's epilogue, where ``cublaslt_takes``, else
    as ``"cublas+triton"``), ``"cublas+triton"`` (PyTorch's matmul, then the Triton epilogue) or
    ``"torch"``."""
    if not backend.triton_backend_for(device):
        return "torch"
    gemm = backend.gemm_setting()
    if gemm == "cublaslt":
        return "cublaslt" if torch.device(device).type == "cuda" else "cublas+triton"
    return "triton" if gemm == "triton" else "cublas+triton"
