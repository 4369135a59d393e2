"""The static-size packing of a padded batch and its value checks, in one program: what a CUDA graph of
a whole forward (``PaddedCUDAGraphRunner``) runs before the embeddings.

Inputs, ``[batch, seqlen]`` with unit column stride (any row stride, 0 for a broadcast row): ``input_ids`` and ``token_type_ids`` (integers)
and ``attention_mask`` (integers or bool; nonzero is a real token). With ``n = batch * seqlen``, the
flat position of ``[b, s]`` is ``b * seqlen + s`` and the outputs are those of
``fastbert.ops.pack_padded_batch_reference``:

- ``indices`` ``[n]`` (int64): the flat positions in packed order, the real tokens first in flat
  order, then the padding in flat order (a stable descending sort of the mask); ``valid`` ``[n]``
  (bool): whether each packed row is a real token;
- ``packed_ids``, ``packed_types`` ``[n]`` (int64): the ids and token types at those positions,
  clamped into ``[0, vocab_size)`` and ``[0, type_vocab_size)`` (a lookup never reads outside its
  table; the caller refuses the batch when ``extremes`` say a real token was out of range);
  ``positions`` ``[n]`` (int64): each position's column, ``index % seqlen``;
- ``cu_seqlens`` ``[2 * batch + 1]`` (int32): the real tokens of row ``b`` are the packed rows
  ``cu_seqlens[b]:cu_seqlens[b + 1]``; then the padding, cut into pieces of at most ``seqlen`` rows:
  ``cu_seqlens[batch + 1 + b] = min(total + (b + 1) * seqlen, n)``;
- ``extremes`` ``[6]`` (int64): the smallest and largest id and token type at real tokens (padding
  read as 0) and the smallest and largest mask value.

One program walks the batch twice, ``BLOCK`` flat positions a step. The first walk counts the real
tokens (``tl.cumsum`` within a block, a running total across blocks), storing each row's first
offset, and takes the extremes; the second stores every position at its packed row: a real token at
``p`` = the real tokens before it, padding at ``total + (its flat position - p)``. The composition of
PyTorch operators it replaces (a sort, a sum and a cumsum, the offsets, two gathers, clamps, the
masked extremes and their stack) is about 19 kernels, each a launch and a dependency in the graph,
which at batch 1 costs more than the work. One program reads ~3 x 8 bytes a position: at the default
buckets (at most 64 x 512) a few microseconds. Past ~10^6 positions the single program would be
slow; the op's callers have buckets far below that.
"""

import triton
import triton.language as tl

BLOCK = 1024
BLOCK_B = 128
NUM_WARPS = 8  # 4 elements per thread and block: more loads in flight for the one program


