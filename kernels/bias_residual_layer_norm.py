"""Bias + residual + LayerNorm on ``[rows, cols]``: ``out = LayerNorm(x + bias + residual) * weight +
ln_bias`` over each row, the end of every BERT sub-layer (dropout is the caller's business: the
kernel runs at inference, dropout 0).

Statistics are fp32 whatever the input dtype, two-pass as ``torch.nn.functional.layer_norm``:
``mean = sum(v) / n``, ``var = sum((v - mean)^2) / n`` (biased), ``rstd = 1 / sqrt(var + eps)``.

Grid, blocks and warps (``layer_norm_config``):

- Rows of ``3 * 2^k`` columns or a little less (``cols <= 3/4`` of the next power of two ``P``; chunk
  ``P / 4`` of at least 32: 96 to 6144, BERT-base's 768 and MiniLM's 384 among them) are held in
  registers as ``CHUNKS = 3`` chunks of ``BLOCK_N = P / 4`` columns: 768 is 3 x 256, where one 1024-wide
  block would issue every instruction for a quarter of masked lanes. ``BLOCK_M = max(1, 2048 //
  BLOCK_N)`` rows per program and 16 elements per thread, chunk and tensor (two 16-byte vectors in
  16-bit dtypes; 8 for 2048-wide chunks): ``num_warps = BLOCK_M * BLOCK_N / 512`` (4; 8 for 2048).
  On sm_90 in bf16 this issues 19.2 thread-instructions per element of a 768-wide row (8 rows of
  3 x 256, 4 warps; 19.7 with Triton 3.6) against 34.7 for the masked 1024 block: at the H200's copy
  rate an SM has ~48 issue slots per element to spend (4.15 TB/s over 6 bytes per element, 132 SMs
  at 1.98 GHz, 128 lanes a clock), and the masked block ran at 53-71% of that bandwidth there.
  8 elements per thread (4 rows) took 22.7 and left Triton 3.6 an 8-byte stack frame on sm_90.
- Other rows up to 8192 wide are held in registers as one block: ``BLOCK_N`` = next power of two
  >= ``cols`` (at least 128; 97 -> 128, 1024 -> 1024, 4096 -> 4096), masked past ``cols``.
  ``BLOCK_M = max(1, 2048 // BLOCK_N)`` rows per program, so that narrow rows still give each program
  ~2K elements, and ``num_warps = BLOCK_M * BLOCK_N / 512`` (4, 8 or 16): 16 elements per thread and
  tensor, loaded as 16-byte vectors, no spills. Grid ``(cdiv(rows, BLOCK_M),)``.
- ``EVEN`` (``cols`` fills the block or the three chunks exactly): tiles are masked by row only, so no
  per-element column predicate is computed.
- Wider rows (``LOOP``): one row per program, 4096-column chunks, three sweeps over the row (sum;
  squared deviations; normalize and store), 16 warps (8 elements per thread and tensor: with 8 warps
  the fp32 variant spilled 8 bytes on sm_90). Reads the inputs three times (from L2 mostly), but any
  width works.

- Few rows (``fills_the_gpu`` false: the default blocks would give fewer programs than the GPU has
  SMs): one row a program, warps cut to keep at most 16 elements per thread and chunk (one warp for
  768 columns), so that a batch of one 128-token sequence runs on 128 SMs instead of 16.

``bias`` is always a tensor (the launcher passes zeros when there is none), so one compiled variant
serves both cases.
"""

import functools
from collections.abc import Mapping
from types import MappingProxyType

import triton
import triton.language as tl

MAX_SINGLE_BLOCK = 8192
LOOP_BLOCK_N = 4096


@triton.jit
def _summed_rows(x_row, r_row, bias_ptr, cols, mask, mask_n):
    """``x + bias + residual`` in fp32 for the rows at ``x_row`` / ``r_row``, columns ``cols``."""
    x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    return x + b[None, :] + r


