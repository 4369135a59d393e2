"""One BERT encoder layer's eight device operations, launched from one function: the eager fast path.

``BertLayer``'s module path calls five ``nn.Module``s and four fused ops, and each op checks its
inputs and picks its backend again. With the launches stubbed out (and the CPU's GEMMs replaced by
allocations) a layer cost ~155 us of host time on the development VM, and a small eager batch on a
GPU waits on host time (the H200 run of 2026-11-26: every eager case under ~16k tokens was
host-bound). ``encoder_layer`` launches the same kernels on the same arguments, so its output is
bitwise the module path's, from one function: ~70 us per layer, checks included.

The model takes it only where nothing could tell the difference: ``fast_path_ready`` here (an eager
inference call on the Triton backend), ``weights_ready`` and ``BertLayer._fast_path_weights`` (plain
modules called as defined, no active dropout, plain tensors of one dtype and device in the shapes
the kernels take). Everything else runs the module path.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import backend
from .padding import Packing

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EncoderLayerWeights(NamedTuple):
    """What one layer reads. Every tensor has the hidden states' dtype and device; the biases and
    LayerNorm parameters are contiguous."""

    qkv_weight: torch.Tensor  # [3 * hidden, hidden]: query | key | value
    qkv_bias: torch.Tensor
    num_heads: int
    scale: float
    attention_output_weight: torch.Tensor  # [hidden, hidden]
    attention_output_bias: torch.Tensor
    attention_norm: tuple[torch.Tensor, torch.Tensor, float]  # LayerNorm weight, bias, eps
    intermediate_weight: torch.Tensor  # [intermediate, hidden]
    intermediate_bias: torch.Tensor
    activation: str  # bias_activation's kind
    output_weight: torch.Tensor  # [hidden, intermediate]
    output_bias: torch.Tensor
    output_norm: tuple[torch.Tensor, torch.Tensor, float]


def fast_path_ready(hidden_states: torch.Tensor, packing: Packing) -> str | None:
    """The GEMM setting (``backend.GEMMS``: ``encoder_layer``'s ``gemm``) when an
    encoder forward on ``hidden_states`` may take the fast path, else None: the Triton backend on
    their device, gradients off (inference), no autocast, a kernel dtype,
    ``cu_seqlens`` as the attention op takes it (1-D int32 on the same device; else the op says what
    is wrong), and nothing that must see the ops (``backend.direct_launch``: torch.compile tracing, a
    functorch transform, a dispatch mode, a tensor subclass)."""
    cu_seqlens = packing.cu_seqlens
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or hidden_states.dtype not in _DTYPES
            or not backend.triton_available() or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 1 or cu_seqlens.get_device() != hidden_states.get_device()):
        return None
    if torch.is_autocast_enabled(hidden_states.device.type):
        return None
    if not (backend.use_triton(hidden_states) and backend.direct_launch(hidden_states, cu_seqlens)):
        return None
    gemm = backend.gemm_setting()
    kernels = _KERNELS + ((_gemm._linear_activation_fwd_kernel,) if gemm == "triton" else ())
    for kernel in kernels:  # CPU tensors need kernels defined under TRITON_INTERPRET=1: else say so
        backend.check_kernel_runs_here(kernel, hidden_states.device, hidden_states.dtype)
    return gemm


def fast_path_active(device: torch.device | str) -> bool:
    """Whether an eager inference forward on ``device`` takes the fast path under the current settings
    (for layers of plain modules: see ``BertLayer._fast_path_weights``), for ``fastbert info``."""
    device = torch.device(device)
    if not backend.triton_backend_for(device):
        return False
    return device.type == "cuda" or backend.is_interpreted(_KERNELS[0])


def weights_ready(weights: EncoderLayerWeights, hidden_states: torch.Tensor) -> bool:
    """Whether this layer's input and ``weights`` are what the kernels take, where the module path
    would check, copy, promote or fail instead: plain tensors (no subclass: it would see the ops),
    ``hidden_states`` 2-D and contiguous (a hook on the layer before may have returned any layout),
    every weight of its dtype and device, the GEMM and bias shapes chained (``[3 * hidden, hidden]``
    QKV, ``[hidden, hidden]``, ``[intermediate, hidden]``, ``[hidden, intermediate]``), 1-D tensors
    contiguous, and heads and scale the attention kernel takes. Checked per layer and forward."""
    plain = backend.PLAIN_TENSOR_TYPES
    if type(hidden_states) not in plain or hidden_states.dim() != 2 or not hidden_states.is_contiguous():
        return False
    dtype, device, hidden = hidden_states.dtype, hidden_states.get_device(), hidden_states.shape[1]
    intermediate = weights.intermediate_weight.shape[0]
    shapes = ((weights.qkv_weight, (3 * hidden, hidden)), (weights.qkv_bias, (3 * hidden,)),
              (weights.attention_output_weight, (hidden, hidden)), (weights.attention_output_bias, (hidden,)),
              (weights.attention_norm[0], (hidden,)), (weights.attention_norm[1], (hidden,)),
              (weights.intermediate_weight, (intermediate, hidden)), (weights.intermediate_bias, (intermediate,)),
              (weights.output_weight, (hidden, intermediate)), (weights.output_bias, (hidden,)),
              (weights.output_norm[0], (hidden,)), (weights.output_norm[1], (hidden,)))
    for t, shape in shapes:
        if (type(t) not in plain or t.dtype is not dtype or t.get_device() != device or t.shape != shape
                or (len(shape) == 1 and not t.is_contiguous())):
            return False
    if hidden % weights.num_heads:
        return False
    return hidden // weights.num_heads <= _attention.MAX_HEAD_DIM and _attention.softmax_scale_supported(weights.scale)


def encoder_layer(hidden_states: torch.Tensor, packing: Packing, weights: EncoderLayerWeights,
                  gemm: str = backend.DEFAULT_GEMM, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[tokens, hidden]`` -> ``[tokens, hidden]``: QKV GEMM, attention, output projection, bias +
    residual + LayerNorm, FFN GEMM, bias + activation (in place), FFN GEMM, bias + residual +
    LayerNorm. ``gemm``, the ``FASTBERT_GEMM`` setting: under ``triton`` the bias + activation run in
    the Triton GEMM's epilogue, under ``cublaslt`` in cuBLASLt's (where ``cublaslt_takes``), as
    ``ops.linear_activation`` runs them. ``rows``: only these rows go on after attention
    (``[len(rows), hidden]`` out), as in BertAttention. Call only where ``fast_path_ready`` and
    ``weights_ready`` hold."""
    with backend.device_guard(hidden_states):
        return _encoder_layer(hidden_states, packing, weights, gemm, rows)


def _encoder_layer(x: torch.Tensor, packing: Packing, weights: EncoderLayerWeights, gemm: str,
                   rows: torch.Tensor | None) -> torch.Tensor:
    qkv = F.linear(x, weights.qkv_weight, weights.qkv_bias)
    context = torch.empty_like(x)
    _attention.attention_fwd(qkv, packing.cu_seqlens.contiguous(), packing.max_seqlen, weights.num_heads,
                             weights.scale, context, compact=packing.compact_attention)
    if rows is not None:  # every row was needed as a key and value; only these go on
        context, x = context[rows], x[rows]
    attention_output = torch.empty_like(x)
    num_sms = backend.gpu_description(x)[1]  # the LayerNorms' grids: one row a program on a short batch
    _layer_norm.bias_residual_layer_norm_fwd(F.linear(context, weights.attention_output_weight),
                                             weights.attention_output_bias, x, *weights.attention_norm,
                                             attention_output, num_sms)
    ffn = (attention_output, weights.intermediate_weight, weights.intermediate_bias, weights.activation)
    if gemm == "triton":  # as ops.linear_activation runs the FFN's first matmul under each setting
        intermediate = _gemm._launch(*ffn)
    elif gemm == "cublaslt" and _gemm.cublaslt_takes(*ffn):
        intermediate = _gemm.cublaslt_linear_activation(*ffn)
    else:
        intermediate = F.linear(attention_output, weights.intermediate_weight)
        # In place: the kernel reads each element once, then writes it (saves a [tokens, intermediate] buffer).
        _activation.bias_activation_fwd(intermediate, weights.intermediate_bias, weights.activation, intermediate)
    out = torch.empty_like(x)
    _layer_norm.bias_residual_layer_norm_fwd(F.linear(intermediate, weights.output_weight), weights.output_bias,
                                             attention_output, *weights.output_norm, out, num_sms)
    return out


if backend.triton_available():
    # The launch helpers as the ops call them (tests count launches there), from the ops' modules
    # (importlib: the package exports functions of the same names).
    _attention = importlib.import_module(f"{__package__}.attention")
    _activation = importlib.import_module(f"{__package__}.bias_activation")
    _layer_norm = importlib.import_module(f"{__package__}.bias_residual_layer_norm")
    _gemm = importlib.import_module(f"{__package__}.linear_activation")

    _KERNELS = (_attention._attention_fwd_kernel, _activation._bias_activation_fwd_kernel,
                _layer_norm._bias_residual_layer_norm_fwd_kernel)
