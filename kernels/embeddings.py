"""Embeddings over packed tokens in Triton: ``out[t] = LayerNorm(word[ids[t]] + token_type[types[t]] +
position[positions[t]]) * weight + bias``, the same op as the CUDA extension's
``torch.ops.fastbert.embedding_layer_norm`` (csrc/embedding_layer_norm.cu), kept as its comparison
point and as the fast path where the extension is not built.

The sum is fp32 in transformers' order ((word + token_type) + position); statistics are fp32,
two-pass: ``mean = sum(x) / n``, ``var = sum((x - mean)^2) / n``, ``rstd = 1 / sqrt(var + eps)``.

Grid, blocks and warps (``embeddings_config``):

- Rows up to 8192 wide are held in registers: ``BLOCK_N`` = next power of two >= ``hidden`` (at least
  128), masked past ``hidden``; ``BLOCK_M = max(1, 2048 // BLOCK_N)`` tokens per program and
  ``num_warps = BLOCK_M * BLOCK_N / 512``. Grid ``(cdiv(tokens, BLOCK_M),)``.
- Wider rows (``LOOP``): one token per program, 4096-column chunks, three sweeps (sum; squared
  deviations; normalize and store), the tables re-read from L2; 16 warps (8 spill on sm_90 in fp32).

Indices outside their tables are never dereferenced (the load uses row 0 instead); the token's output
row is NaN and ``error_flag[0]`` is set to 1, for the caller to read back and raise.
"""

import triton
import triton.language as tl

# Rows are LayerNorm rows as in bias + residual + LayerNorm: the same block, warp and loop choice
# (its 16 warps for the chunked loop also keep this kernel from spilling fp32 on sm_90).
from .bias_residual_layer_norm import row_block_config as embeddings_config
from .bias_residual_layer_norm import row_configs


@triton.jit
def _summed_embeddings(w_row, t_row, p_row, cols, mask):
    """``(word + token_type) + position`` in fp32 (transformers' order) at columns ``cols``."""
    w = tl.load(w_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return (w + t) + p


@triton.jit
def _embeddings_fwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr,
    word_ptr, pos_ptr, type_ptr, w_ptr, b_ptr, out_ptr, error_flag_ptr,
    n_tokens, hidden, vocab, max_positions, type_vocab,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n_tokens
    ids = tl.load(ids_ptr + rows, mask=mask_m, other=0)
    pos = tl.load(pos_ids_ptr + rows, mask=mask_m, other=0)
    types = tl.load(type_ids_ptr + rows, mask=mask_m, other=0)
    valid = (ids >= 0) & (ids < vocab) & (pos >= 0) & (pos < max_positions) & (types >= 0) & (types < type_vocab)
    bad = mask_m & (valid == 0)
    tl.store(error_flag_ptr, 1, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
    ok = mask_m & valid
    # Out-of-range (and past-the-end) tokens read row 0: always inside the tables.
    w_row = word_ptr + tl.where(ok, ids, 0).to(tl.int64)[:, None] * hidden
    p_row = pos_ptr + tl.where(ok, pos, 0).to(tl.int64)[:, None] * hidden
    t_row = type_ptr + tl.where(ok, types, 0).to(tl.int64)[:, None] * hidden
    o_row = out_ptr + rows.to(tl.int64)[:, None] * hidden
    offs = tl.arange(0, BLOCK_N)
    if not LOOP:
        mask_n = offs < hidden
        mask = mask_m[:, None] & mask_n[None, :]
        x = _summed_embeddings(w_row, t_row, p_row, offs, mask)
        mean = tl.sum(x, axis=1) / hidden
        diff = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / hidden
        rstd = 1.0 / tl.sqrt(var + eps)
        g = tl.load(w_ptr + offs, mask=mask_n, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask_n, other=0.0).to(tl.float32)
        y = diff * rstd[:, None] * g[None, :] + b[None, :]
        y = tl.where(ok[:, None], y, float("nan"))
        tl.store(o_row + offs[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_N):
            cols = start + offs
            mask = mask_m[:, None] & (cols < hidden)[None, :]
            total += _summed_embeddings(w_row, t_row, p_row, cols, mask)
        mean = tl.sum(total, axis=1) / hidden
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_N):
            cols = start + offs
            mask = mask_m[:, None] & (cols < hidden)[None, :]
            diff = tl.where(mask, _summed_embeddings(w_row, t_row, p_row, cols, mask) - mean[:, None], 0.0)
            total += diff * diff
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=1) / hidden + eps)
        # Bad rows become NaN by adding a per-row 0 or NaN rather than a per-element select: one
        # register less, which keeps Triton 3.6's ptxas for sm_120 from spilling in fp32.
        poison = tl.where(ok, 0.0, float("nan"))
        for start in range(0, hidden, BLOCK_N):
            cols = start + offs
            mask_n = cols < hidden
            mask = mask_m[:, None] & mask_n[None, :]
            # LayerNorm weights before the sum: in the other order Triton 3.6 spills here on sm_120.
            g = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
            x = _summed_embeddings(w_row, t_row, p_row, cols, mask)
            y = (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :] + poison[:, None]
            tl.store(o_row + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def embeddings_fwd(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                   ln_weight, ln_bias, eps: float, out, error_flag, launch=None):
    """Launch the kernel: ids, positions and types ``[tokens]`` int64; the tables ``[rows, hidden]`` and
    ``ln_weight``, ``ln_bias`` ``[hidden]``, all contiguous; ``out`` ``[tokens, hidden]``;
    ``error_flag`` one int32 set to 1 when an index is out of range (the caller zeroes it).
    ``launch`` wraps the kernel before it is indexed by its grid (``torch.library.wrap_triton``);
    no launch when there is no token."""
    tokens, hidden = out.shape
    if tokens == 0 or hidden == 0:
        return out
    cfg = embeddings_config(hidden)
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid = ((tokens + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"],)
    kernel = _embeddings_fwd_kernel if launch is None else launch(_embeddings_fwd_kernel)
    kernel[grid](
        input_ids, position_ids, token_type_ids,
        word_weight, position_weight, token_type_weight, ln_weight, ln_bias, out, error_flag,
        tokens, hidden, word_weight.shape[0], position_weight.shape[0], token_type_weight.shape[0], eps,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], LOOP=cfg["LOOP"], num_warps=cfg["num_warps"],
    )
    return out


def compile_configs() -> list[dict]:
    """Every configuration ``embeddings_fwd`` can launch (for ``fastbert compile-kernels``): one per row
    block (the LayerNorm rows' blocks) and dtype."""
    jobs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for name, cfg in row_configs():
            ptr = f"*{dtype}"
            jobs.append({
                "kernel": "embeddings",
                "name": f"{dtype} {name}",
                "fn": _embeddings_fwd_kernel,
                "signature": {"ids_ptr": "*i64", "pos_ids_ptr": "*i64", "type_ids_ptr": "*i64",
                              "word_ptr": ptr, "pos_ptr": ptr, "type_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr,
                              "out_ptr": ptr, "error_flag_ptr": "*i32", "n_tokens": "i32", "hidden": "i32",
                              "vocab": "i32", "max_positions": "i32", "type_vocab": "i32", "eps": "fp32"},
                "constexprs": {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "LOOP")},
                "divisible": ["ids_ptr", "pos_ids_ptr", "type_ids_ptr", "word_ptr", "pos_ptr", "type_ptr",
                              "w_ptr", "b_ptr", "out_ptr", "hidden"],
                "num_warps": cfg["num_warps"],
                "num_stages": 1,
            })
    return jobs