@triton.jit
def _tile_mask(mask_m, mask_n, EVEN: tl.constexpr):
    """The mask of a ``[rows, cols]`` tile: rows only when ``EVEN`` (every column is inside the row),
    which keeps the loads and stores whole 16-byte vectors without per-element predicates."""
    if EVEN:
        return mask_m[:, None]
    else:
        return mask_m[:, None] & mask_n[None, :]


@triton.jit
def _centered(v, mean, mask, EVEN: tl.constexpr):
    """``v - mean`` per row, 0 at masked columns (so they add nothing to the variance)."""
    if EVEN:
        return v - mean[:, None]
    else:
        return tl.where(mask, v - mean[:, None], 0.0)


@triton.jit
def _store_normalized(o_row, diff, rstd, w_ptr, b_ptr, cols, mask, mask_n):
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    lb = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + lb[None, :]
    tl.store(o_row + cols[None, :], y.to(o_row.dtype.element_ty), mask=mask)


@triton.jit
def _bias_residual_layer_norm_fwd_kernel(
    x_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, out_ptr,
    n_rows, n_cols,
    stride_x, stride_res, stride_out,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP: tl.constexpr, CHUNKS: tl.constexpr = 1,
    EVEN: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    x_row = x_ptr + rows64 * stride_x
    r_row = res_ptr + rows64 * stride_res
    o_row = out_ptr + rows64 * stride_out
    offs = tl.arange(0, BLOCK_N)
    if LOOP:
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs
            mask_n = cols < n_cols
            mask = mask_m[:, None] & mask_n[None, :]
            total += tl.where(mask, _summed_rows(x_row, r_row, bias_ptr, cols, mask, mask_n), 0.0)
        mean = tl.sum(total, axis=1) / n_cols
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs
            mask_n = cols < n_cols
            mask = mask_m[:, None] & mask_n[None, :]
            v = _summed_rows(x_row, r_row, bias_ptr, cols, mask, mask_n)
            diff = tl.where(mask, v - mean[:, None], 0.0)
            total += diff * diff
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=1) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs
            mask_n = cols < n_cols
            mask = mask_m[:, None] & mask_n[None, :]
            v = _summed_rows(x_row, r_row, bias_ptr, cols, mask, mask_n)
            _store_normalized(o_row, v - mean[:, None], rstd, w_ptr, b_ptr, cols, mask, mask_n)
    elif CHUNKS == 3:
        # The row as three BLOCK_N-wide chunks held in registers (768 = 3 x 256 without the quarter
        # of masked lanes a 1024-wide block carries).
        c1 = offs + BLOCK_N
        c2 = offs + 2 * BLOCK_N
        n0, n1, n2 = offs < n_cols, c1 < n_cols, c2 < n_cols
        m0, m1, m2 = _tile_mask(mask_m, n0, EVEN), _tile_mask(mask_m, n1, EVEN), _tile_mask(mask_m, n2, EVEN)
        v0 = _summed_rows(x_row, r_row, bias_ptr, offs, m0, n0)
        v1 = _summed_rows(x_row, r_row, bias_ptr, c1, m1, n1)
        v2 = _summed_rows(x_row, r_row, bias_ptr, c2, m2, n2)
        mean = (tl.sum(v0, axis=1) + tl.sum(v1, axis=1) + tl.sum(v2, axis=1)) / n_cols
        d0, d1, d2 = _centered(v0, mean, m0, EVEN), _centered(v1, mean, m1, EVEN), _centered(v2, mean, m2, EVEN)
        var = (tl.sum(d0 * d0, axis=1) + tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1)) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        _store_normalized(o_row, d0, rstd, w_ptr, b_ptr, offs, m0, n0)
        _store_normalized(o_row, d1, rstd, w_ptr, b_ptr, c1, m1, n1)
        _store_normalized(o_row, d2, rstd, w_ptr, b_ptr, c2, m2, n2)
    else:
        mask_n = offs < n_cols
        mask = _tile_mask(mask_m, mask_n, EVEN)
        v = _summed_rows(x_row, r_row, bias_ptr, offs, mask, mask_n)
        mean = tl.sum(v, axis=1) / n_cols
        diff = _centered(v, mean, mask, EVEN)
        var = tl.sum(diff * diff, axis=1) / n_cols
        _store_normalized(o_row, diff, 1.0 / tl.sqrt(var + eps), w_ptr, b_ptr, offs, mask, mask_n)


