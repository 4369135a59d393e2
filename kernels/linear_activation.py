"""Linear + bias + activation: ``out = act(x @ weight.T + bias)``, BERT's first FFN matmul with its
epilogue fused, so the ``[tokens, intermediate]`` pre-activation never goes to memory.

Why: the separate epilogue (``bias_activation``) reads and writes the largest activation of the layer
once more; on the H200 run (2026-11-26) it ran at 47-62% of copy bandwidth, ~1 ms of a 9.4 ms
BERT-base 32x512 forward. Here the activation is applied to the fp32 accumulator before the one store.

Layout: ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (``nn.Linear``'s), both with unit stride along K;
``bias`` ``[N]`` (always a tensor: the launcher passes zeros when there is none); ``out`` ``[M, N]``
with unit column stride.

Program: one ``BLOCK_M x BLOCK_N`` output tile, K walked ``BLOCK_K`` at a time with ``tl.dot`` (fp32
accumulation; tensor cores for fp16 / bf16, ``input_precision="ieee"`` for fp32 so that it matches
PyTorch's fp32 matmul instead of TF32's ~1e-3). Tiles are visited in groups of ``GROUP_M`` row blocks
so that consecutive programs share weight columns in L2. Rows past ``M`` and columns past ``N`` are
read at a wrapped (valid) index instead of masked, and never stored; K is masked only when it is not
a multiple of ``BLOCK_K`` (``EVEN_K``). The activation is ``kernels/bias_activation.py``'s
``_activate``, so both paths compute the same function.

Block sizes (``linear_config``), chosen from the shapes, the dtype and the GPU's SM count:

- fp16 / bf16: ``128 x 128 x 64`` tiles, 8 warps, 4 pipeline stages (3 on GPUs with ~100 KB of shared
  memory per SM, sm_86/89/120); when those tiles would not give every SM one (small batches), ``64 x 64
  x 64`` with 4 warps.
- fp32 (IEEE dots on CUDA cores, operands in registers): ``64 x 64 x 32``, 4 warps, 2 stages: the
  accuracy path, not the fast one.
- ``linear_activation_fwd`` takes a ``config`` override: the microbenchmark sweeps alternatives.

None of these tiles has been timed on a GPU yet (this module was written without one): the model
uses this kernel only when ``FASTBERT_GEMM=triton`` asks for it (``fastbert/ops/backend.py``), until a
GPU run shows it beating cuBLAS + the separate epilogue.
"""

from collections.abc import Mapping
from types import MappingProxyType

import triton
import triton.language as tl

from .bias_activation import ACTIVATIONS, _activate

GROUP_M = 8
# Compute capabilities whose SMs have ~100 KB of shared memory (GeForce Ampere/Ada/Blackwell).
SMALL_SHARED_MEMORY = (86, 89, 120, 121)


