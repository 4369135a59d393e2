"""Bias + activation on ``[rows, cols]``: ``out = act(x + bias)``, the epilogue of BERT's first FFN
matmul, as its own kernel.

Activations (``ACTIVATION``, a compile-time string):

- ``"gelu"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``, as ``torch.nn.functional.gelu``; ``tl.math.erf``
  runs in the interpreter (``math.erf``) and compiles to the CUDA erf without a libdevice extern call
  written here.
- ``"gelu_tanh"``: ``0.5 * x * (1 + tanh(u))`` with ``u = sqrt(2 / pi) * (x + 0.044715 x^3)``, computed
  as ``x * sigmoid(2u) = x / (1 + exp(-2u))`` (the same function, no tanh extern and no cancellation
  in ``1 + tanh``); ``-2u`` is clamped at 80 so that ``exp`` never overflows.
- ``"relu"``: ``x`` where ``x >= 0``, else 0 (NaN stays NaN, as ``torch.relu``).

Math is fp32 whatever the input dtype; the result is cast to ``out``'s dtype.

Grid and blocks: 2-D tiles of ``BLOCK_M x BLOCK_N = 8 x 256`` elements, grid
``(cdiv(rows, 8), cdiv(cols, 256))``, 4 warps: 16 elements per thread, loaded as 16-byte vectors
along a row (the bias tile is loaded once per program and broadcast over its rows). A memory-bound
elementwise kernel gains nothing from more choices, so there is one configuration per activation
and dtype. ``bias`` is always a tensor: the launcher passes zeros when there is none (a rare path:
an adapter-wrapped Linear), which keeps one compiled variant per activation and dtype.
"""

import triton
import triton.language as tl

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
BLOCK_M = 8
BLOCK_N = 256
NUM_WARPS = 4


@triton.jit
def _bias_activation_fwd_kernel(
    x_ptr, bias_ptr, out_ptr,
    n_rows, n_cols,
    stride_x, stride_out,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < n_cols
    mask = (rows < n_rows)[:, None] & mask_n[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    x = x + b[None, :]
    if ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # exp(-2u) is clamped at exp(80): beyond it the result is -|x| e^-80, zero to every dtype's
        # tolerance, and nothing overflows (the interpreter would warn).
        y = x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
    else:
        y = tl.where(x < 0.0, 0.0, x)
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def bias_activation_fwd(x, bias, activation: str, out, kernel=None):
    """Launch the kernel on 2-D ``x`` ``[rows, cols]`` (unit column stride), ``bias`` ``[cols]``
    (never None here), writing ``out`` ``[rows, cols]``. ``kernel``: the kernel to index by the grid,
    ``wrap_triton(_bias_activation_fwd_kernel)`` inside a custom op (None: this module's kernel,
    launched directly). No launch when ``x`` is empty."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return out
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid = ((n_rows + BLOCK_M - 1) // BLOCK_M, (n_cols + BLOCK_N - 1) // BLOCK_N)
    kernel = _bias_activation_fwd_kernel if kernel is None else kernel
    kernel[grid](
        x, bias, out, n_rows, n_cols, x.stride(0), out.stride(0),
        ACTIVATION=activation, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
    )
    return out


def compile_configs() -> list[dict]:
    """Every configuration ``bias_activation_fwd`` can launch: one per activation and dtype."""
    jobs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for activation in ACTIVATIONS:
            jobs.append({
                "kernel": "bias_activation",
                "name": f"{dtype} {activation} M={BLOCK_M} N={BLOCK_N} w={NUM_WARPS}",
                "fn": _bias_activation_fwd_kernel,
                "signature": {"x_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                              "n_rows": "i32", "n_cols": "i32", "stride_x": "i32", "stride_out": "i32"},
                "constexprs": {"ACTIVATION": activation, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N},
                "divisible": ["x_ptr", "bias_ptr", "out_ptr", "n_cols", "stride_x", "stride_out"],
                "num_warps": NUM_WARPS,
                "num_stages": 1,
            })
    return jobs
