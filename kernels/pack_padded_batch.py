"""The static-size packing of a padded batch and its value checks, in two launches of blocks of
positions: what a CUDA graph of a whole forward (``PaddedCUDAGraphRunner``) runs before the embeddings,
and how ``CUDAGraphRunner`` unpads a tokenizer's batch.

Inputs, ``[batch, seqlen]`` with unit column stride (any row stride, 0 for a broadcast row): ``input_ids``
and ``token_type_ids`` (integers) and ``attention_mask`` (integers or bool; nonzero is a real token).
With ``n = batch * seqlen``, the flat position of ``[b, s]`` is ``b * seqlen + s`` and the outputs are
those of ``fastbert.ops.pack_padded_batch_reference``:

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

The flat positions are cut into blocks of ``BLOCK``, one program each, in two launches:

1. ``_pack_padded_batch_count_kernel`` writes each block's real-token count and value extremes to
   ``block_stats`` (``[8, blocks]`` int64, slot-major so that the counts are adjacent: the counts, then
   the six extremes);
2. ``_pack_padded_batch_fwd_kernel`` sums the counts of the blocks before its own (its first packed
   row) and of all blocks (``total``), then stores every position at its packed row: a real token at
   ``p`` = the real tokens before it, padding at ``total + (its flat position - p)``; its first program
   also writes the tail of ``cu_seqlens`` and reduces the blocks' extremes.

Each program of the second launch reads every block's count: ``blocks**2`` reads in all, 4096 at the
default buckets' largest (64 x 512 positions), 2**24 (128 MiB from L2) at ``MAX_POSITIONS``, past
which the op takes its PyTorch composition instead. The single program this replaced walked the
whole batch twice: 0.81x the PyTorch composition at 32 x 512 and 0.44x at 64 x 512 on an H200
(2026-11-26), where the blocks spread the walk over the GPU. The composition of PyTorch operators
both replace (a sort, a sum and a cumsum, the offsets, two gathers,
clamps, the masked extremes and their stack) is about 19 kernels, each a launch and a dependency in
the graph, which at batch 1 costs more than the work.
"""

import triton
import triton.language as tl

BLOCK = 512
BLOCK_B = 128  # block counts (or padding pieces) read a step by the second launch
NUM_WARPS = 4
STATS = 8  # int64 slots a block: its real-token count, then id, type and mask (lowest, highest)
MAX_POSITIONS = 2**21  # the launches take fewer (4096 blocks: see above)
INT64_MAX = tl.constexpr(2**63 - 1)  # the fills of running extremes
INT64_MIN = tl.constexpr(-(2**63))


