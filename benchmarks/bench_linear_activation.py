"""Microbenchmark of linear + bias + GELU, BERT's first FFN matmul with its epilogue (GPU only).

Implementations, each on the same inputs ``x [tokens, hidden]``, ``weight [intermediate, hidden]``:

- ``fastbert-triton-gemm``: ``fastbert.ops.linear_activation`` under ``FASTBERT_GEMM=triton``, one
  Triton GEMM with the bias and GELU on its accumulator (``linear_config``'s tiles);
- ``fastbert-triton-gemm-<tile>``: the same launch helper with the tiles of ``SWEEP`` (16-bit only);
- ``fastbert-cublas+epilogue``: the op under ``FASTBERT_GEMM=cublas``: ``F.linear`` (cuBLAS) and then
  the ``bias_activation`` kernel (the default before the third H200 measurement);
- ``fastbert-cublaslt``: the op under ``FASTBERT_GEMM=cublaslt``, the default in 16-bit: one cuBLASLt
  GEMM with the bias and (tanh-form) GELU in its epilogue (``torch._addmm_activation``);
- ``torch-eager``: ``F.linear(x, weight, bias)`` (cuBLAS with the bias in its epilogue) then ``F.gelu``;
- ``torch-compile``: the same under ``torch.compile`` (default mode).

TFLOP/s counts ``2 * tokens * hidden * intermediate``; ``roofline_fraction`` divides it by the bf16
matmul peak measured in this run. Device time per call (``timed_kernel``). Without a CUDA device every
case skips. ``FASTBERT_BENCH_SMOKE=1``: tiny fp32 / fp16 cases on the CPU, the kernel under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, SMOKE, compile_peer, device_or_skip, timed_kernel, triton_or_skip

DTYPES = {"bf16": torch.bfloat16}
SHAPES = {"bert-base": (768, 3072), "bert-large": (1024, 4096)}  # (hidden, intermediate)
TOKENS = [128, 4096, 16384]  # 128: the batch of one whose CUDA-graph replay is launch-bound
IMPLS = ["fastbert-triton-gemm", "fastbert-cublas+epilogue", "fastbert-cublaslt", "torch-eager", "torch-compile"]
if SMOKE:  # bf16 is not exact under the Triton interpreter
    DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
    SHAPES = {"tiny": (64, 96)}
    TOKENS = [80]


def _sweep():
    from fastbert.ops import backend

    if not backend.triton_available():
        return {}
    from fastbert.kernels.linear_activation import SWEEP

    return {f"fastbert-triton-gemm-{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}-w{c['num_warps']}-s{c['num_stages']}": c
            for c in SWEEP}


SWEEP = _sweep()
_compiled = {}


@pytest.mark.parametrize("impl", IMPLS + list(SWEEP))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_linear_activation(benchmark, record, matmul_peak_tflops, monkeypatch, dtype_name, shape, tokens, impl):
    device_or_skip()
    from fastbert.ops import backend
    from fastbert.ops.bias_activation import bias_activation
    from fastbert.ops.linear_activation import linear_activation, linear_activation_reference

    dtype = DTYPES[dtype_name]
    hidden, intermediate = SHAPES[shape]
    if impl.startswith("fastbert"):
        triton_or_skip()
    if impl in SWEEP and dtype.itemsize != 2:
        pytest.skip("the tile sweep is for 16-bit inputs")
    if impl == "torch-compile" and "fn" not in _compiled:
        _compiled["fn"] = compile_peer(lambda x, w, b: F.gelu(F.linear(x, w, b)))
    monkeypatch.setenv("FASTBERT_GEMM", "triton" if impl.startswith("fastbert-triton-gemm") else
                       "cublaslt" if impl == "fastbert-cublaslt" else "cublas")

    def build(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        x = torch.randn(tokens, hidden, device=DEVICE, generator=gen).to(dtype)
        weight = (torch.randn(intermediate, hidden, device=DEVICE, generator=gen) / hidden ** 0.5).to(dtype)
        bias = torch.randn(intermediate, device=DEVICE, generator=gen).to(dtype)
        if impl in SWEEP:
            from fastbert.kernels.linear_activation import linear_activation_fwd

            # NaN-filled: a tile that leaves elements unwritten fails the check, never timed.
            out = torch.full((tokens, intermediate), float("nan"), device=DEVICE, dtype=dtype)

            def call():  # the launch helper with other tiles (what the op launches, reconfigured)
                return linear_activation_fwd(x, weight, bias, "gelu", out, config=SWEEP[impl])
        elif impl.startswith("fastbert"):
            def call():  # the public op, as the model calls it
                with backend.use_backend("triton"):
                    return linear_activation(x, weight, bias, "gelu")
        elif impl == "torch-eager":
            def call():
                return F.gelu(F.linear(x, weight, bias))
        else:
            def call():
                return _compiled["fn"](x, weight, bias)
        call.inputs = (x, weight, bias)
        return call

    size = dtype.itemsize
    moved = (tokens * hidden + intermediate * hidden + tokens * intermediate) * size
    with torch.inference_mode():
        if impl.startswith("fastbert"):  # agrees with the reference before it is timed
            first = build(0)
            x, weight, bias = first.inputs
            expected = linear_activation_reference(x.float(), weight.float(), bias.float(), "gelu")
            same = linear_activation_reference(x, weight, bias, "gelu").float()
            budget = 2 * (same - expected).abs().max().item() + 1e-3
            assert (first().float() - expected).abs().max().item() <= budget
        seconds = timed_kernel(benchmark, build, moved, rounds=30, warmup=5)

    tflops = 2 * tokens * hidden * intermediate / seconds / 1e12
    roofline = tflops / matmul_peak_tflops if matmul_peak_tflops else None
    benchmark.extra_info.update(impl=impl, tflops=tflops, roofline_fraction=roofline)
    record(case=f"linear+gelu {dtype_name} {shape} tokens={tokens}", impl=impl, seconds=seconds,
           tflops=tflops, roofline_fraction=roofline, tokens_per_s=tokens / seconds)
