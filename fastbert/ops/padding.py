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
    max_seqlen: int  # bounds every sequence length (a host int: kernels size their grids with it)
    batch: int
    seqlen: int
    valid: torch.Tensor | None = None  # [tokens] bool: False for padding carried along (static form)
    # The fast path's attention on its compact grid (kernels/attention.py), for static bounds that leave
    # most of the plain grid empty (CUDAGraphRunner's compact_attention).
    compact_attention: bool = False

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seqlen if self.indices is None else self.indices.numel()

    def first_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed index of the token at column 0 of each input row (of each sequence, for input
        packed by the caller), and whether that token is real (a row whose first position is
        padding has none: it pools a zero vector)."""
        if self.indices is None:
            starts = self.cu_seqlens[:-1].long()  # one per row, or one per sequence of a packed row
            return starts.clamp(max=max(self.num_tokens - 1, 0)), self.cu_seqlens.diff() > 0
        starts = self.cu_seqlens[: self.batch].long()
        seqlens = self.cu_seqlens[1: self.batch + 1].long() - starts
        starts = starts.clamp(max=max(self.num_tokens - 1, 0))
        return starts, (seqlens > 0) & (self.indices[starts] % self.seqlen == 0)


def _check_mask(attention_mask: torch.Tensor, batch: int, seqlen: int) -> None:
    if tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} is not the [batch, seqlen] = "
                         f"[{batch}, {seqlen}] of the input")


def unpad_input(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device) -> Packing:
    """Packing of a ``[batch, seqlen]`` input under a 0/1 ``attention_mask`` (None: all kept)."""
    if attention_mask is not None:
        _check_mask(attention_mask, batch, seqlen)
    if attention_mask is None or batch == 0:
        return packing_of(None, None, seqlen, batch * seqlen, batch, seqlen, device)
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    longest, total = torch.stack([seqlens.max(), seqlens.sum()]).tolist()
    return packing_of(keep, seqlens, longest, total, batch, seqlen, device)


def _multiples(seqlen: int, first: int, count: int, device) -> torch.Tensor:
    """``count`` int32 multiples of ``seqlen`` from ``first * seqlen`` (row offsets), in one launch;
    zeros for rows of no positions (arange takes no step 0)."""
    if not seqlen:
        return torch.zeros(count, dtype=torch.int32, device=device)
    return torch.arange(first * seqlen, (first + count) * seqlen, seqlen, dtype=torch.int32, device=device)


def packing_of(keep, seqlens, max_seqlen: int, total: int, batch: int, seqlen: int, device) -> Packing:
    """The packing of a mask whose statistics the host already has (``max_seqlen`` and ``total`` kept
    tokens): no further sync where ``torch.nonzero_static`` exists."""
    if keep is None or total == batch * seqlen:
        return Packing(None, _multiples(seqlen, 0, batch + 1, device), seqlen if batch else 0, batch, seqlen)
    flat = keep.flatten()
    if hasattr(torch, "nonzero_static"):
        indices = torch.nonzero_static(flat, size=total).flatten()
    else:
        indices = torch.nonzero(flat).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return Packing(indices, cu_seqlens, max_seqlen, batch, seqlen)


def static_unpad_input(attention_mask: torch.Tensor, batch: int, seqlen: int) -> Packing:
    """The static-size form of :func:`unpad_input`, for ``torch.compile`` and CUDA graphs: no host
    sync and no data-dependent shape. All ``batch * seqlen`` positions are carried: the real tokens
    first, in the same order as ``unpad_input``, then the padding, cut into sequences of at most
    ``seqlen`` tokens that attend only among themselves (so ``seqlen`` bounds every sequence). The
    padding rows are computed on, never read: ``valid`` marks them and :func:`pad` writes zeros."""
    _check_mask(attention_mask, batch, seqlen)
    keep = attention_mask.bool()
    # A stable descending sort of the mask puts the real tokens first, in order, then the padding; the
    # sorted values are then `valid` itself. (Fewer kernels than sorting a negated copy and comparing
    # an arange with the count: in a CUDA graph of a small batch each kernel is time.)
    valid, indices = torch.sort(keep.flatten(), descending=True, stable=True)
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    real = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    steps = _multiples(seqlen, 1, batch, keep.device)
    padding = torch.clamp(real[-1] + steps, max=batch * seqlen)
    return Packing(indices, torch.cat([real, padding]), seqlen, batch, seqlen, valid)


def pack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[batch, seqlen, ...]`` -> ``[tokens, ...]``."""
    if tuple(x.shape[:2]) != (packing.batch, packing.seqlen):
        raise ValueError(f"pack: x {tuple(x.shape)} does not start with the packing's [batch, seqlen] = "
                         f"[{packing.batch}, {packing.seqlen}]")
    flat = x.reshape(packing.batch * packing.seqlen, *x.shape[2:])
    return flat if packing.indices is None else flat[packing.indices]


def pad(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[tokens, ...]`` -> ``[batch, seqlen, ...]`` with zeros at padded positions."""
    if packed.dim() == 0 or packed.shape[0] != packing.num_tokens:
        raise ValueError(f"pad: packed {tuple(packed.shape)} must have one row per packed token "
                         f"({packing.num_tokens})")
    shape = (packing.batch * packing.seqlen, *packed.shape[1:])
    if packing.valid is not None:
        packed = torch.where(packing.valid.view(-1, *[1] * (packed.dim() - 1)), packed, 0)
        if packing.indices is not None:
            # The static form carries every position once (its indices are a permutation), so each
            # output row is written exactly once: no zero fill first (one kernel fewer in a graph).
            # In place on a new tensor that needs no gradient: autograd records the copy all the same.
            out = packed.new_empty(shape).index_copy_(0, packing.indices, packed)
            return out.view(packing.batch, packing.seqlen, *packed.shape[1:])
    if packing.indices is None:
        return packed.reshape(packing.batch, packing.seqlen, *packed.shape[1:])
    out = packed.new_zeros(shape)
    out = out.index_copy(0, packing.indices, packed)  # out of place, so autograd flows through
    return out.view(packing.batch, packing.seqlen, *packed.shape[1:])


def check_offsets(cu_seqlens: torch.Tensor, rows: int, name: str, of_what: str) -> int:
    """Raise ValueError unless ``cu_seqlens`` (at least two offsets, called ``name``) rises from 0 to
    ``rows`` (the number of ``of_what``); the longest sequence otherwise. One host read."""
    seqlens = cu_seqlens.diff()
    first, last, smallest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], seqlens.min(), seqlens.max()]).tolist()
    if first != 0 or last != rows or smallest < 0:
        raise ValueError(f"{name} must rise from 0 to the number of {of_what} ({rows}); it goes from {first} "
                         f"to {last}" + (" and decreases" if smallest < 0 else ""))
    return longest


def sequence_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: the sequence it belongs to and its index inside that sequence."""
    batch = cu_seqlens.numel() - 1
    seqlens = cu_seqlens.diff().long()
    seq_idx = torch.repeat_interleave(
        torch.arange(batch, device=cu_seqlens.device), seqlens, output_size=num_tokens
    )
    offset = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[seq_idx]
    return seq_idx, offset