@triton.jit
def _load_block(ids_ptr, types_ptr, mask_ptr, start, n, seqlen, stride_ids, stride_types, stride_mask,
                BLOCK: tl.constexpr):
    """The block's flat positions, their columns, whether each is inside the batch, its mask value
    (int64), whether it is a real token, and its id and token type (int64, as loaded)."""
    flat = start + tl.arange(0, BLOCK)
    inside = flat < n
    row, col = (flat // seqlen).to(tl.int64), flat % seqlen  # int64 offsets: row * stride
    m = tl.load(mask_ptr + row * stride_mask + col, mask=inside, other=0).to(tl.int64)
    ids = tl.load(ids_ptr + row * stride_ids + col, mask=inside, other=0).to(tl.int64)
    types = tl.load(types_ptr + row * stride_types + col, mask=inside, other=0).to(tl.int64)
    return flat, col, inside, m, (m != 0) & inside, ids, types


@triton.jit
def _pack_padded_batch_count_kernel(
    ids_ptr, types_ptr, mask_ptr, block_stats_ptr,
    batch, seqlen, stride_ids, stride_types, stride_mask,
    BLOCK: tl.constexpr, STATS: tl.constexpr,
):
    n = batch * seqlen
    block = tl.program_id(0)
    _, _, inside, m, keep, ids, types = _load_block(ids_ptr, types_ptr, mask_ptr, block * BLOCK, n, seqlen,
                                                    stride_ids, stride_types, stride_mask, BLOCK)
    ids, types = tl.where(keep, ids, 0), tl.where(keep, types, 0)  # padding read as 0
    slot = tl.arange(0, STATS)
    stats = tl.where(slot == 0, tl.sum(keep.to(tl.int64), axis=0), 0)
    stats = tl.where(slot == 1, tl.min(tl.where(inside, ids, INT64_MAX), axis=0), stats)
    stats = tl.where(slot == 2, tl.max(tl.where(inside, ids, INT64_MIN), axis=0), stats)
    stats = tl.where(slot == 3, tl.min(tl.where(inside, types, INT64_MAX), axis=0), stats)
    stats = tl.where(slot == 4, tl.max(tl.where(inside, types, INT64_MIN), axis=0), stats)
    stats = tl.where(slot == 5, tl.min(tl.where(inside, m, INT64_MAX), axis=0), stats)
    stats = tl.where(slot == 6, tl.max(tl.where(inside, m, INT64_MIN), axis=0), stats)
    tl.store(block_stats_ptr + slot * tl.num_programs(0) + block, stats)


@triton.jit
def _pack_padded_batch_fwd_kernel(
    ids_ptr, types_ptr, mask_ptr, block_stats_ptr,
    indices_ptr, valid_ptr, packed_ids_ptr, packed_types_ptr, positions_ptr, cu_seqlens_ptr, extremes_ptr,
    batch, seqlen, stride_ids, stride_types, stride_mask, vocab_size, type_vocab_size,
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, STATS: tl.constexpr,
):
    n = batch * seqlen
    block = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK)
    # This block's first packed row (the real tokens of the blocks before it) and the batch's total.
    first = tl.sum(tl.zeros([BLOCK_B], tl.int64), axis=0)
    total = first
    for q0 in range(0, blocks, BLOCK_B):
        q = q0 + tl.arange(0, BLOCK_B)
        counts = tl.load(block_stats_ptr + q, mask=q < blocks, other=0)
        first += tl.sum(tl.where(q < block, counts, 0), axis=0)
        total += tl.sum(counts, axis=0)
    first, total = first.to(tl.int32), total.to(tl.int32)  # n < MAX_POSITIONS

    flat, col, inside, _, keep, ids, types = _load_block(ids_ptr, types_ptr, mask_ptr, block * BLOCK, n, seqlen,
                                                         stride_ids, stride_types, stride_mask, BLOCK)
    kept = keep.to(tl.int32)
    before = first + tl.cumsum(kept, axis=0) - kept  # real tokens before each position
    packed = tl.where(keep, before, total + flat - before)
    tl.store(cu_seqlens_ptr + flat // seqlen, before, mask=inside & (col == 0))
    tl.store(indices_ptr + packed, flat.to(tl.int64), mask=inside)
    tl.store(valid_ptr + packed, keep, mask=inside)
    tl.store(packed_ids_ptr + packed, tl.minimum(tl.maximum(ids, 0), vocab_size - 1), mask=inside)
    tl.store(packed_types_ptr + packed, tl.minimum(tl.maximum(types, 0), type_vocab_size - 1), mask=inside)
    tl.store(positions_ptr + packed, col.to(tl.int64), mask=inside)

    if block == 0:
        tl.store(cu_seqlens_ptr + batch, total)
        for b0 in range(0, batch, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            tl.store(cu_seqlens_ptr + batch + 1 + b, tl.minimum(total + (b + 1) * seqlen, n), mask=b < batch)
        # The extremes over the blocks: slots 1, 3, 5 are lowest values, 2, 4, 6 highest.
        slot = tl.arange(0, STATS)
        lows = tl.full([STATS], INT64_MAX, tl.int64)
        highs = tl.full([STATS], INT64_MIN, tl.int64)
        for q0 in range(0, blocks, BLOCK_B):
            q = q0 + tl.arange(0, BLOCK_B)
            listed = (q < blocks)[None, :]  # not `inside`, which holds another shape (a name keeps its type)
            stats = tl.load(block_stats_ptr + slot[:, None] * blocks + q[None, :], mask=listed, other=0)
            lows = tl.minimum(lows, tl.min(tl.where(listed, stats, INT64_MAX), axis=1))
            highs = tl.maximum(highs, tl.max(tl.where(listed, stats, INT64_MIN), axis=1))
        tl.store(extremes_ptr + slot - 1, tl.where(slot % 2 == 1, lows, highs), mask=(slot >= 1) & (slot <= 6))


def pack_padded_batch_fwd(input_ids, attention_mask, token_type_ids, vocab_size: int, type_vocab_size: int,
                          outputs, launch=None):
    """Launch both kernels: ``outputs`` = (indices, valid, packed_ids, packed_types, positions,
    cu_seqlens, extremes), allocated by the caller with the shapes and dtypes of the module docstring
    (``batch * seqlen`` at least 1 and below ``MAX_POSITIONS``; unit column strides); the blocks'
    scratch is allocated here. ``launch`` wraps each kernel before it is indexed by its grid
    (``torch.library.wrap_triton`` inside a custom op; None: launched directly)."""
    batch, seqlen = input_ids.shape
    n = batch * seqlen
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if seqlen > 1 and t.stride(1) != 1:  # the kernels read columns as adjacent elements
            raise ValueError(f"pack_padded_batch's kernels take unit column strides, got {name} strides {t.stride()}")
    if not 0 < n < MAX_POSITIONS:
        raise ValueError(f"pack_padded_batch's kernels take 1 to {MAX_POSITIONS - 1} positions, got {batch} x {seqlen}")
    wrap = (lambda kernel: kernel) if launch is None else launch
    blocks = triton.cdiv(n, BLOCK)
    block_stats = outputs[0].new_empty((STATS, blocks))  # int64, as the indices
    strides = (input_ids.stride(0), token_type_ids.stride(0), attention_mask.stride(0))
    wrap(_pack_padded_batch_count_kernel)[(blocks,)](
        input_ids, token_type_ids, attention_mask, block_stats, batch, seqlen, *strides,
        BLOCK=BLOCK, STATS=STATS, num_warps=NUM_WARPS,
    )
    wrap(_pack_padded_batch_fwd_kernel)[(blocks,)](
        input_ids, token_type_ids, attention_mask, block_stats, *outputs, batch, seqlen, *strides,
        vocab_size, type_vocab_size,
        BLOCK=BLOCK, BLOCK_B=BLOCK_B, STATS=STATS, num_warps=NUM_WARPS,
    )
    return outputs


def compile_configs() -> list[dict]:
    """The one configuration of each kernel the launcher uses, per id dtype (int64 from tokenizers,
    int32) and mask dtype (int64, bool), as ahead-of-time compile jobs."""
    inputs = ("ids_ptr", "types_ptr", "mask_ptr")
    outputs = {"indices_ptr": "*i64", "valid_ptr": "*i1", "packed_ids_ptr": "*i64", "packed_types_ptr": "*i64",
               "positions_ptr": "*i64", "cu_seqlens_ptr": "*i32", "extremes_ptr": "*i64"}
    sizes = {name: "i32" for name in ("batch", "seqlen", "stride_ids", "stride_types", "stride_mask")}
    jobs = []
    for ids in ("i64", "i32"):
        for mask in ("i64", "i1"):
            pointers = {"ids_ptr": f"*{ids}", "types_ptr": f"*{ids}", "mask_ptr": f"*{mask}", "block_stats_ptr": "*i64"}
            for fn, signature, constexprs in (
                    (_pack_padded_batch_count_kernel, {**pointers, **sizes}, {"BLOCK": BLOCK, "STATS": STATS}),
                    (_pack_padded_batch_fwd_kernel,
                     {**pointers, **outputs, **sizes, "vocab_size": "i32", "type_vocab_size": "i32"},
                     {"BLOCK": BLOCK, "BLOCK_B": BLOCK_B, "STATS": STATS})):
                jobs.append({
                    "kernel": "pack_padded_batch",
                    "name": f"{fn.__name__.removeprefix('_pack_padded_batch_')} ids {ids} mask {mask} BLOCK={BLOCK}",
                    "fn": fn,
                    "signature": signature,
                    "constexprs": constexprs,
                    "divisible": [name for name in signature if name.endswith("_ptr")],
                    "num_warps": NUM_WARPS,
                    "num_stages": 1,
                })
    return jobs