@triton.jit
def _linear_activation_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    ACTIVATION: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks walk the column blocks together, sharing weight tiles in L2.
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped indices: every load is in bounds without a mask; the wrapped rows/columns are not stored.
    x_tile = x_ptr + (rows % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_tile = w_ptr + (cols % N).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_tile)
            b = tl.load(w_tile)
        else:
            in_k = offs_k < K - k * BLOCK_K
            a = tl.load(x_tile, mask=in_k[None, :], other=0.0)
            b = tl.load(w_tile, mask=in_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_tile += BLOCK_K
        w_tile += BLOCK_K

    bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = _activate(acc + bias[None, :], ACTIVATION)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


_LARGE = MappingProxyType({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4})
_SMALL = MappingProxyType({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4})
_FP32 = MappingProxyType({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2})
_LARGE_3_STAGES = MappingProxyType({**_LARGE, "num_stages": 3})  # GPUs with ~100 KB of shared memory


def linear_config(m: int, n: int, fp32: bool, capability: int = 90, num_sms: int = 132) -> Mapping[str, int]:
    """Tiles, warps and stages for an ``m x n`` output (see the module docstring); ``capability`` is
    ``10 * major + minor``. Read-only, shared by every launch. ``m`` may be symbolic (a SymInt while
    torch.compile traces dynamic shapes): it only decides large or small tiles, a guard there."""
    if fp32:
        return _FP32
    if -(-m // 128) * -(-n // 128) < num_sms:  # a guard when m is symbolic
        return _SMALL
    return _LARGE_3_STAGES if capability in SMALL_SHARED_MEMORY else _LARGE


def linear_activation_fwd(x, weight, bias, activation: str, out, capability: int = 90, num_sms: int = 132,
                          kernel=None, config: Mapping[str, int] | None = None):
    """Launch the kernel: ``x`` ``[M, K]``, ``weight`` ``[N, K]`` (unit stride along K), ``bias``
    ``[N]`` (never None here), writing ``out`` ``[M, N]`` (unit column stride). ``capability`` and
    ``num_sms`` describe the GPU (they pick the tiles). ``kernel``: the kernel to index by the grid,
    ``wrap_triton(_linear_activation_fwd_kernel)`` inside a custom op (None: this module's kernel,
    launched directly). ``config``: entries replacing ``linear_config``'s. No launch when ``out`` is
    empty; K = 0 gives ``act(bias)``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return out
    fp32 = x.dtype.itemsize == 4
    cfg = linear_config(m, n, fp32, capability, num_sms)
    if config is not None:
        cfg = {**cfg, **config}
    # Plain integer ceil-division: triton.cdiv called from Python costs ~3 us a call (host time).
    grid = (((m + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"]) * ((n + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"]),)
    kernel = _linear_activation_fwd_kernel if kernel is None else kernel
    kernel[grid](
        x, weight, bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        ACTIVATION=activation, PRECISION="ieee" if fp32 else "tf32", EVEN_K=k % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# The block configurations the microbenchmark sweeps besides linear_config's (Hopper-sized tiles).
# The default 128 x 128 tile with 8 warps holds one CTA per SM on sm_90 (136 registers, 128 KB of
# shared memory), so its GELU epilogue (about 30 instructions per element) cannot overlap another
# tile's MMAs; the last two hold two CTAs per SM (registers and shared memory from the sm_90 cubin).
# The last is a Hopper candidate: Triton 3.6 (the GPU image's) spills it on sm_80 (3.8 does not), so
# its compile job is for sm_90 only (``archs``: it is a benchmark sweep's tile, never a default).
SWEEP = (
    MappingProxyType({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}),
    MappingProxyType({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}),
    MappingProxyType({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}),
)


def compile_configs() -> list[dict]:
    """Every configuration ``linear_activation_fwd`` can launch (and the sweep's), as ahead-of-time
    compile jobs, with the GELU epilogue: ``linear_config``'s tiles (the 3-stage variant of GPUs with
    less shared memory included) with K a multiple of ``BLOCK_K`` and not (masked K); the sweep's
    tiles with K a multiple only (BERT's K are multiples of 64)."""
    plans = [("fp32", "fp32", _FP32, (True, False)),
             ("fp16", "large", _LARGE, (True, False)), ("fp16", "small", _SMALL, (True, False)),
             ("bf16", "large", _LARGE, (True, False)), ("bf16", "small", _SMALL, (True, False)),
             ("fp16", "large 3 stages", _LARGE_3_STAGES, (True, False)),
             ("bf16", "large 3 stages", _LARGE_3_STAGES, (True, False))]
    plans += [("bf16", f"sweep {i}", cfg, (True,)) for i, cfg in enumerate(SWEEP)]
    jobs = []
    for dtype, name, cfg, even_ks in plans:
        for even_k in even_ks:
            archs = {"archs": (90,)} if cfg is SWEEP[-1] else {}
            jobs.append({
                **archs,
                "kernel": "linear_activation",
                "name": f"{dtype} {name} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} "
                        f"w={cfg['num_warps']} s={cfg['num_stages']}{'' if even_k else ' ragged K'}",
                "fn": _linear_activation_fwd_kernel,
                "signature": {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                              "out_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32",
                              "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"},
                "constexprs": {"ACTIVATION": "gelu", "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                               "EVEN_K": even_k, "GROUP_M": GROUP_M,
                               **{key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}},
                "divisible": ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "N", "stride_xm", "stride_wn",
                              "stride_om"] + (["K"] if even_k else []),
                "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"],
            })
    return jobs
