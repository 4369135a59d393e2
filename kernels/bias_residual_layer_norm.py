"""Bias + residual + LayerNorm on ``[rows, cols]``: ``out = LayerNorm(x + bias + residual) * weight +
ln_bias`` over each row, the end of every BERT sub-layer (dropout is the caller's business: the
kernel runs at inference, dropout 0).

Statistics are fp32 whatever the input dtype, two-pass as ``torch.nn.functional.layer_norm``:
``mean = sum(v) / n``, ``var = sum((v - mean)^2) / n`` (biased), ``rstd = 1 / sqrt(var + eps)``.

Grid, blocks and warps (``layer_norm_config``):

- Rows up to 8192 wide are held in registers: ``BLOCK_N`` = next power of two >= ``cols`` (at least
  128; 97 -> 128, 312 -> 512, 384 -> 512, 768 -> 1024, 4096 -> 4096), masked past ``cols``.
  ``BLOCK_M = max(1, 2048 // BLOCK_N)`` rows per program, so that narrow rows still give each program
  ~2K elements, and ``num_warps = BLOCK_M * BLOCK_N / 512`` (4, 8 or 16): 16 elements per thread and
  tensor, loaded as 16-byte vectors, no spills. Grid ``(cdiv(rows, BLOCK_M),)``.
- Wider rows (``LOOP``): one row per program, 4096-column chunks, three sweeps over the row (sum;
  squared deviations; normalize and store), 16 warps (8 elements per thread and tensor: with 8 warps
  the fp32 variant spilled 8 bytes on sm_90). Reads the inputs three times (from L2 mostly), but any
  width works.

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
def _bias_residual_layer_norm_fwd_kernel(
    x_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, out_ptr,
    n_rows, n_cols,
    stride_x, stride_res, stride_out,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    x_row = x_ptr + rows64 * stride_x
    r_row = res_ptr + rows64 * stride_res
    o_row = out_ptr + rows64 * stride_out
    offs = tl.arange(0, BLOCK_N)
    if not LOOP:
        mask_n = offs < n_cols
        mask = mask_m[:, None] & mask_n[None, :]
        v = _summed_rows(x_row, r_row, bias_ptr, offs, mask, mask_n)
        mean = tl.sum(v, axis=1) / n_cols
        diff = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + offs, mask=mask_n, other=0.0).to(tl.float32)
        lb = tl.load(b_ptr + offs, mask=mask_n, other=0.0).to(tl.float32)
        y = diff * rstd[:, None] * w[None, :] + lb[None, :]
        tl.store(o_row + offs[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
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
            w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
            lb = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
            y = (v - mean[:, None]) * rstd[:, None] * w[None, :] + lb[None, :]
            tl.store(o_row + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache  # called at every launch: a dict lookup instead of recomputing (host time)
def layer_norm_config(n_cols: int) -> Mapping[str, int]:
    """Block sizes and warps for rows of ``n_cols`` (see the module docstring); read-only, shared by
    every launch."""
    block_n = max(128, triton.next_power_of_2(n_cols))
    if block_n > MAX_SINGLE_BLOCK:
        return MappingProxyType({"BLOCK_M": 1, "BLOCK_N": LOOP_BLOCK_N, "LOOP": True, "num_warps": 16})
    block_m = max(1, 2048 // block_n)
    return MappingProxyType({"BLOCK_M": block_m, "BLOCK_N": block_n, "LOOP": False,
                             "num_warps": block_m * block_n // 512})


def bias_residual_layer_norm_fwd(x, bias, residual, weight, ln_bias, eps: float, out, kernel=None):
    """Launch the kernel on 2-D ``x`` and ``residual`` ``[rows, cols]`` (unit column stride),
    ``bias``, ``weight``, ``ln_bias`` ``[cols]`` (``bias`` never None here), writing ``out``.
    ``kernel``: the kernel to index by the grid, ``wrap_triton(_bias_residual_layer_norm_fwd_kernel)``
    inside a custom op (None: this module's kernel, launched directly). No launch when there is no
    row."""
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return out
    cfg = layer_norm_config(n_cols)
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid = ((n_rows + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"],)
    kernel = _bias_residual_layer_norm_fwd_kernel if kernel is None else kernel
    kernel[grid](
        x, bias, residual, weight, ln_bias, out,
        n_rows, n_cols, x.stride(0), residual.stride(0), out.stride(0), eps,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], LOOP=cfg["LOOP"], num_warps=cfg["num_warps"],
    )
    return out


def row_configs():
    """``(name, config)`` of every row block ``layer_norm_config`` can pick (128 to 8192 columns in
    registers, or the chunked loop for wider rows), for the kernels' ``compile_configs``."""
    for n_cols in (128, 256, 512, 1024, 2048, 4096, 8192, 2 * MAX_SINGLE_BLOCK):
        cfg = layer_norm_config(n_cols)
        name = f"loop N={cfg['BLOCK_N']}" if cfg["LOOP"] else f"M={cfg['BLOCK_M']} N={cfg['BLOCK_N']}"
        yield f"{name} w={cfg['num_warps']}", cfg


def compile_configs() -> list[dict]:
    """Every configuration ``bias_residual_layer_norm_fwd`` can launch: one per row block and dtype."""
    jobs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for name, cfg in row_configs():
            ptr = f"*{dtype}"
            jobs.append({
                "kernel": "bias_residual_layer_norm",
                "name": f"{dtype} {name}",
                "fn": _bias_residual_layer_norm_fwd_kernel,
                "signature": {"x_ptr": ptr, "bias_ptr": ptr, "res_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr,
                              "out_ptr": ptr, "n_rows": "i32", "n_cols": "i32", "stride_x": "i32",
                              "stride_res": "i32", "stride_out": "i32", "eps": "fp32"},
                "constexprs": {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "LOOP")},
                "divisible": ["x_ptr", "bias_ptr", "res_ptr", "w_ptr", "b_ptr", "out_ptr", "n_cols",
                              "stride_x", "stride_res", "stride_out"],
                "num_warps": cfg["num_warps"],
                "num_stages": 1,
            })
    return jobs
