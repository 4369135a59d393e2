"""Attention over packed variable-length sequences, reading Q, K and V in place from the fused QKV
projection output (flash-attention style: one pass over the keys, online softmax in fp32).

Layout
------
``qkv`` is ``[tokens, 3 * hidden]`` with unit column stride (the output of one Linear): columns
``[0, hidden)`` are the queries, ``[hidden, 2 * hidden)`` the keys, ``[2 * hidden, 3 * hidden)`` the
values; head ``h`` owns columns ``[h * head_dim, (h + 1) * head_dim)`` of each. Sequence ``b`` is the
rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int32 offsets); it attends to itself only. The output,
``[tokens, hidden]``, is laid out like the queries. Row strides are kernel arguments, so nothing is
transposed or copied.

Grid and program
----------------
``(cdiv(max_seqlen, BLOCK_M), batch, heads)``: program ``(m, b, h)`` owns query rows
``[m * BLOCK_M, (m + 1) * BLOCK_M)`` of sequence ``b``, head ``h``. A program whose first row lies
past its sequence's end returns at once (so empty sequences and short ones in a batch with a long
``max_seqlen`` cost one load of two offsets). A CUDA graph's static bounds make most programs such:
``CUDAGraphRunner``'s bf16 BERT-base 1x128 launch was 12384 programs per layer, 12 of them with
rows, until its buckets bounded their sequences and rows by their token counts (3120, 24 with
rows). The compact grid (``compact=True``, ``SLOTS`` > 0) launches ``(P, 1, heads)`` instead, ``P``
bounding the query blocks that hold rows (``compact_grid_programs``): program ``p`` reads every
offset once, counts the query blocks of the sequences before it (a cumulative sum over ``SLOTS``, a
power of two >= the sequence count and >= the program's threads) and takes the ``p``-th block; the
rest of the program is the same, so it writes the same values. Launched for head dim 64 only
(``COMPACT_HEAD_DIM``): there it compiles without spills on sm_80/90/120 under Triton 3.6 and 3.8,
where other head dims spilled on sm_80 or sm_120. It walks the keys of its sequence ``BLOCK_N`` at a time:
``S = Q K^T`` (fp32 accumulation), running row maximum ``m`` of the raw scores, running denominator
``l`` and output accumulator rescaled by ``exp2((m_old - m_new) * c)``, where ``c`` is the softmax
scale times ``log2(e)``. So the softmax uses ``exp2``, and each probability ``exp2(s * c - m * c)``
is one fused multiply-add and an exp2; this needs ``c`` to be a normal positive fp32 number
(``softmax_scale_supported``), and the op sends any other scale to the reference. On the
tensor-core path with an even head dim the full key blocks run without a key mask, and only the
partial last block sets columns past the sequence end to ``-inf`` (a compare and a select per score
saved in every other block); the fp32 and masked-head-dim paths keep one masked loop (a second loop
costs registers they do not have). The division by ``l`` happens once at the end. Query rows past
the end are computed on zero queries (finite, never stored).

Head dims are not padded in memory: ``BLOCK_D`` is the next power of two >= ``head_dim`` (at least 16,
the smallest ``tl.dot`` operand), and loads/stores are masked on ``d < head_dim`` unless
``EVEN_D`` (``head_dim == BLOCK_D``), where the mask is dropped at compile time. Head dims 1 to 256
are supported (BERT uses 16 to 128; 26, 48, 80 and 96 are masked).

Precision
---------
Softmax statistics and both matmul accumulators are fp32. fp32 inputs use
``input_precision="ieee"`` on ``tl.dot`` (a GPU would otherwise use TF32 and miss fp32 references by
~1e-3); fp16 / bf16 inputs use the default (tensor cores, fp32 accumulate), with the probabilities
cast to the input dtype for the second matmul, as flash attention does.

Block sizes and warps (``attention_config``)
--------------------------------------------
Chosen from ``BLOCK_D`` and the dtype, and for 16-bit inputs of head dim 64 (BERT-base's, and
-large's) from whether ``max_seqlen`` exceeds ``LONG_SEQLEN`` (128): a model sees at most two
kernels, a CUDA graph or a compiled graph the one of its static bound.

- 16-bit inputs (tensor cores): ``BLOCK_M = 64`` query rows on 4 warps, one warpgroup (32 rows for
  ``BLOCK_D = 256``). sm_90's warpgroup MMA covers 64 rows per warpgroup: 64 rows on 8 warps (the
  tile of the H200 run of 2026-11-26) had both warpgroups compute the same scores and softmax,
  24.1 thread-instructions per score in the key loop of head dim 64 against 9.3 now, with the
  unmasked full blocks and the fused scaling (Triton 3.8, sm_90; a test keeps it at most 12). At
  ~10 per score the issue rate is close to what the MMAs (128 multiply-adds per score at head dim
  64) and the exp2 unit need, where 24 made instruction issue the bound. 64 rows keep enough programs
  (``cdiv(L, 64) * batch * heads``) for short BERT sequences and waste less on rows past the end
  than 128. ``BLOCK_N`` (keys per block): 64 up to ``BLOCK_D = 64``, except 32 for head dim 32
  (MiniLM: Triton 3.6 spilled 64 on sm_120; short sentences fit one block of 32) and for masked head
  dims 33 to 63; 32 for ``BLOCK_D = 128`` (16 when masked) and 256.
- fp32 inputs (IEEE dots run on CUDA cores with both operands in registers, which costs far more
  registers per element): ``BLOCK_M = 64, BLOCK_N = 32``, 4 warps for ``BLOCK_D = 16``; from 32 up
  ``BLOCK_M = 32`` with ``BLOCK_N`` = 64, 32, 16, 16 for ``BLOCK_D`` = 32, 64, 128, 256, 8 warps but
  4 for ``BLOCK_D = 128``. fp32 is the accuracy path (tests, fp32 checkpoints), not the fast one.
- These were picked with ``fastbert compile-kernels`` (Triton 3.8 and 3.6, the GPU image's, no GPU):
  no configuration spills on sm_80, sm_90 or sm_120, masked or not; larger tiles spilled on at least
  one of them (16-bit: head dim 64 masked with 64 keys, 128 with 64 keys, 32 with 64 keys under
  Triton 3.6; fp32: ``BLOCK_D = 16`` with 64 keys). Only the tile of the H200 run has been timed on a
  GPU; ``benchmarks/bench_attention.py`` sweeps it and larger ones against this default.
- ``num_stages = 2``: double-buffer the K/V loads of the key loop (1 for fp32 ``BLOCK_D = 256``).
- Long sequences, 16-bit, head dim 64: ``BLOCK_M = 128`` on 8 warps (two warpgroups of 64 rows,
  each its own rows: not the duplicated 64-row tile above) with 64 keys and 3 stages. In the H200
  sweep of 2026-11-26 (bf16, 12 heads, batch 32) it took 0.055 ms at ``seqlen <= 512`` against 0.064
  for the 64-row default (0.064 with 2 stages: the third stage made the difference), and 0.014
  against 0.012 at ``seqlen <= 128``, hence the bound.

``compile_configs()`` lists every configuration the launcher can pick, and the compact grid's at
head dim 64 (for ``fastbert compile-kernels``). Nothing here imports torch at module level, touches
a device or reads the environment: the interpreter (``TRITON_INTERPRET=1``) runs these kernels on
CPU tensors when it is set before this module is first imported.
"""

