"""Microbenchmark of bias + activation on ``[tokens, intermediate]``, the epilogue of BERT's first FFN
matmul (GPU only).

Implementations, each on the same inputs:

- ``fastbert-triton``: ``fastbert.ops.bias_activation``, the op the model calls (one pass over memory);
- ``torch-eager``: the PyTorch reference (``x + bias``, then ``F.gelu`` / ``F.relu``: two passes);
- ``torch-compile``: the same reference under ``torch.compile`` (Inductor fuses it too).

GB/s counts the bytes an ideal kernel moves: ``x`` read and the output written, plus the bias.
``benchmark.extra_info`` holds ``gbs``, ``bytes`` and ``impl``. Device time per call (``timed_kernel``:
CUDA-graph replays over input sets larger than the L2). Without a CUDA device every case skips.
``FASTBERT_BENCH_SMOKE=1``: tiny fp32 / fp16 cases on the CPU, the kernel under ``TRITON_INTERPRET=1``.

Collected by ``pytest benchmarks/ --benchmark-only`` when ``bench_*.py`` is in ``python_files``; this
file's rows go to the suite's results table (benchmarks/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE, SMOKE, compile_peer, device_or_skip, timed_kernel, triton_or_skip

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INTERMEDIATE = [1536, 3072, 4096]
TOKENS = [4096, 16384]
ACTIVATIONS = ["gelu", "gelu_tanh"]
IMPLS = ["fastbert-triton", "torch-eager", "torch-compile"]
if SMOKE:  # bf16 is not exact under the Triton interpreter
    DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
    INTERMEDIATE = [128]
    TOKENS = [256]
_compiled = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("intermediate", INTERMEDIATE)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_bias_activation(benchmark, record, copy_bandwidth_gbs, dtype_name, intermediate, tokens, activation, impl):
    device_or_skip()
    from fastbert.ops import backend
    from fastbert.ops.bias_activation import bias_activation
    from fastbert.ops.bias_activation import bias_activation_reference as reference

    dtype = DTYPES[dtype_name]
    if impl == "fastbert-triton":
        triton_or_skip()
    if impl == "torch-compile" and activation not in _compiled:
        _compiled[activation] = compile_peer(lambda x, b, _a=activation: reference(x, b, _a))

    def build(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        x = (3 * torch.randn(tokens, intermediate, device=DEVICE, generator=gen)).to(dtype)
        bias = torch.randn(intermediate, device=DEVICE, generator=gen).to(dtype)
        if impl == "fastbert-triton":
            def call():  # the public op, as the model calls it
                with backend.use_backend("triton"):
                    return bias_activation(x, bias, activation)
        elif impl == "torch-eager":
            def call():
                return reference(x, bias, activation)
        else:
            def call():
                return _compiled[activation](x, bias)
        call.inputs = (x, bias)
        return call

    size = torch.finfo(dtype).bits // 8
    moved = 2 * tokens * intermediate * size + intermediate * size
    with torch.inference_mode():
        if impl == "fastbert-triton":  # agrees with the reference before it is timed
            first = build(0)
            x, bias = first.inputs
            expected = reference(x.float(), bias.float(), activation)
            assert (first().float() - expected).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.1)
        seconds = timed_kernel(benchmark, build, moved, rounds=50, warmup=5)

    gbs = moved / seconds / 1e9
    # The target: >= 85% of the copy bandwidth of this run (none measured without a GPU).
    copy_fraction = gbs / copy_bandwidth_gbs if copy_bandwidth_gbs else None
    benchmark.extra_info.update(impl=impl, bytes=moved, gbs=gbs, copy_fraction=copy_fraction)
    record(case=f"bias+{activation} {dtype_name} intermediate={intermediate} tokens={tokens}",
            impl=impl, seconds=seconds, gbs=gbs, copy_fraction=copy_fraction, tokens_per_s=tokens / seconds)