@functools.cache  # called at every launch: a dict lookup instead of recomputing (host time)
def row_block_config(n_cols: int) -> Mapping[str, int]:
    """One power-of-two block per row, or the chunked loop past 8192 columns (see the module
    docstring); also the embeddings kernel's choice. Read-only, shared by every launch."""
    block_n = max(128, triton.next_power_of_2(n_cols))
    if block_n > MAX_SINGLE_BLOCK:
        return MappingProxyType({"BLOCK_M": 1, "BLOCK_N": LOOP_BLOCK_N, "LOOP": True, "num_warps": 16})
    block_m = max(1, 2048 // block_n)
    return MappingProxyType({"BLOCK_M": block_m, "BLOCK_N": block_n, "LOOP": False,
                             "num_warps": block_m * block_n // 512})


@functools.cache  # called at every launch: a dict lookup instead of recomputing (host time)
def layer_norm_config(n_cols: int, one_row: bool = False) -> Mapping[str, int]:
    """This kernel's blocks, warps, ``CHUNKS`` and ``EVEN`` for rows of ``n_cols`` (see the module
    docstring); ``one_row``: one row per program (``BLOCK_M = 1``, warps cut to match, at least one),
    for grids that would otherwise leave SMs idle. Read-only, shared by every launch."""
    chunk = triton.next_power_of_2(n_cols) // 4
    if chunk >= 32 and n_cols <= 3 * chunk and 4 * chunk <= MAX_SINGLE_BLOCK:
        block_m = 1 if one_row else max(1, 2048 // chunk)
        per_thread = 16 if chunk < 2048 else 8  # three 2048-wide chunks at 16 spilled (Triton 3.6, sm_120)
        return MappingProxyType({"BLOCK_M": block_m, "BLOCK_N": chunk, "LOOP": False, "CHUNKS": 3,
                                 "EVEN": n_cols == 3 * chunk,
                                 "num_warps": max(1, block_m * chunk // (32 * per_thread))})
    cfg = row_block_config(n_cols)
    if one_row and not cfg["LOOP"]:
        cfg = {**cfg, "BLOCK_M": 1, "num_warps": max(1, cfg["BLOCK_N"] // 512)}
    return MappingProxyType({**cfg, "CHUNKS": 1, "EVEN": not cfg["LOOP"] and n_cols == cfg["BLOCK_N"]})


def fills_the_gpu(n_rows, n_cols: int, num_sms: int) -> bool:
    """Whether the default blocks give every SM a program. A BERT-base batch of one 128-token sequence
    is 128 rows: at 8 rows a program that is 16 programs for an H100's 132 SMs, and each of the 24
    LayerNorms of a forward waited on 16 SMs (4.6 us a launch on an H200, the largest share of the
    batch-1 graph replay); one row a program gives 128. A symbolic row count (torch.compile with dynamic
    shapes) keeps the default blocks: comparing it would add a guard and a recompilation per side."""
    if not isinstance(n_rows, int):
        return True
    cfg = layer_norm_config(n_cols)
    return cfg["BLOCK_M"] == 1 or (n_rows + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"] >= num_sms


def bias_residual_layer_norm_fwd(x, bias, residual, weight, ln_bias, eps: float, out, num_sms: int = 132,
                                 kernel=None, config: Mapping[str, int] | None = None):
    """Launch the kernel on 2-D ``x`` and ``residual`` ``[rows, cols]`` (unit column stride),
    ``bias``, ``weight``, ``ln_bias`` ``[cols]`` (``bias`` never None here), writing ``out``.
    ``num_sms``: the GPU's SM count (``fills_the_gpu``: fewer rows than SMs take one row a program).
    ``kernel``: the kernel to index by the grid, ``wrap_triton(_bias_residual_layer_norm_fwd_kernel)``
    inside a custom op (None: this module's kernel, launched directly). ``config``: entries replacing
    the chosen configuration's (BLOCK_M, num_warps), for benchmarks/bench_bias_residual_layer_norm.py's
    sweep. No launch when there is no row."""
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return out
    cfg = layer_norm_config(n_cols, not fills_the_gpu(n_rows, n_cols, num_sms))
    if config is not None:
        cfg = {**cfg, **config}
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid = ((n_rows + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"],)
    kernel = _bias_residual_layer_norm_fwd_kernel if kernel is None else kernel
    kernel[grid](
        x, bias, residual, weight, ln_bias, out,
        n_rows, n_cols, x.stride(0), residual.stride(0), out.stride(0), eps,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], LOOP=cfg["LOOP"], CHUNKS=cfg["CHUNKS"], EVEN=cfg["EVEN"],
        num_warps=cfg["num_warps"],
    )
    return out


def _config_name(cfg: Mapping) -> str:
    """A configuration as ``compile_configs`` names it: its rows and block (or chunks, or loop) and
    warps, ``even`` when it drops the column mask."""
    if cfg["LOOP"]:
        block = f"loop N={cfg['BLOCK_N']}"
    elif cfg.get("CHUNKS", 1) == 3:
        block = f"M={cfg['BLOCK_M']} 3x{cfg['BLOCK_N']}"
    else:
        block = f"M={cfg['BLOCK_M']} N={cfg['BLOCK_N']}"
    return f"{block} w={cfg['num_warps']}{' even' if cfg.get('EVEN') else ''}"


def row_configs():
    """``(name, config)`` of every block ``row_block_config`` can pick (128 to 8192 columns in
    registers, or the chunked loop for wider rows), for the kernels' ``compile_configs``."""
    for n_cols in (128, 256, 512, 1024, 2048, 4096, 8192, 2 * MAX_SINGLE_BLOCK):
        cfg = row_block_config(n_cols)
        yield _config_name(cfg), cfg


def layer_norm_configs():
    """``(name, config)`` of every configuration ``layer_norm_config`` can pick: each single block
    masked and even, the loop, and three chunks of 32 to 2048 columns, masked and even; each with its
    default rows per program and with one row (named once where both are the same)."""
    picked = {}
    for one_row in (False, True):
        for n_cols in (128, 256, 512, 1024, 2048, 4096, 8192, 2 * MAX_SINGLE_BLOCK):
            for cols in {n_cols - 1, n_cols} if n_cols <= MAX_SINGLE_BLOCK else {n_cols}:
                cfg = layer_norm_config(cols, one_row)
                if cfg["CHUNKS"] == 1:  # n_cols - 1 may pick three chunks: listed below
                    picked.setdefault(_config_name(cfg), cfg)
        for chunk in (32, 64, 128, 256, 512, 1024, 2048):
            for n_cols in (3 * chunk - 1, 3 * chunk):
                cfg = layer_norm_config(n_cols, one_row)
                assert cfg["CHUNKS"] == 3 and cfg["BLOCK_N"] == chunk, (n_cols, cfg)
                picked.setdefault(_config_name(cfg), cfg)
    yield from picked.items()


def compile_configs() -> list[dict]:
    """Every configuration ``bias_residual_layer_norm_fwd`` can launch: one per block and dtype."""
    jobs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for name, cfg in layer_norm_configs():
            ptr = f"*{dtype}"
            jobs.append({
                "kernel": "bias_residual_layer_norm",
                "name": f"{dtype} {name}",
                "fn": _bias_residual_layer_norm_fwd_kernel,
                "signature": {"x_ptr": ptr, "bias_ptr": ptr, "res_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr,
                              "out_ptr": ptr, "n_rows": "i32", "n_cols": "i32", "stride_x": "i32",
                              "stride_res": "i32", "stride_out": "i32", "eps": "fp32"},
                "constexprs": {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "LOOP", "CHUNKS", "EVEN")},
                "divisible": ["x_ptr", "bias_ptr", "res_ptr", "w_ptr", "b_ptr", "out_ptr", "n_cols",
                              "stride_x", "stride_res", "stride_out"],
                "num_warps": cfg["num_warps"],
                "num_stages": 1,
            })
    return jobs