import functools
import itertools
from collections.abc import Mapping
from types import MappingProxyType

import triton
import triton.language as tl

MAX_HEAD_DIM = 256
MAX_COMPACT_SLOTS = 1024  # sequences the compact grid takes (each program reads every offset once)
COMPACT_HEAD_DIM = 64  # the head dim the compact grid is launched for (BERT-base and -large)
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_blocks(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, end_n, seqlen, step, qk_scale, offs_n, mask_d,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
):
    """The online softmax over the key blocks ``[start_n, end_n)`` (``k_ptrs`` / ``v_ptrs`` at block
    ``start_n``, advanced by ``step`` per block); returns the updated ``(acc, m_i, l_i)``.

    ``m_i`` is the running maximum of the raw scores ``q . k`` (not scaled): with ``qk_scale > 0`` the
    scaled maximum is ``m_i * qk_scale``, so each probability is one fused multiply-add and an exp2,
    ``exp2(s * qk_scale - m * qk_scale)``. ``MASK_N``: keys may lie past ``seqlen`` (the last, partial
    block only; full blocks skip the compare and select per score)."""
    for n in range(start_n, end_n, BLOCK_N):
        if MASK_N:
            mask_n = n + offs_n < seqlen
            kv_mask = mask_n[:, None] if EVEN_D else mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if MASK_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        # The first block a call runs holds a real key (n < seqlen), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_scaled = m_new * qk_scale
        alpha = tl.exp2(m_i * qk_scale - m_scaled)
        p = tl.exp2(s * qk_scale - m_scaled[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        k_ptrs += step
        v_ptrs += step
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["batch"])
def _attention_fwd_kernel(
    qkv_ptr, cu_seqlens_ptr, out_ptr,
    stride_qkv, stride_out,
    hidden, head_dim,
    qk_scale,  # softmax scale * log2(e), > 0
    batch,  # sequences: cu_seqlens holds batch + 1 offsets (read by the compact grid only)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    SLOTS: tl.constexpr,  # 0: a program per query block of max_seqlen and sequence; else the compact grid
):
    # A direct launch passes the scale as fp32; torch.compile (Inductor) may pass a Python float as
    # fp64, which would make the IEEE path's second dot fp64 x fp32 (a compile error).
    qk_scale = tl.cast(qk_scale, tl.float32)
    if SLOTS == 0:
        start_m = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        # The compact grid: program_id(0) is the number of a query block that holds rows, counting
        # sequence by sequence. Inline, not a helper function: torch.compile's analysis of which
        # pointers a kernel writes would count every argument of a call the store address depends on.
        block = tl.program_id(0)
        s = tl.arange(0, SLOTS)
        inside = s < batch
        starts = tl.load(cu_seqlens_ptr + s, mask=inside, other=0)
        blocks = (tl.load(cu_seqlens_ptr + s + 1, mask=inside, other=0) - starts + BLOCK_M - 1) // BLOCK_M
        through = tl.cumsum(blocks, axis=0)  # query blocks of the sequences up to each one
        seq = tl.sum((through <= block).to(tl.int32), axis=0)  # the first sequence whose blocks pass `block`
        first = tl.sum(tl.where(s == seq, through - blocks, 0), axis=0)  # its first block's number
        # Past the last block with rows: a block of no rows (the op takes under 2**30) of the last sequence.
        start_m = tl.where(seq < batch, block - first, (1 << 30) // BLOCK_M)
        seq = tl.minimum(seq, batch - 1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < head_dim

    # 64-bit row offsets: tokens * 3 * hidden may pass 2**31.
    base = qkv_ptr + seq_start.to(tl.int64) * stride_qkv + head * head_dim
    q_ptrs = base + offs_m.to(tl.int64)[:, None] * stride_qkv + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = base + hidden + offs_n.to(tl.int64)[:, None] * stride_qkv + offs_d[None, :]
    v_ptrs = k_ptrs + hidden
    step = stride_qkv * tl.full((), BLOCK_N, tl.int64)  # 64-bit: a view may have a huge row stride
    if EVEN_D and not IEEE:
        # Full key blocks without a key mask, then the partial last block (if any) with it. Only on
        # the tensor-core path: a second loop costs registers, and the fp32 and masked-head-dim
        # configurations would spill.
        full_end = seqlen - seqlen % BLOCK_N
        acc, m_i, l_i = _attend_key_blocks(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, full_end, seqlen, step,
                                           qk_scale, offs_n, mask_d, BLOCK_N, False, EVEN_D, IEEE)
        tail = (full_end // BLOCK_N).to(tl.int64) * step
        acc, m_i, l_i = _attend_key_blocks(acc, m_i, l_i, q, k_ptrs + tail, v_ptrs + tail, full_end, seqlen,
                                           seqlen, step, qk_scale, offs_n, mask_d, BLOCK_N, True, EVEN_D, IEEE)
    else:
        acc, m_i, l_i = _attend_key_blocks(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, seqlen, seqlen, step,
                                           qk_scale, offs_n, mask_d, BLOCK_N, True, EVEN_D, IEEE)

    out = acc / l_i[:, None]
    o_ptrs = (out_ptr + seq_start.to(tl.int64) * stride_out + head * head_dim
              + offs_m.to(tl.int64)[:, None] * stride_out + offs_d[None, :])
    if EVEN_D:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# 16-bit tiles, (BLOCK_D, even head dim) -> (BLOCK_M, BLOCK_N, num_warps). One warpgroup (4 warps)
# per 64 query rows: with 8 warps on 64 rows, sm_90's wgmma (64 rows per warpgroup) has both
# warpgroups compute the same scores and softmax, twice the instructions per score.
_TENSOR_CORE_TILES = {(16, True): (64, 64, 4), (16, False): (64, 64, 4), (32, True): (64, 32, 4),
                      (32, False): (64, 64, 4), (64, True): (64, 64, 4), (64, False): (64, 32, 4),
                      (128, True): (64, 32, 4), (128, False): (64, 16, 4), (256, True): (32, 32, 4),
                      (256, False): (32, 32, 4)}


_FP32_MIN_NORMAL, _FP32_MAX = 2.0**-126, (2.0 - 2.0**-23) * 2.0**127


def softmax_scale_supported(scale: float) -> bool:
    """Whether the kernel takes ``scale``: ``scale * log2(e)`` must be a normal positive fp32 number.
    The running maximum is kept on raw scores, which needs a positive factor, and a factor that
    rounds to 0 (or flushes to 0 as a denormal) would turn the ``-inf`` of masked keys into NaN."""
    return _FP32_MIN_NORMAL <= scale * _LOG2E <= _FP32_MAX


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


LONG_SEQLEN = 128


@functools.cache  # called at every launch: a dict lookup instead of recomputing (host time)
def attention_config(head_dim: int, fp32: bool, long_sequences: bool = False) -> Mapping[str, int]:
    """Block sizes and launch options for one head dim and dtype class, and whether ``max_seqlen``
    exceeds ``LONG_SEQLEN`` (see the module docstring); read-only, shared by every launch."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention kernel supports head dims 1 to {MAX_HEAD_DIM}, got {head_dim}")
    d = block_d(head_dim)
    stages = 2
    if fp32:
        block_m = 64 if d <= 16 else 32
        block_n = {16: 32, 32: 64, 64: 32, 128: 16, 256: 16}[d]
        warps = 4 if d in (16, 128) else 8
        stages = 1 if d == 256 else 2
    elif long_sequences and d == head_dim == 64:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps = _TENSOR_CORE_TILES[d, head_dim == d]
    return MappingProxyType({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": d, "num_warps": warps,
                             "num_stages": stages})


def compact_grid_programs(tokens: int, batch: int, max_seqlen: int, block_m: int) -> int | None:
    """Programs per head of the compact grid, or None where it cannot take the batch (more than
    ``MAX_COMPACT_SLOTS`` sequences). A sequence of ``L`` rows has ``cdiv(L, BLOCK_M)`` query blocks, at
    most ``L / BLOCK_M + 1`` where ``L > 0``: ``cdiv(tokens, BLOCK_M)`` plus one per sequence bound them
    all (and so does the plain grid's count)."""
    if batch > MAX_COMPACT_SLOTS:
        return None
    return min((max_seqlen + block_m - 1) // block_m * batch, (tokens + block_m - 1) // block_m + min(batch, tokens))


def attention_fwd(qkv, cu_seqlens, max_seqlen: int, num_heads: int, scale: float, out, kernel=None,
                  config: Mapping[str, int] | None = None, compact: bool = False):
    """Launch the kernel: ``qkv`` ``[tokens, 3 * hidden]`` -> ``out`` ``[tokens, hidden]`` (written
    in place at every row of every sequence of ``cu_seqlens``). ``kernel``: the kernel to index by
    the grid, ``wrap_triton(_attention_fwd_kernel)`` inside a custom op (None: this module's kernel,
    launched directly). ``config``: entries replacing ``attention_config``'s (BLOCK_M, BLOCK_N,
    num_warps, num_stages), for benchmarks/bench_attention.py's sweep. ``compact``: the compact grid
    (see the module docstring) where it takes the batch (at most ``MAX_COMPACT_SLOTS`` sequences) and
    the head dim is ``COMPACT_HEAD_DIM``, else the plain grid; opt-in (on the H200 it moved the model's
    times by at most 1.3%). Launches nothing when there is no token or no sequence."""
    if not softmax_scale_supported(scale):
        raise ValueError(f"attention kernel needs a softmax scale whose product with log2(e) is a normal "
                         f"positive fp32 number, got {scale}")
    tokens, hidden = out.shape
    batch = cu_seqlens.shape[0] - 1
    if tokens == 0 or batch <= 0 or max_seqlen <= 0:
        return out
    head_dim = hidden // num_heads
    fp32 = qkv.dtype.itemsize == 4
    cfg = attention_config(head_dim, fp32, max_seqlen > LONG_SEQLEN)
    if config is not None:
        cfg = {**cfg, **config}
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid, slots = ((max_seqlen + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"], batch, num_heads), 0
    # The compact grid only where it was compiled without spills (head dim 64 in every dtype; other
    # head dims spilled on sm_80 or sm_120), else the plain grid.
    programs = (compact_grid_programs(tokens, batch, max_seqlen, cfg["BLOCK_M"])
                if compact and head_dim == cfg["BLOCK_D"] == COMPACT_HEAD_DIM else None)
    if programs is not None:
        # At least one offset per thread: a scan over data that threads hold copies of is where
        # Triton has had bugs (triton-lang/triton#2298).
        grid, slots = (programs, 1, num_heads), max(32 * cfg["num_warps"], triton.next_power_of_2(batch))
    kernel = _attention_fwd_kernel if kernel is None else kernel
    kernel[grid](
        qkv, cu_seqlens, out,
        qkv.stride(0), out.stride(0),
        hidden, head_dim,
        scale * _LOG2E,
        batch,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        EVEN_D=head_dim == cfg["BLOCK_D"], IEEE=fp32, SLOTS=slots,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


_DTYPES = ("fp32", "fp16", "bf16")


def compile_configs() -> list[dict]:
    """Every configuration ``attention_fwd`` can launch, as ahead-of-time compile jobs: one per
    ``BLOCK_D`` (16 to 256), masked or even head dim, dtype (fp32, fp16, bf16), and short or long
    sequences where that changes the configuration."""
    jobs = []
    for dtype, d, even, long_sequences in itertools.product(_DTYPES, (16, 32, 64, 128, 256), (True, False),
                                                           (False, True)):
        head_dim = d if even else d - 6  # any head dim in (d/2, d) picks the same config
        cfg = attention_config(head_dim, dtype == "fp32", long_sequences)
        if long_sequences and cfg == attention_config(head_dim, dtype == "fp32"):
            continue
        # The compact grid where it is launched (head dim 64), with the most slots a CUDAGraphRunner at
        # its defaults launches (its 16384-token bucket: 256 sequences + 256 padding pieces); buckets of
        # up to 192 tokens launch 128 or 256, fewer offsets per thread in the scan.
        for slots in (0, 512) if d == head_dim == COMPACT_HEAD_DIM else (0,):
            constexprs = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
            constexprs.update(EVEN_D=even, IEEE=dtype == "fp32", SLOTS=slots)
            jobs.append({
                "kernel": "attention",
                "name": f"{dtype} D={d}{'' if even else ' masked'}{' long' if long_sequences else ''} "
                        f"M={cfg['BLOCK_M']} N={cfg['BLOCK_N']} w={cfg['num_warps']}"
                        + (f" compact {slots}" if slots else ""),
                "fn": _attention_fwd_kernel,
                "signature": {
                    "qkv_ptr": f"*{dtype}", "cu_seqlens_ptr": "*i32", "out_ptr": f"*{dtype}",
                    "stride_qkv": "i32", "stride_out": "i32", "hidden": "i32", "head_dim": "i32",
                    "qk_scale": "fp32", "batch": "i32",
                },
                "constexprs": constexprs,
                # What the JIT would see at run time: 16-byte aligned buffers, strides and hidden
                # multiples of 16 (BERT's hidden sizes), head_dim a multiple of 16 when even.
                "divisible": ["qkv_ptr", "cu_seqlens_ptr", "out_ptr", "stride_qkv", "stride_out", "hidden"]
                + (["head_dim"] if even else []),
                "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"],
            })
    return jobs
