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
``max_seqlen`` cost one load of two offsets). It walks the keys of its sequence ``BLOCK_N`` at a time:
``S = Q K^T`` (fp32 accumulation), columns past the sequence end set to ``-inf``, running row maximum
``m``, running denominator ``l`` and output accumulator rescaled by ``exp2(m_old - m_new)``; the
scale is folded with ``log2(e)`` so the softmax uses ``exp2``. The division by ``l`` happens once at
the end. Query rows past the end are computed on zero queries (finite, never stored).

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
Chosen from ``BLOCK_D`` and the dtype only (not from sequence lengths, so a CUDA graph or a compiled
graph sees one kernel per model):

- 16-bit inputs (tensor cores): ``BLOCK_M = 64`` query rows (32 for ``BLOCK_D = 256``). BERT
  sequences are short (often <= 128 tokens), and 64 keeps enough programs
  (``cdiv(L, 64) * batch * heads``) to fill the SMs where 128 would leave many idle and waste work on
  rows past the end. ``BLOCK_N = 64`` keys up to ``BLOCK_D = 64``, 32 above (the K and V tiles and
  the fp32 accumulator ``BLOCK_M x BLOCK_D`` must stay in registers); 4 warps up to
  ``BLOCK_D = 32``, 8 from 64 up.
- fp32 inputs (IEEE dots run on CUDA cores with both operands in registers, which costs far more
  registers per element): ``BLOCK_M = 64, BLOCK_N = 64``, 4 warps for ``BLOCK_D = 16``; from 32 up
  ``BLOCK_M = 32`` with ``BLOCK_N`` = 64, 32, 16, 16 for ``BLOCK_D`` = 32, 64, 128, 256, 8 warps but
  4 for ``BLOCK_D = 128``. fp32 is the accuracy path (tests, fp32 checkpoints), not the fast one.
- These were picked with ``fastbert compile-kernels`` (Triton 3.8 and 3.6, the GPU image's, no GPU):
  no configuration spills on sm_80, sm_90 or sm_120, masked or not; the larger tiles tried first
  (``BLOCK_M = 64`` in fp32 from ``BLOCK_D = 32``, fp16 ``BLOCK_D = 64`` masked with 4 warps, fp16
  ``BLOCK_D = 256`` with ``BLOCK_M = 64``) spilled on at least one of them, and Triton 3.6 spilled
  fp32 ``BLOCK_D = 128`` at 32 x 32 with 8 warps (sm_120) and ``BLOCK_D = 256`` masked with two
  stages (sm_80). None of this has been timed on a GPU.
- ``num_stages = 2``: double-buffer the K/V loads of the key loop (1 for fp32 ``BLOCK_D = 256``).

``compile_configs()`` lists every configuration the launcher can pick (for
``fastbert compile-kernels``). Nothing here imports torch at module level, touches a device or
reads the environment: the interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors
when it is set before this module is first imported.
"""

import functools
from collections.abc import Mapping
from types import MappingProxyType

import triton
import triton.language as tl

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd_kernel(
    qkv_ptr, cu_seqlens_ptr, out_ptr,
    stride_qkv, stride_out,
    hidden, head_dim,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    seq = tl.program_id(1)
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

    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        kv_rows = cols.to(tl.int64)[:, None] * stride_qkv + offs_d[None, :]
        if EVEN_D:
            kv_mask = mask_n[:, None]
        else:
            kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(base + hidden + kv_rows, mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * hidden + kv_rows, mask=kv_mask, other=0.0)

        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))

        # The first key block always holds key 0 (seqlen >= 1 here), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = (out_ptr + seq_start.to(tl.int64) * stride_out + head * head_dim
              + offs_m.to(tl.int64)[:, None] * stride_out + offs_d[None, :])
    if EVEN_D:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@functools.cache  # called at every launch: a dict lookup instead of recomputing (host time)
def attention_config(head_dim: int, fp32: bool) -> Mapping[str, int]:
    """Block sizes and launch options for one head dim and dtype class (see the module docstring);
    read-only, shared by every launch."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention kernel supports head dims 1 to {MAX_HEAD_DIM}, got {head_dim}")
    d = block_d(head_dim)
    stages = 2
    if fp32:
        block_m = 64 if d <= 16 else 32
        block_n = {16: 64, 32: 64, 64: 32, 128: 16, 256: 16}[d]
        warps = 4 if d in (16, 128) else 8
        stages = 1 if d == 256 else 2
    else:
        block_m = 32 if d >= 256 else 64
        block_n = 64 if d <= 64 else 32
        warps = 4 if d <= 32 else 8
    return MappingProxyType({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": d, "num_warps": warps,
                             "num_stages": stages})


def attention_fwd(qkv, cu_seqlens, max_seqlen: int, num_heads: int, scale: float, out, kernel=None,
                  config: Mapping[str, int] | None = None):
    """Launch the kernel: ``qkv`` ``[tokens, 3 * hidden]`` -> ``out`` ``[tokens, hidden]`` (written
    in place at every row of every sequence of ``cu_seqlens``). ``kernel``: the kernel to index by
    the grid, ``wrap_triton(_attention_fwd_kernel)`` inside a custom op (None: this module's kernel,
    launched directly). ``config``: entries replacing ``attention_config``'s (BLOCK_M, BLOCK_N,
    num_warps, num_stages), for benchmarks/bench_attention.py's sweep. Launches nothing when there is
    no token or no sequence."""
    tokens, hidden = out.shape
    batch = cu_seqlens.shape[0] - 1
    if tokens == 0 or batch <= 0 or max_seqlen <= 0:
        return out
    head_dim = hidden // num_heads
    fp32 = qkv.dtype.itemsize == 4
    cfg = attention_config(head_dim, fp32)
    if config is not None:
        cfg = {**cfg, **config}
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid = ((max_seqlen + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"], batch, num_heads)
    kernel = _attention_fwd_kernel if kernel is None else kernel
    kernel[grid](
        qkv, cu_seqlens, out,
        qkv.stride(0), out.stride(0),
        hidden, head_dim,
        scale * _LOG2E,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        EVEN_D=head_dim == cfg["BLOCK_D"], IEEE=fp32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


_DTYPES = ("fp32", "fp16", "bf16")


def compile_configs() -> list[dict]:
    """Every configuration ``attention_fwd`` can launch, as ahead-of-time compile jobs: one per
    ``BLOCK_D`` (16 to 256), masked or even head dim, and dtype (fp32, fp16, bf16)."""
    jobs = []
    for dtype in _DTYPES:
        for d in (16, 32, 64, 128, 256):
            for even in (True, False):
                head_dim = d if even else d - 6  # any head dim in (d/2, d) picks the same config
                cfg = attention_config(head_dim, dtype == "fp32")
                constexprs = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
                constexprs.update(EVEN_D=even, IEEE=dtype == "fp32")
                jobs.append({
                    "kernel": "attention",
                    "name": f"{dtype} D={d}{'' if even else ' masked'} M={cfg['BLOCK_M']} N={cfg['BLOCK_N']} "
                            f"w={cfg['num_warps']}",
                    "fn": _attention_fwd_kernel,
                    "signature": {
                        "qkv_ptr": f"*{dtype}", "cu_seqlens_ptr": "*i32", "out_ptr": f"*{dtype}",
                        "stride_qkv": "i32", "stride_out": "i32", "hidden": "i32", "head_dim": "i32",
                        "qk_scale": "fp32",
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
