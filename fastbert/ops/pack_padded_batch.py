"""The static-size packing of a padded batch with its value checks: what ``PaddedCUDAGraphRunner``'s
graph runs before the embeddings (``validation.static_forms``). Two Triton launches on a GPU
(kernels/pack_padded_batch.py), the PyTorch composition they replace elsewhere."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backend
from .padding import Packing, static_unpad_input


class PackedBatch(NamedTuple):
    """A ``[batch, seqlen]`` batch in the static form: all ``batch * seqlen`` positions, the real
    tokens first (``packing.valid`` marks them). Ids and token types are clamped into their tables;
    ``extremes`` (int64 ``[6]``: smallest and largest id, token type at real tokens, padding read as 0,
    and mask value) say whether the batch was in range, read back by the caller after the work."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor
    packing: Packing
    extremes: torch.Tensor

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """The kernel's (and ``pack_padded_batch_reference``'s) outputs, in their order: indices, valid,
        packed ids, packed token types, positions, cu_seqlens, extremes."""
        return (self.packing.indices, self.packing.valid, self.input_ids, self.token_type_ids,
                self.position_ids, self.packing.cu_seqlens, self.extremes)


def pack_padded_batch_reference(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                token_type_ids: torch.Tensor, vocab_size: int, type_vocab_size: int):
    """(indices, valid, packed ids, packed token types, positions, cu_seqlens, extremes): see
    kernels/pack_padded_batch.py."""
    batch, seqlen = input_ids.shape
    packing = static_unpad_input(attention_mask, batch, seqlen)
    keep = attention_mask.bool()
    extremes = torch.stack([*torch.aminmax(torch.where(keep, input_ids, 0)),
                            *torch.aminmax(torch.where(keep, token_type_ids, 0)),
                            *torch.aminmax(attention_mask.to(torch.int64))]).to(torch.int64)
    ids = input_ids.reshape(-1)[packing.indices].to(torch.int64).clamp(0, vocab_size - 1)
    types = token_type_ids.reshape(-1)[packing.indices].to(torch.int64).clamp(0, type_vocab_size - 1)
    return packing.indices, packing.valid, ids, types, packing.indices % seqlen, packing.cu_seqlens, extremes


# ------------------------------------------------------------------------------------------------
# The Triton op. TRITON_INTERPRET must be set before this module is imported for the kernel to run on
# CPU tensors (triton.jit reads it when the kernel is defined).

TRITON_OP = "fastbert::pack_padded_batch"

if backend.triton_available():
    from torch.library import wrap_triton

    from fastbert.kernels.pack_padded_batch import MAX_POSITIONS, _pack_padded_batch_fwd_kernel, pack_padded_batch_fwd

    def _launch(input_ids, attention_mask, token_type_ids, vocab_size: int, type_vocab_size: int, launch=None):
        # The kernels take a row stride per input (0 for token types broadcast from one row) and unit
        # column strides: anything else (a transposed or sliced view, types broadcast from a column)
        # is copied first.
        input_ids, attention_mask, token_type_ids = (
            t if t.shape[1] == 1 or t.stride(1) == 1 else t.contiguous()
            for t in (input_ids, attention_mask, token_type_ids))
        batch, seqlen = input_ids.shape
        n, device = batch * seqlen, input_ids.device
        indices, packed_ids, packed_types, positions = (torch.empty(n, dtype=torch.int64, device=device)
                                                        for _ in range(4))
        valid = torch.empty(n, dtype=torch.bool, device=device)
        extremes = torch.empty(6, dtype=torch.int64, device=device)
        cu_seqlens = torch.empty(2 * batch + 1, dtype=torch.int32, device=device)
        with backend.device_guard(input_ids):
            pack_padded_batch_fwd(input_ids, attention_mask, token_type_ids, vocab_size, type_vocab_size,
                                  (indices, valid, packed_ids, packed_types, positions, cu_seqlens, extremes),
                                  launch=launch)
        return indices, valid, packed_ids, packed_types, positions, cu_seqlens, extremes

    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def _pack_padded_batch_triton(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
        vocab_size: int, type_vocab_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, valid, packed ids, packed token types, positions, cu_seqlens, extremes) of a
        ``[batch, seqlen]`` batch (kernels/pack_padded_batch.py). Arguments are checked as the function
        checks them (a mask of one row read past its end)."""
        _check(input_ids, attention_mask, token_type_ids, vocab_size, type_vocab_size)
        interpreted = backend.is_interpreted(_pack_padded_batch_fwd_kernel)
        return _launch(input_ids, attention_mask, token_type_ids, vocab_size, type_vocab_size,
                       None if interpreted else wrap_triton)


def _check(input_ids, attention_mask, token_type_ids, vocab_size: int, type_vocab_size: int) -> None:
    if vocab_size < 1 or type_vocab_size < 1:
        raise ValueError(f"pack_padded_batch clamps lookups into tables of at least one row, got vocab_size "
                         f"{vocab_size} and type_vocab_size {type_vocab_size}")
    shape = tuple(input_ids.shape)
    if input_ids.dim() != 2 or 0 in shape:
        raise ValueError(f"pack_padded_batch takes a non-empty [batch, seqlen] batch, got input_ids {shape}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match input_ids {shape}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device}, input_ids on {input_ids.device}")
    for name, t in (("input_ids", input_ids), ("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
        if t.is_floating_point() or t.is_complex() or (t.dtype == torch.bool and t is not attention_mask):
            raise TypeError(f"pack_padded_batch takes integer {name} (a bool or integer mask), got {t.dtype}")


def pack_padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                      vocab_size: int, type_vocab_size: int) -> PackedBatch:
    """The static form of a ``[batch, seqlen]`` batch (no host sync, no data-dependent shape), with
    the value extremes its caller reads back: see :class:`PackedBatch`. Any strides: views whose
    columns are not adjacent are copied for the kernel (token types broadcast from one row are not)."""
    args = (input_ids, attention_mask, token_type_ids, int(vocab_size), int(type_vocab_size))
    _check(*args)
    if not backend.use_triton(input_ids, attention_mask, token_type_ids):
        outputs = pack_padded_batch_reference(*args)
    else:
        backend.check_kernel_runs_here(_pack_padded_batch_fwd_kernel, input_ids.device)
        if input_ids.shape[0] * input_ids.shape[1] >= MAX_POSITIONS:  # past what the kernels are made for
            outputs = pack_padded_batch_reference(*args)
        elif backend.direct_launch(input_ids, attention_mask, token_type_ids):
            outputs = _launch(*args)
        else:
            outputs = torch.ops.fastbert.pack_padded_batch(*args)
    indices, valid, ids, types, positions, cu_seqlens, extremes = outputs
    batch, seqlen = input_ids.shape
    return PackedBatch(ids, positions, types, Packing(indices, cu_seqlens, seqlen, batch, seqlen, valid), extremes)


def active_backend(device: torch.device | str) -> str:
    """What ``pack_padded_batch`` runs on tensors of ``device`` under the current backend setting."""
    return "triton" if backend.triton_backend_for(device) else "torch"
