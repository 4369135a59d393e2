"""Unpad / re-pad helpers: the model computes on packed tokens, never on padding.

Packed layout: the kept tokens of a ``[batch, seqlen]`` input, row by row, in column order;
sequence ``b`` is ``packed[cu_seqlens[b]:cu_seqlens[b + 1]]``. Holes in the mask are allowed:
a sequence is the kept tokens of its row, wherever they stand.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Packing(NamedTuple):
    """Where the packed tokens come from and which sequences they form.

    ``batch`` x ``seqlen`` is the input's layout (what :func:`pad` restores); ``cu_seqlens`` splits
    the packed tokens into the sequences that attend to themselves. Usually one sequence per row;
    an input already packed by the caller (one row of several sequences) has more.
    """

    indices: torch.Tensor | None  # [tokens] flat positions in [batch * seqlen]; None: every token kept
    cu_seqlens: torch.Tensor  # [sequences + 1] int32 offsets of each sequence in the packed tokens
    max_seqlen: int  # the longest sequence (a host int: kernels size their grids with it)
    batch: int
    seqlen: int

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seqlen if self.indices is None else self.indices.numel()


def unpad_input(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device) -> Packing:
    """Packing of a ``[batch, seqlen]`` input under a 0/1 ``attention_mask`` (None: all kept)."""
    if attention_mask is None or bool(attention_mask.all()):
        cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return Packing(None, cu_seqlens[: batch + 1], seqlen if batch else 0, batch, seqlen)
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten()).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if batch else 0
    return Packing(indices, cu_seqlens, max_seqlen, batch, seqlen)


def pack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[batch, seqlen, ...]`` -> ``[tokens, ...]``."""
    flat = x.reshape(packing.batch * packing.seqlen, *x.shape[2:])
    return flat if packing.indices is None else flat[packing.indices]


def pad(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[tokens, ...]`` -> ``[batch, seqlen, ...]`` with zeros at padded positions."""
    if packing.indices is None:
        return packed.reshape(packing.batch, packing.seqlen, *packed.shape[1:])
    out = packed.new_zeros(packing.batch * packing.seqlen, *packed.shape[1:])
    out = out.index_copy(0, packing.indices, packed)  # out of place, so autograd flows through
    return out.view(packing.batch, packing.seqlen, *packed.shape[1:])


def sequence_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: the sequence it belongs to and its index inside that sequence."""
    batch = cu_seqlens.numel() - 1
    seqlens = cu_seqlens.diff().long()
    seq_idx = torch.repeat_interleave(
        torch.arange(batch, device=cu_seqlens.device), seqlens, output_size=num_tokens
    )
    offset = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[seq_idx]
    return seq_idx, offset
