"""Bias + residual + LayerNorm on ``[tokens, hidden]``: the end of each BERT sub-layer,
``LayerNorm(dropout(x + bias) + residual)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def bias_residual_layer_norm_reference(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    if bias is not None:
        x = x + bias
    if dropout_p > 0:  # a Python test: a SymFloat's comparison is no bool argument under dynamic shapes
        x = F.dropout(x, dropout_p)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, ln_bias, eps)


# ------------------------------------------------------------------------------------------------
# The Triton op (kernels/bias_residual_layer_norm.py). TRITON_INTERPRET must be set before this module
# is imported for the kernel to run on CPU tensors (triton.jit reads it when the kernel is defined).

TRITON_OP = "fastbert::bias_residual_layer_norm"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if backend.triton_available():
    from torch.library import wrap_triton

    from fastbert.kernels.bias_residual_layer_norm import (
        _bias_residual_layer_norm_fwd_kernel,
        bias_residual_layer_norm_fwd,
    )

    def _launch(x, bias, residual, weight, ln_bias, eps: float, kernel=None) -> torch.Tensor:
        """``LayerNorm(x + bias + residual)`` over the last dimension, any leading shape, statistics in
        fp32; the result has the dtype of ``x + bias + residual``. ``kernel``: the wrapped kernel
        inside the op, None for a direct launch."""
        x2, r2 = backend.as_rows(x), backend.as_rows(residual)
        dtype = x.dtype
        if residual.dtype != dtype or (bias is not None and bias.dtype != dtype):
            dtype = torch.promote_types(dtype, residual.dtype)
            dtype = dtype if bias is None else torch.promote_types(dtype, bias.dtype)
        out = backend.empty_rows(x2, dtype)
        bias = x.new_zeros(x.shape[-1]) if bias is None else bias.contiguous()
        with backend.device_guard(x2):
            bias_residual_layer_norm_fwd(x2, bias, r2, weight.contiguous(), ln_bias.contiguous(), eps, out,
                                         backend.gpu_description(x2)[1], kernel=kernel)
        return backend.unrows(out, x)

    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def _bias_residual_layer_norm_triton(
        x: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor,
        weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """``LayerNorm(x + bias + residual)`` over the last dimension, any leading shape, statistics in
        fp32; the result has the dtype of ``x + bias + residual``. Called directly it checks the shapes
        as the function does: the kernel would read past a short residual."""
        _check_args(x, bias, residual, weight, ln_bias, eps)
        interpreted = backend.is_interpreted(_bias_residual_layer_norm_fwd_kernel)
        kernel = (_bias_residual_layer_norm_fwd_kernel if interpreted
                  else wrap_triton(_bias_residual_layer_norm_fwd_kernel))
        return _launch(x, bias, residual, weight, ln_bias, eps, kernel)

    def _setup_context(ctx, inputs, output):
        x, bias, residual, weight, ln_bias, eps = inputs
        ctx.save_for_backward(x, bias, residual, weight, ln_bias)
        ctx.eps = eps

    def _backward(ctx, grad):
        """The gradient of the PyTorch reference at the same inputs (the forward is recomputed)."""
        x, bias, residual, weight, ln_bias = ctx.saved_tensors
        eps = ctx.eps
        if bias is None:
            _, vjp = torch.func.vjp(
                lambda x, r, w, lb: bias_residual_layer_norm_reference(x, None, r, w, lb, eps),
                x, residual, weight, ln_bias)
            grad_x, grad_residual, grad_weight, grad_ln_bias = vjp(grad)
            return grad_x, None, grad_residual, grad_weight, grad_ln_bias, None
        _, vjp = torch.func.vjp(
            lambda x, b, r, w, lb: bias_residual_layer_norm_reference(x, b, r, w, lb, eps),
            x, bias, residual, weight, ln_bias)
        return *vjp(grad), None

    _bias_residual_layer_norm_triton.register_autograd(_backward, setup_context=_setup_context)


def _kernel_takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these inputs (else the reference runs): fp32 / fp16 / bf16,
    one device."""
    device = tensors[0].device
    return all(t is None or (t.dtype in _KERNEL_DTYPES and t.device == device) for t in tensors)


def _check_args(x, bias, residual, weight, ln_bias, eps) -> float:
    """What the function and its registered op both refuse (no host sync); ``eps`` as a float."""
    if x.dim() == 0:
        raise ValueError("bias_residual_layer_norm: x must have at least one dimension (the normalized one), "
                         "got a 0-d tensor")
    eps = backend.check_eps(eps, "bias_residual_layer_norm")
    columns = x.shape[-1:]
    if residual.shape != x.shape or weight.shape != columns:
        raise ValueError(f"x {tuple(x.shape)}, residual {tuple(residual.shape)} and LayerNorm weight "
                         f"{tuple(weight.shape)} do not match")
    if (bias is not None and bias.shape != columns) or ln_bias.shape != columns:
        raise ValueError(f"bias {None if bias is None else tuple(bias.shape)} and LayerNorm bias "
                         f"{tuple(ln_bias.shape)} must be [{x.shape[-1]}]")
    return eps


def bias_residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``LayerNorm(dropout(x + bias) + residual)`` over the last dimension, statistics in fp32.
    Dropout (training) runs the reference; the Triton op has a backward (the reference's gradient)."""
    eps = _check_args(x, bias, residual, weight, ln_bias, eps)
    backend.check_dropout(dropout_p, "bias_residual_layer_norm")
    tensors = (x, bias, residual, weight, ln_bias)
    if dropout_p > 0 or not _kernel_takes(*tensors) or not backend.use_triton(*tensors, differentiable=True):
        return bias_residual_layer_norm_reference(x, bias, residual, weight, ln_bias, eps, dropout_p)
    backend.check_kernel_runs_here(_bias_residual_layer_norm_fwd_kernel, x.device, x.dtype)
    if backend.direct_launch(*tensors):
        return _launch(x, bias, residual, weight, ln_bias, float(eps))
    return torch.ops.fastbert.bias_residual_layer_norm(x, bias, residual, weight, ln_bias, float(eps))


def active_backend(device: torch.device | str) -> str:
    """What ``bias_residual_layer_norm`` runs on tensors of ``device`` under the current backend
    setting: ``"triton"`` or ``"torch"``, for fp32 / fp16 / bf16 inputs and no dropout (anything else
    takes the reference). Under ``FASTBERT_BACKEND=triton`` it says ``"triton"`` even on the CPU
    without ``TRITON_INTERPRET=1``, where ``bias_residual_layer_norm`` raises and says why."""
    return "triton" if backend.triton_backend_for(device) else "torch"
