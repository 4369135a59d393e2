"""Microbenchmark of the first kernel of every forward pass: word + position + token-type embeddings,
then LayerNorm, over packed tokens (GPU only).

Implementations, each on the same inputs:

- ``fastbert-cuda-extension``: ``torch.ops.fastbert.embedding_layer_norm`` (csrc/), when built;
- ``fastbert-triton``: the Triton kernel (kernels/embeddings.py), through the op with
  ``FASTBERT_BACKEND=triton``;
- ``torch-eager``: the PyTorch reference (three gathers, two adds, LayerNorm);
- ``torch-compile``: the same reference under ``torch.compile``;
- ``copy``: a device-to-device copy of a ``[tokens, hidden]`` buffer, the bandwidth roofline.

GB/s counts the bytes an ideal kernel moves: three table rows read and one output row written per
token, plus the three int64 indices (a copy: one read and one write). ``benchmark.extra_info`` holds
``gbs``, ``bytes`` and ``fraction_of_copy`` (the copy's GB/s measured at the same size in this run).

``FASTBERT_BENCH_SMOKE=1``: tiny fp32 / fp16 cases on the CPU (the extension's CPU kernel, the Triton
kernel under ``TRITON_INTERPRET=1``), no ``fraction_of_copy``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.conftest import DEVICE, SMOKE, compile_peer, device_or_skip, timed, triton_or_skip

from fastbert import _extension
from fastbert.ops import backend

E = importlib.import_module("fastbert.ops.embeddings")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = [384, 768, 1024]
TOKENS = [4096, 16384]  # 32 x 128 and 32 x 512 packed tokens
IMPLS = ["fastbert-cuda-extension", "fastbert-triton", "torch-eager", "torch-compile", "copy"]
VOCAB, MAX_POSITIONS, TYPE_VOCAB, EPS = 30522, 512, 2, 1e-12
if SMOKE:  # bf16 is not exact under the Triton interpreter
    DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
    HIDDEN = [64]
    TOKENS = [256]

_compiled = {}


def copy_gbs(tokens: int, hidden: int, dtype: torch.dtype) -> float:
    """GB/s of a [tokens, hidden] device-to-device copy, timed with CUDA events (the roofline)."""
    src = torch.randn(tokens, hidden, device="cuda").to(dtype)
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return _copy_bytes(tokens, hidden, dtype) / (start.elapsed_time(end) / 1e3 / 50) / 1e9


def _inputs(tokens: int, hidden: int, dtype: torch.dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, VOCAB, (tokens,), device=DEVICE, generator=gen)
    positions = torch.arange(tokens, device=DEVICE) % 128
    types = torch.randint(0, TYPE_VOCAB, (tokens,), device=DEVICE, generator=gen)
    tables = [torch.randn(rows, hidden, device=DEVICE, dtype=dtype, generator=gen)
              for rows in (VOCAB, MAX_POSITIONS, TYPE_VOCAB)]
    ln = [torch.randn(hidden, device=DEVICE, dtype=dtype, generator=gen) for _ in range(2)]
    return (ids, positions, types, *tables, *ln)


def _op_bytes(tokens: int, hidden: int, dtype: torch.dtype) -> int:
    return tokens * (4 * hidden * torch.finfo(dtype).bits // 8 + 3 * 8)


def _copy_bytes(tokens: int, hidden: int, dtype: torch.dtype) -> int:
    return 2 * tokens * hidden * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_embeddings(benchmark, record, dtype_name, hidden, tokens, impl):
    device_or_skip()
    dtype = DTYPES[dtype_name]
    inputs = _inputs(tokens, hidden, dtype)
    if impl == "fastbert-cuda-extension":
        if not _extension.usable_on(DEVICE):
            pytest.skip(f"fastbert._C has no kernel for {DEVICE} tensors here: {_extension.extension_status()}")

        def fn():
            return torch.ops.fastbert.embedding_layer_norm(*inputs, EPS)
    elif impl == "fastbert-triton":
        triton_or_skip()

        def fn():
            with backend.use_backend("triton"):
                return E.embeddings(*inputs, EPS)
    elif impl == "torch-eager":
        def fn():
            return E.embeddings_reference(*inputs, EPS)
    elif impl == "torch-compile":
        compiled = _compiled.setdefault("reference", compile_peer(E.embeddings_reference))

        def fn():
            return compiled(*inputs, EPS)
    else:
        src = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
        dst = torch.empty_like(src)

        def fn():
            return dst.copy_(src)

    with torch.inference_mode():
        if impl == "torch-compile":
            fn()  # compiled outside the timed rounds, in the mode they run in (a mode change recompiles)
        if impl != "copy":  # the fast paths agree with the reference before they are timed
            expected = E.embeddings_reference(*inputs, EPS).float()
            got = fn().float()
            assert (got - expected).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.1)
        seconds = timed(benchmark, fn, rounds=50, warmup=5)

    moved = _copy_bytes(tokens, hidden, dtype) if impl == "copy" else _op_bytes(tokens, hidden, dtype)
    gbs = moved / seconds / 1e9
    fraction_of_copy = gbs / copy_gbs(tokens, hidden, dtype) if DEVICE == "cuda" else None  # CUDA events
    benchmark.extra_info.update(impl=impl, bytes=moved, gbs=gbs, fraction_of_copy=fraction_of_copy)
    record(case=f"embeddings {dtype_name} hidden={hidden} tokens={tokens}", impl=impl, seconds=seconds, gbs=gbs)