@triton.jit
def _pack_padded_batch_fwd_kernel(
    ids_ptr, types_ptr, mask_ptr,
    indices_ptr, valid_ptr, packed_ids_ptr, packed_types_ptr, positions_ptr, cu_seqlens_ptr, extremes_ptr,
    batch, seqlen, stride_ids, stride_types, stride_mask, vocab_size, type_vocab_size,
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = batch * seqlen
    offs = tl.arange(0, BLOCK)
    big = 9223372036854775807
    # Running extremes as scalars (a block-wide reduction a step): six [BLOCK] int64 accumulators left
    # an 8-byte stack frame on sm_120.
    id_lo = tl.min(tl.full([BLOCK], big, tl.int64), axis=0)
    id_hi, type_lo, type_hi, mask_lo, mask_hi = -id_lo, id_lo, -id_lo, id_lo, -id_lo
    total = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, n, BLOCK):
        flat = start + offs
        inside = flat < n
        row, col = (flat // seqlen).to(tl.int64), flat % seqlen  # int64 offsets: row * stride
        m = tl.load(mask_ptr + row * stride_mask + col, mask=inside, other=0).to(tl.int64)
        keep = (m != 0) & inside
        ids = tl.where(keep, tl.load(ids_ptr + row * stride_ids + col, mask=inside, other=0).to(tl.int64), 0)
        types = tl.where(keep, tl.load(types_ptr + row * stride_types + col, mask=inside, other=0).to(tl.int64), 0)
        id_lo = tl.minimum(id_lo, tl.min(tl.where(inside, ids, big), axis=0))
        id_hi = tl.maximum(id_hi, tl.max(tl.where(inside, ids, -big), axis=0))
        type_lo = tl.minimum(type_lo, tl.min(tl.where(inside, types, big), axis=0))
        type_hi = tl.maximum(type_hi, tl.max(tl.where(inside, types, -big), axis=0))
        mask_lo = tl.minimum(mask_lo, tl.min(tl.where(inside, m, big), axis=0))
        mask_hi = tl.maximum(mask_hi, tl.max(tl.where(inside, m, -big), axis=0))
        kept = keep.to(tl.int32)
        before = total + tl.cumsum(kept, axis=0) - kept  # real tokens before each position
        tl.store(cu_seqlens_ptr + row, before, mask=inside & (col == 0))
        total += tl.sum(kept, axis=0)
    tl.store(cu_seqlens_ptr + batch, total)
    for b0 in range(0, batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        tl.store(cu_seqlens_ptr + batch + 1 + b, tl.minimum(total + (b + 1) * seqlen, n), mask=b < batch)
    slot = tl.arange(0, 8)
    lows = tl.where(slot == 0, id_lo, tl.where(slot == 2, type_lo, mask_lo))
    highs = tl.where(slot == 1, id_hi, tl.where(slot == 3, type_hi, mask_hi))
    tl.store(extremes_ptr + slot, tl.where(slot % 2 == 0, lows, highs), mask=slot < 6)

    seen = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, n, BLOCK):
        flat = start + offs
        inside = flat < n
        row, col = (flat // seqlen).to(tl.int64), flat % seqlen  # int64 offsets: row * stride
        keep = (tl.load(mask_ptr + row * stride_mask + col, mask=inside, other=0) != 0) & inside
        kept = keep.to(tl.int32)
        before = seen + tl.cumsum(kept, axis=0) - kept
        packed = tl.where(keep, before, total + flat - before)
        ids = tl.load(ids_ptr + row * stride_ids + col, mask=inside, other=0).to(tl.int64)
        types = tl.load(types_ptr + row * stride_types + col, mask=inside, other=0).to(tl.int64)
        tl.store(indices_ptr + packed, flat.to(tl.int64), mask=inside)
        tl.store(valid_ptr + packed, keep, mask=inside)
        tl.store(packed_ids_ptr + packed, tl.minimum(tl.maximum(ids, 0), vocab_size - 1), mask=inside)
        tl.store(packed_types_ptr + packed, tl.minimum(tl.maximum(types, 0), type_vocab_size - 1), mask=inside)
        tl.store(positions_ptr + packed, col.to(tl.int64), mask=inside)
        seen += tl.sum(kept, axis=0)


def pack_padded_batch_fwd(input_ids, attention_mask, token_type_ids, vocab_size: int, type_vocab_size: int,
                          outputs, kernel=None):
    """Launch the kernel: ``outputs`` = (indices, valid, packed_ids, packed_types, positions,
    cu_seqlens, extremes), allocated by the caller with the shapes and dtypes of the module docstring
    (``batch * seqlen`` at least 1 and below 2**30). ``kernel``: the kernel to index by the grid, ``wrap_triton(_pack_padded_batch_fwd_kernel)``
    inside a custom op (None: this module's kernel, launched directly)."""
    batch, seqlen = input_ids.shape
    if not 0 < batch * seqlen < 2**30:
        raise ValueError(f"pack_padded_batch takes 1 to 2**30 - 1 positions, got {batch} x {seqlen}")
    kernel = _pack_padded_batch_fwd_kernel if kernel is None else kernel
    kernel[(1,)](
        input_ids, token_type_ids, attention_mask, *outputs,
        batch, seqlen, input_ids.stride(0), token_type_ids.stride(0), attention_mask.stride(0),
        vocab_size, type_vocab_size,
        BLOCK=BLOCK, BLOCK_B=BLOCK_B, num_warps=NUM_WARPS,
    )
    return outputs


def compile_configs() -> list[dict]:
    """The one configuration the launcher uses, per id dtype (int64 from tokenizers, int32) and mask
    dtype (int64, bool), as ahead-of-time compile jobs."""
    jobs = []
    for ids in ("i64", "i32"):
        for mask in ("i64", "i1"):
            jobs.append({
                "kernel": "pack_padded_batch",
                "name": f"ids {ids} mask {mask} BLOCK={BLOCK}",
                "fn": _pack_padded_batch_fwd_kernel,
                "signature": {
                    "ids_ptr": f"*{ids}", "types_ptr": f"*{ids}", "mask_ptr": f"*{mask}",
                    "indices_ptr": "*i64", "valid_ptr": "*i1", "packed_ids_ptr": "*i64",
                    "packed_types_ptr": "*i64", "positions_ptr": "*i64", "cu_seqlens_ptr": "*i32",
                    "extremes_ptr": "*i64", "batch": "i32", "seqlen": "i32", "stride_ids": "i32",
                    "stride_types": "i32", "stride_mask": "i32", "vocab_size": "i32", "type_vocab_size": "i32",
                },
                "constexprs": {"BLOCK": BLOCK, "BLOCK_B": BLOCK_B},
                "divisible": ["ids_ptr", "types_ptr", "mask_ptr", "indices_ptr", "valid_ptr", "packed_ids_ptr",
                              "packed_types_ptr", "positions_ptr", "cu_seqlens_ptr", "extremes_ptr"],
                "num_warps": NUM_WARPS,
                "num_stages": 1,
            })
    return jobs
