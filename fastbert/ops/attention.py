"""Self-attention over packed variable-length sequences, reading Q, K and V from one fused tensor.

``qkv`` is the output of the fused QKV projection, ``[tokens, 3 * hidden]``: columns
``[0, hidden)`` are the queries, then the keys, then the values; head ``h`` owns columns
``[h * head_dim, (h + 1) * head_dim)`` of each. Sequence ``b`` is the tokens
``cu_seqlens[b]:cu_seqlens[b + 1]``; it attends to itself only. The output, ``[tokens, hidden]``,
is laid out like the queries, ready for the output projection.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import backend
from .padding import check_offsets, sequence_positions


def _check(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int) -> tuple[int, int]:
    if num_heads < 1:
        raise ValueError(f"num_heads must be at least 1, got {num_heads}")
    if qkv.dim() != 2 or qkv.shape[1] == 0 or qkv.shape[1] % (3 * num_heads):
        raise ValueError(f"qkv must be [tokens, 3 * hidden] with hidden divisible by {num_heads} heads, "
                         f"got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got dtype {qkv.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of batch + 1 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    hidden = qkv.shape[1] // 3
    return hidden, hidden // num_heads


def _checked_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale (default 1 / sqrt(head_dim)), refused unless finite (a NaN one made every
    output NaN)."""
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not -math.inf < scale < math.inf:  # NaN too (comparisons: a SymFloat under dynamic shapes)
        raise ValueError(f"attention scale must be finite, got {scale}")
    return scale


def _check_max_seqlen(qkv: torch.Tensor, max_seqlen: int) -> None:
    if qkv.shape[0] and max_seqlen < 1:
        raise ValueError(f"max_seqlen must be at least 1 for {qkv.shape[0]} rows of qkv, got {max_seqlen}")


def _check_offsets(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    """Refuse offsets that would have the kernel read or write rows outside ``qkv`` or leave output
    rows unwritten: ``cu_seqlens`` must rise from 0 to the number of rows, and ``max_seqlen`` bound
    every sequence. One host read of four numbers where reading back is allowed (not while tracing or
    capturing a graph, where the caller's offsets are trusted)."""
    tokens = qkv.shape[0]
    _check_max_seqlen(qkv, max_seqlen)
    if not backend.may_read_back(cu_seqlens):
        return
    if cu_seqlens.numel() == 1:
        if tokens:
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} holds no sequence for the {tokens} rows of qkv")
        return
    longest = check_offsets(cu_seqlens, tokens, "cu_seqlens", "rows of qkv")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest} rows)")


def _padded_qkv(qkv, cu_seqlens, max_seqlen, num_heads):
    """Scatter packed Q, K, V into ``[batch, heads, max_seqlen, head_dim]`` each, plus the key mask."""
    tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // 3 // num_heads
    batch = cu_seqlens.numel() - 1
    seq_idx, offset = sequence_positions(cu_seqlens, tokens)
    padded = qkv.new_zeros(batch, max_seqlen, 3, num_heads, head_dim)
    padded = padded.index_put((seq_idx, offset), qkv.view(tokens, 3, num_heads, head_dim))
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)
    seqlens = cu_seqlens.diff()
    key_mask = torch.arange(max_seqlen, device=qkv.device) < seqlens[:, None]
    # An empty sequence would have every key masked (NaN rows); let it attend to its zero
    # padding instead. It has no tokens, so nothing of it is ever read back.
    key_mask |= (seqlens == 0)[:, None]
    return q, k, v, key_mask[:, None, None, :], seq_idx, offset


