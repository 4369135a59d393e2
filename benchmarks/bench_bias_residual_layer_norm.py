"""Microbenchmark of bias + residual + LayerNorm on ``[tokens, hidden]`` (GPU only).

Implementations, each on the same inputs:

- ``fastbert-triton``: ``fastbert.ops.bias_residual_layer_norm``, the op the model calls (one pass);
- ``torch-eager``: the PyTorch reference (``x + bias``, ``+ residual``, ``F.layer_norm``);
- ``torch-compile``: the same reference under ``torch.compile`` (Inductor fuses it too).

GB/s counts the bytes an ideal kernel moves: ``x`` and ``residual`` read, the output written, plus
the three ``[hidden]`` vectors. ``benchmark.extra_info`` holds ``gbs``, ``bytes`` and ``impl``. Device
time per call (``timed_kernel``: CUDA-graph replays over input sets larger than the L2). Without a
CUDA device every case skips. ``FASTBERT_BENCH_SMOKE=1``: tiny fp32 / fp16 cases on the CPU,
the kernel under ``TRITON_INTERPRET=1``.

Collected by ``pytest benchmarks/ --benchmark-only`` when ``bench_*.py`` is in ``python_files``; this
file's rows go to the suite's results table (benchmarks/conftest.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.conftest import DEVICE, SMOKE, compile_peer, device_or_skip, timed_kernel, triton_or_skip

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = [384, 768, 1024, 4096]
TOKENS = [4096, 16384]
# The row counts of a 1x128 and an 8x128 batch: there a CUDA-graph replay's 24 LayerNorms took 4.6 us
# each on the H200 (2026-11-26, second measurement), the largest share of the replay, with 8 rows per
# program (16 programs for 132 SMs at 128 rows). Since then the launcher takes one row a program (one
# warp at 768 columns) wherever the default blocks would leave SMs idle: both of these row counts on an
# H100 or H200. The sweep, at BERT-base's width, holds the default blocks (M8-w4, what ran before) and
# the blocks between, so that one run says whether that rule is right.
SMALL_TOKENS = [128, 1024]
SWEEP = {"fastbert-triton-M8-w4": dict(BLOCK_M=8, num_warps=4), "fastbert-triton-M2-w1": dict(BLOCK_M=2, num_warps=1),
         "fastbert-triton-M4-w2": dict(BLOCK_M=4, num_warps=2)}
SWEEP_HIDDEN = 768  # BERT-base's width
IMPLS = ["fastbert-triton", "torch-eager", "torch-compile"]
EPS = 1e-12
if SMOKE:  # bf16 is not exact under the Triton interpreter
    DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
    HIDDEN = [64]
    TOKENS = [256]
    SMALL_TOKENS = [16]
    SWEEP = {"fastbert-triton-M8-w4": dict(BLOCK_M=8, num_warps=4)}
    SWEEP_HIDDEN = 64
_compiled = {}


def _cases():
    """Every impl on TOKENS; at SMALL_TOKENS, fastbert and eager PyTorch only, and the sweep at
    SWEEP_HIDDEN in 16-bit dtypes."""
    for dtype_name, hidden, tokens, impl in itertools.product(DTYPES, HIDDEN, TOKENS + SMALL_TOKENS,
                                                              IMPLS + list(SWEEP)):
        small = tokens in SMALL_TOKENS
        if small and impl == "torch-compile":
            continue
        if impl in SWEEP and not (small and hidden == SWEEP_HIDDEN and dtype_name != "fp32"):
            continue
        yield dtype_name, hidden, tokens, impl


@pytest.mark.parametrize("dtype_name, hidden, tokens, impl", list(_cases()))
def test_bias_residual_layer_norm(benchmark, record, copy_bandwidth_gbs, dtype_name, hidden, tokens, impl):
    device_or_skip()
    from fastbert.ops import backend
    from fastbert.ops.bias_residual_layer_norm import bias_residual_layer_norm
    from fastbert.ops.bias_residual_layer_norm import bias_residual_layer_norm_reference as reference

    dtype = DTYPES[dtype_name]
    ours = impl.startswith("fastbert-triton")  # the op, or the launcher with a swept block
    if ours:
        triton_or_skip()
    if impl == "torch-compile":
        _compiled.setdefault("reference", compile_peer(reference))

    def build(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        x, residual = (torch.randn(tokens, hidden, device=DEVICE, generator=gen).to(dtype) for _ in range(2))
        bias, weight, ln_bias = (torch.randn(hidden, device=DEVICE, generator=gen).to(dtype) for _ in range(3))
        args = (x, bias, residual, weight, ln_bias, EPS)
        if impl == "fastbert-triton":
            def call():  # the public op, as the model calls it
                with backend.use_backend("triton"):
                    return bias_residual_layer_norm(*args)
        elif impl in SWEEP:  # the launcher with another block (the op's checks are the same)
            from fastbert.kernels.bias_residual_layer_norm import bias_residual_layer_norm_fwd

            out = torch.full_like(x, float("nan"))  # a config that leaves rows unwritten fails the check

            def call():
                return bias_residual_layer_norm_fwd(x, bias, residual, weight, ln_bias, EPS, out, config=SWEEP[impl])
        elif impl == "torch-eager":
            def call():
                return reference(*args)
        else:
            def call():
                return _compiled["reference"](*args)
        call.args = args
        return call

    size = torch.finfo(dtype).bits // 8
    moved = 3 * tokens * hidden * size + 3 * hidden * size
    with torch.inference_mode():
        if ours:  # agrees with the reference before it is timed
            first = build(0)
            expected = reference(*(t.float() for t in first.args[:5]), EPS)
            assert (first().float() - expected).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.1)
        seconds = timed_kernel(benchmark, build, moved, rounds=50, warmup=5)

    gbs = moved / seconds / 1e9
    # The target: >= 85% of the copy bandwidth of this run (none measured without a GPU).
    copy_fraction = gbs / copy_bandwidth_gbs if copy_bandwidth_gbs else None
    benchmark.extra_info.update(impl=impl, bytes=moved, gbs=gbs, copy_fraction=copy_fraction)
    record(case=f"bias+residual+LayerNorm {dtype_name} hidden={hidden} tokens={tokens}", impl=impl,
            seconds=seconds, gbs=gbs, copy_fraction=copy_fraction, tokens_per_s=tokens / seconds)
