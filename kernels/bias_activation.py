"""Bias + activation on ``[rows, cols]``: ``out = act(x + bias)``, the epilogue of BERT's first FFN
matmul, as its own kernel.

Activations (``ACTIVATION``, a compile-time string):

- ``"gelu"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``, as ``torch.nn.functional.gelu``, computed from
  ``erfc`` (``_gelu_erf``): ``1 + erf(u)`` is ``2 - erfc(u)`` for ``u >= 0`` and ``erfc(|u|)`` for
  ``u < 0``, so the negative tail has no cancellation (PyTorch's fp32 ``1 + erf`` loses it all below
  x = -6; here the relative error stays <= 2e-5 down to the smallest normal result, the absolute
  error <= 4e-7 everywhere, as PyTorch's own; -inf gives 0, its limit, where PyTorch gives NaN).
  ``erfc(z) = t exp(-z^2 + P(t))``, ``t = 1 / (1 + z/2)``, ``P`` the degree-9 Chebyshev fit of
  Press et al., Numerical Recipes 6.2 (fractional error < 1.2e-7).
  Why not the CUDA ``erff`` (``tl.math.erf``): it picks one of two coefficient sets per element,
  which compiles (sm_90, bf16) to 41.5 instructions per element, a quarter of them moves of
  constants into registers. An SM retires 128 thread-instructions a clock, and streaming bf16 at
  the H200's measured copy rate (4.15 TB/s: ~4 elements a clock per SM at 1.98 GHz) leaves ~32 per
  element: on the H200 that kernel ran at 47-62% of copy bandwidth against the tanh form's 71-91%
  (25.5 per element then, 26.5 now). This form is one branch-free Horner chain of immediate FMAs,
  an ``ex2`` and a reciprocal: 34.5 per element (``sass`` of ``fastbert.compile_kernels`` counts them).
- ``"gelu_tanh"``: ``0.5 * x * (1 + tanh(u))`` with ``u = sqrt(2 / pi) * (x + 0.044715 x^3)``, computed
  as ``x * sigmoid(2u) = x / (1 + exp(-2u))`` (the same function, no tanh extern and no cancellation
  in ``1 + tanh``); where ``-2u > 80`` the result is 0 (it is below ``|x| 1.8e-35``), so ``exp`` never
  overflows and huge negative inputs give 0, not ``x / (1 + e^80)``.
- ``"relu"``: ``x`` where ``x >= 0``, else 0 (NaN stays NaN, as ``torch.relu``).

Math is fp32 whatever the input dtype; the result is cast to ``out``'s dtype.

Grid and blocks: 2-D tiles of ``BLOCK_M x BLOCK_N = 8 x 256`` elements, grid
``(cdiv(rows, 8), cdiv(cols, 256))``, 4 warps: 16 elements per thread, loaded as 16-byte vectors
along a row (the bias tile is loaded once per program and broadcast over its rows). A memory-bound
elementwise kernel gains nothing from more choices, so there is one configuration per activation
and dtype. ``bias`` is always a tensor: the launcher passes zeros when there is none (a rare path:
an adapter-wrapped Linear), which keeps one compiled variant per activation and dtype.
"""

import math

import triton
import triton.language as tl

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
BLOCK_M = 8
BLOCK_N = 256
NUM_WARPS = 4


# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2): the coefficients of P, constant term first
# (Press et al., Numerical Recipes, 6.2). The kernel evaluates exp2 instead of exp, so it uses them
# multiplied by log2(e), and its constant term also carries the GELU's factor 1/2 (as -1 in log2).
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)
_P = [tl.constexpr(c * math.log2(math.e) - (1.0 if i == 0 else 0.0)) for i, c in enumerate(_ERFC_COEFFS)]
_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8, _P9 = _P
_HALF_LOG2E = tl.constexpr(0.5 * math.log2(math.e))  # (x / sqrt(2))^2 log2(e) = x^2 * this


@triton.jit
def _gelu_erf(x):
    """``0.5 * x * (1 + erf(x / sqrt(2)))`` of fp32 ``x`` through ``erfc`` (see the module docstring)."""
    # Past |x| = 16 the result is x or 0 in fp32 already; the clamp keeps h finite at x = +-inf
    # (inf -> inf, -inf -> 0, its limit) and lets NaN through.
    x_clamped = tl.clamp(x, -16.0, 16.0, propagate_nan=tl.PropagateNan.ALL)
    t = 1.0 / (1.0 + tl.abs(x_clamped) * 0.35355339059327373)  # z / 2 = |x| / (2 sqrt(2))
    p = _P9 * t + _P8
    p = p * t + _P7
    p = p * t + _P6
    p = p * t + _P5
    p = p * t + _P4
    p = p * t + _P3
    p = p * t + _P2
    p = p * t + _P1
    p = p * t + _P0
    half_erfc = t * tl.exp2(p - x_clamped * (x_clamped * _HALF_LOG2E))  # erfc(|x| / sqrt(2)) / 2, in (0, 1/2]
    h = x_clamped * half_erfc
    # 0.5 x (1 + erf(x / sqrt(2))) is x - h for x >= 0 and h below: no 1 + erf to cancel.
    return tl.where(x >= 0.0, x - h, h)


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    """``ACTIVATION`` of fp32 ``x`` (see the module docstring); also the epilogue of the fused linear
    kernel (kernels/linear_activation.py)."""
    if ACTIVATION == "gelu":
        return _gelu_erf(x)
    elif ACTIVATION == "gelu_tanh":
        # Past -2u = 80 the result is x e^(2u), below |x| 1.8e-35: 0 (also near x = -3e38 or -inf, where
        # x / (1 + e^80) would not be, and where the cube overflows to -inf), and exp never overflows.
        # NaN stays NaN.
        minus_2u = -1.5957691216057308 * (x + 0.044715 * x * x * x)
        y = x / (1.0 + tl.exp(tl.minimum(minus_2u, 80.0)))
        return tl.where(minus_2u > 80.0, 0.0, y)
    else:
        return tl.where(x < 0.0, 0.0, x)


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
    y = _activate(x + b[None, :], ACTIVATION)
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