def varlen_attention_reference(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """PyTorch reference: the batch padded to ``max_seqlen``, one masked SDPA call."""
    hidden, head_dim = _check(qkv, cu_seqlens, num_heads)
    if qkv.shape[0] == 0:
        return qkv.new_zeros(0, hidden)
    q, k, v, key_mask, seq_idx, offset = _padded_qkv(qkv, cu_seqlens, max_seqlen, num_heads)
    # Forward-mode AD (torch.func.jvp): only SDPA's math backend has the rule (the CPU flash kernel raises).
    with sdpa_kernel(SDPBackend.MATH) if backend.forward_ad_active() else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[seq_idx, offset].reshape(-1, hidden)


def varlen_attention_with_probs(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns its probabilities, ``[batch, heads, max_seqlen, max_seqlen]``
    (zero at padded keys and padded queries; after dropout, the weights the values were summed with,
    as transformers returns them); softmax in fp32 (fp64 input: fp64). Used for ``output_attentions``.
    ``validate``: as :func:`varlen_attention`'s."""
    hidden, head_dim = _check(qkv, cu_seqlens, num_heads)
    backend.check_dropout(dropout_p, "varlen_attention_with_probs")
    if validate:
        _check_offsets(qkv, cu_seqlens, max_seqlen)
    scale = _checked_scale(scale, head_dim)
    batch = cu_seqlens.numel() - 1
    if qkv.shape[0] == 0:
        return qkv.new_zeros(0, hidden), qkv.new_zeros(batch, num_heads, max_seqlen, max_seqlen)
    q, k, v, key_mask, seq_idx, offset = _padded_qkv(qkv, cu_seqlens, max_seqlen, num_heads)
    compute = torch.promote_types(qkv.dtype, torch.float32)  # fp64 stays fp64
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    probs = scores.masked_fill(~key_mask, float("-inf")).softmax(dim=-1)
    query_mask = torch.zeros(batch, max_seqlen, dtype=torch.bool, device=qkv.device)
    query_mask[seq_idx, offset] = True
    probs = (probs * query_mask[:, None, :, None]).to(qkv.dtype)
    if dropout_p > 0:  # a Python test: a SymFloat's comparison is no bool argument under dynamic shapes
        probs = F.dropout(probs, dropout_p)  # returned after dropout, as transformers does
    out = torch.matmul(probs, v)
    return out.transpose(1, 2)[seq_idx, offset].reshape(-1, hidden), probs


# ------------------------------------------------------------------------------------------------
# The Triton op (kernels/attention.py). TRITON_INTERPRET must be set before this module is imported
# for the kernel to run on CPU tensors (triton.jit reads it when the kernel is defined).

TRITON_OP = "fastbert::varlen_attention"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if backend.triton_available():
    from torch.library import wrap_triton

    from fastbert.kernels.attention import (
        MAX_COMPACT_SLOTS,
        MAX_HEAD_DIM,
        _attention_fwd_kernel,
        attention_fwd,
        softmax_scale_supported,
    )

    def _launch(qkv, cu_seqlens, max_seqlen: int, num_heads: int, scale: float, kernel=None) -> torch.Tensor:
        """``[tokens, 3 * hidden]`` -> ``[tokens, hidden]``; ``max_seqlen`` bounds every sequence.
        ``kernel``: the wrapped kernel inside the op, None for a direct launch."""
        if qkv.stride(1) != 1:
            qkv = qkv.contiguous()
        out = qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))
        with backend.device_guard(qkv):
            attention_fwd(qkv, cu_seqlens.contiguous(), max_seqlen, num_heads, scale, out, kernel=kernel)
        return out

    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def _varlen_attention_triton(
        qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, scale: float
    ) -> torch.Tensor:
        """``[tokens, 3 * hidden]`` -> ``[tokens, hidden]``; ``max_seqlen`` bounds every sequence.
        Called directly it checks shapes and dtypes as the function does; the offsets' values it trusts,
        as flash attention's varlen functions do (reading them back would stall every call):
        ``fastbert.ops.varlen_attention`` checks those."""
        _check(qkv, cu_seqlens, num_heads)
        _check_max_seqlen(qkv, max_seqlen)
        interpreted = backend.is_interpreted(_attention_fwd_kernel)
        kernel = _attention_fwd_kernel if interpreted else wrap_triton(_attention_fwd_kernel)
        return _launch(qkv, cu_seqlens, max_seqlen, num_heads, scale, kernel)

    def _setup_context(ctx, inputs, output):
        qkv, cu_seqlens, max_seqlen, num_heads, scale = inputs
        ctx.save_for_backward(qkv, cu_seqlens)
        ctx.args = (max_seqlen, num_heads, scale)

    def _backward(ctx, grad):
        """The gradient of the PyTorch reference at the same inputs (the forward is recomputed)."""
        qkv, cu_seqlens = ctx.saved_tensors
        max_seqlen, num_heads, scale = ctx.args
        _, vjp = torch.func.vjp(
            lambda t: varlen_attention_reference(t, cu_seqlens, max_seqlen, num_heads, scale), qkv)
        return vjp(grad)[0], None, None, None, None

    _varlen_attention_triton.register_autograd(_backward, setup_context=_setup_context)
else:
    MAX_HEAD_DIM = MAX_COMPACT_SLOTS = 0

    def softmax_scale_supported(scale: float) -> bool:
        return False


def _kernel_takes(qkv: torch.Tensor, cu_seqlens: torch.Tensor, head_dim: int, scale: float) -> bool:
    """Whether the Triton kernel takes these inputs (else the reference runs): fp32 / fp16 / bf16,
    head dims up to 256, both tensors on one device, a scale the kernel takes (positive, and not so
    small or large that it leaves fp32's normal range: ``softmax_scale_supported``)."""
    return (qkv.dtype in _KERNEL_DTYPES and 1 <= head_dim <= MAX_HEAD_DIM and cu_seqlens.device == qkv.device
            and softmax_scale_supported(scale))


def varlen_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    validate: bool = True,
) -> torch.Tensor:
    """``[tokens, 3 * hidden]`` fused QKV -> ``[tokens, hidden]`` attention output.

    ``max_seqlen`` must bound every sequence length (the kernels size their grids with it).
    Dropout (training) runs the reference; the Triton op has a backward (the reference's gradient).
    ``validate``: check that ``cu_seqlens`` rises from 0 to the number of rows and that ``max_seqlen``
    bounds every sequence (one host read; a ValueError names what is wrong); the model, which built
    and checked its offsets, passes False.
    """
    hidden, head_dim = _check(qkv, cu_seqlens, num_heads)
    backend.check_dropout(dropout_p, "varlen_attention")
    if validate:
        _check_offsets(qkv, cu_seqlens, max_seqlen)
    scale = _checked_scale(scale, head_dim)
    if (dropout_p > 0 or not _kernel_takes(qkv, cu_seqlens, head_dim, scale)
            or not backend.use_triton(qkv, differentiable=True)):
        return varlen_attention_reference(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p)
    backend.check_kernel_runs_here(_attention_fwd_kernel, qkv.device, qkv.dtype)
    if backend.direct_launch(qkv, cu_seqlens):
        return _launch(qkv, cu_seqlens, max_seqlen, num_heads, scale)
    return torch.ops.fastbert.varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale)


def active_backend(device: torch.device | str) -> str:
    """What ``varlen_attention`` runs on tensors of ``device`` under the current backend setting:
    ``"triton"`` or ``"torch"``, for fp32 / fp16 / bf16 inputs with head dims up to 256 and no dropout
    (anything else takes the reference). Under ``FASTBERT_BACKEND=triton`` it says ``"triton"`` even on
    the CPU without ``TRITON_INTERPRET=1``, where ``varlen_attention`` raises and says why."""
    return "triton" if backend.triton_backend_for(device) else "torch"
