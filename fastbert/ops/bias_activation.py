"""Bias + activation on ``[tokens, intermediate]``, the epilogue of BERT's first FFN matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend

# transformers' hidden_act name -> the activation the kernels compute. "gelu_new" and
# "gelu_pytorch_tanh" are the same tanh approximation, written two ways in transformers.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def activation_kind(hidden_act) -> str:
    """The kernel activation for a config's ``hidden_act``; a clear error for anything else."""
    if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS:
        raise NotImplementedError(
            f"hidden_act={hidden_act!r} is not supported by fastbert; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[hidden_act]


def bias_activation_reference(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    if bias is not None:
        x = x + bias
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; expected gelu, gelu_tanh or relu")


# ------------------------------------------------------------------------------------------------
# The Triton op (kernels/bias_activation.py). TRITON_INTERPRET must be set before this module is
# imported for the kernel to run on CPU tensors (triton.jit reads it when the kernel is defined).

TRITON_OP = "fastbert::bias_activation"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KINDS = ("gelu", "gelu_tanh", "relu")

if backend.triton_available():
    from torch.library import wrap_triton

    from fastbert.kernels.bias_activation import _bias_activation_fwd_kernel, bias_activation_fwd

    def _launch(x, bias, activation: str, kernel=None) -> torch.Tensor:
        """``activation(x + bias)`` over the last dimension, any leading shape; the result has the
        dtype of ``x + bias``. ``kernel``: the wrapped kernel inside the op, None for a direct launch."""
        x2 = backend.as_rows(x)
        dtype = x.dtype if bias is None or bias.dtype == x.dtype else torch.promote_types(x.dtype, bias.dtype)
        out = backend.empty_rows(x2, dtype)
        bias = x.new_zeros(x.shape[-1]) if bias is None else bias.contiguous()
        with backend.device_guard(x2):
            bias_activation_fwd(x2, bias, activation, out, kernel=kernel)
        return backend.unrows(out, x)

    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def _bias_activation_triton(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
        """``activation(x + bias)`` over the last dimension, any leading shape; the result has the
        dtype of ``x + bias``. Called directly (``torch.ops.fastbert.bias_activation``) it checks the
        shapes as the function does: the kernel would read past a short bias."""
        _check_args(x, bias, activation)
        interpreted = backend.is_interpreted(_bias_activation_fwd_kernel)
        kernel = _bias_activation_fwd_kernel if interpreted else wrap_triton(_bias_activation_fwd_kernel)
        return _launch(x, bias, activation, kernel)

    def _setup_context(ctx, inputs, output):
        x, bias, activation = inputs
        ctx.save_for_backward(x, bias)
        ctx.activation = activation

    def _backward(ctx, grad):
        """The gradient of the PyTorch reference at the same inputs (the forward is recomputed)."""
        x, bias = ctx.saved_tensors
        if bias is None:
            _, vjp = torch.func.vjp(lambda t: bias_activation_reference(t, None, ctx.activation), x)
            return vjp(grad)[0], None, None
        _, vjp = torch.func.vjp(lambda t, b: bias_activation_reference(t, b, ctx.activation), x, bias)
        grad_x, grad_bias = vjp(grad)
        return grad_x, grad_bias, None

    _bias_activation_triton.register_autograd(_backward, setup_context=_setup_context)


def _kernel_takes(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these inputs (else the reference runs): fp32 / fp16 / bf16,
    at least one dimension, one device."""
    return (x.dtype in _KERNEL_DTYPES and x.dim() >= 1
            and (bias is None or (bias.dtype in _KERNEL_DTYPES and bias.device == x.device)))


def _check_args(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> None:
    """What the function and its registered op both refuse (no host sync)."""
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match x of shape {tuple(x.shape)}")
    if activation not in _KINDS:
        raise ValueError(f"unknown activation {activation!r}; expected gelu, gelu_tanh or relu")


def bias_activation(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``activation(x + bias)``; ``activation`` is one of ``gelu`` (erf), ``gelu_tanh``, ``relu``."""
    _check_args(x, bias, activation)
    if not _kernel_takes(x, bias) or not backend.use_triton(x, bias, differentiable=True):
        return bias_activation_reference(x, bias, activation)
    backend.check_kernel_runs_here(_bias_activation_fwd_kernel, x.device, x.dtype)
    if backend.direct_launch(x, bias):
        return _launch(x, bias, activation)
    return torch.ops.fastbert.bias_activation(x, bias, activation)


def active_backend(device: torch.device | str) -> str:
    """What ``bias_activation`` runs on tensors of ``device`` under the current backend setting:
    ``"triton"`` or ``"torch"``, for fp32 / fp16 / bf16 inputs (others take the reference). Under
    ``FASTBERT_BACKEND=triton`` it says ``"triton"`` even on the CPU without ``TRITON_INTERPRET=1``,
    where ``bias_activation`` raises and says why."""
    return "triton" if backend.triton_backend_for(device) else "torch"
