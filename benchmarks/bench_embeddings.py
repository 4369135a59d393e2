"""Microbenchmark of the first kernel of every forward pass: word + position + token-type embeddings,
then LayerNorm, over packed tokens (GPU only).

Implementations, each on the same inputs:

- ``fastbert-cuda-extension``: ``torch.ops.fastbert.embedding_layer_norm`` (csrc/), when built;
- ``fastbert-triton``: the Triton kernel (kernels/embeddings.py), through the op with
  ``FASTBERT_BACKEND=triton``;
- ``torch-eager``: the PyTorch reference (three gathers, two adds, LayerNorm);
- ``torch-compile``: the same reference under ``torch.compile``;
- ``copy``: a device-to-device copy of a ``[tokens, hidden]`` buffer, at the same size.

GB/s counts the fewest bytes a kernel must move: the three int64 indices read and one output row
written per token, each distinct table row read once (the input's distinct ids, its 128 positions,
its token types: a row several tokens share comes from cache after the first), and the LayerNorm's
two vectors (a copy: one read and one write). ``benchmark.extra_info`` holds
``gbs``, ``bytes`` and ``copy_fraction`` (against the large device-to-device copy measured in this
run, the suite's bandwidth roofline). Device time per call (``timed_kernel``: CUDA-graph replays over
input sets larger than the L2; the tables are shared, as in a model).

``FASTBERT_BENCH_SMOKE=1``: tiny fp32 / fp16 cases on the CPU (the extension's CPU kernel, the Triton
kernel under ``TRITON_INTERPRET=1``), no ``copy_fraction``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.conftest import DEVICE, SMOKE, compile_peer, device_or_skip, timed_kernel, triton_or_skip

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


_TABLES: dict = {}


def _inputs(tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    """Ids, positions and types of input set ``seed``; the tables (one set per hidden and dtype, as in
    a model) are shared by every input set."""
    key = (hidden, dtype)
    if key not in _TABLES:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        _TABLES[key] = ([torch.randn(rows, hidden, device=DEVICE, dtype=dtype, generator=gen)
                         for rows in (VOCAB, MAX_POSITIONS, TYPE_VOCAB)]
                        + [torch.randn(hidden, device=DEVICE, dtype=dtype, generator=gen) for _ in range(2)])
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.randint(0, VOCAB, (tokens,), device=DEVICE, generator=gen)
    positions = torch.arange(tokens, device=DEVICE) % 128
    types = torch.randint(0, TYPE_VOCAB, (tokens,), device=DEVICE, generator=gen)
    return (ids, positions, types, *_TABLES[key])


def _op_bytes(inputs, hidden: int, dtype: torch.dtype) -> int:
    """The fewest bytes the op moves on ``inputs`` (``_inputs``' indices first): see the module docstring."""
    ids, positions, types = inputs[:3]
    rows = sum(int(t.unique().numel()) for t in (ids, positions, types))
    size = torch.finfo(dtype).bits // 8
    return ids.numel() * (hidden * size + 3 * 8) + (rows + 2) * hidden * size


def _copy_bytes(tokens: int, hidden: int, dtype: torch.dtype) -> int:
    return 2 * tokens * hidden * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_embeddings(benchmark, record, copy_bandwidth_gbs, dtype_name, hidden, tokens, impl):
    device_or_skip()
    dtype = DTYPES[dtype_name]
    if impl == "fastbert-cuda-extension" and not _extension.usable_on(DEVICE):
        pytest.skip(f"fastbert._C has no kernel for {DEVICE} tensors here: {_extension.extension_status()}")
    if impl == "fastbert-triton":
        triton_or_skip()
    if impl == "torch-compile":
        _compiled.setdefault("reference", compile_peer(E.embeddings_reference))

    def build(seed):
        inputs = _inputs(tokens, hidden, dtype, seed)
        # The fast paths as the model calls them: indices validated once at its boundary, not here
        # (the check reads a flag back to the host, which a CUDA graph cannot capture).
        if impl == "fastbert-cuda-extension":
            def call():
                return torch.ops.fastbert.embedding_layer_norm(*inputs, EPS, False)
        elif impl == "fastbert-triton":
            def call():
                with backend.use_backend("triton"):
                    return E.embeddings(*inputs, EPS, validate_indices=False)
        elif impl == "torch-eager":
            def call():
                return E.embeddings_reference(*inputs, EPS)
        elif impl == "torch-compile":
            def call():
                return _compiled["reference"](*inputs, EPS)
        else:
            src = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
            dst = torch.empty_like(src)

            def call():
                return dst.copy_(src)
        call.inputs = inputs
        return call

    moved = (_copy_bytes(tokens, hidden, dtype) if impl == "copy"
             else _op_bytes(_inputs(tokens, hidden, dtype, 0), hidden, dtype))
    with torch.inference_mode():
        if impl != "copy":  # the fast paths agree with the reference before they are timed
            first = build(0)
            expected = E.embeddings_reference(*first.inputs, EPS).float()
            got = first().float()
            assert (got - expected).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.1)
        seconds = timed_kernel(benchmark, build, moved, rounds=50, warmup=5)

    gbs = moved / seconds / 1e9
    # Against the device-to-device copy of this run (none measured without a GPU).
    copy_fraction = gbs / copy_bandwidth_gbs if copy_bandwidth_gbs else None
    benchmark.extra_info.update(impl=impl, bytes=moved, gbs=gbs, copy_fraction=copy_fraction)
    record(case=f"embeddings {dtype_name} hidden={hidden} tokens={tokens}", impl=impl, seconds=seconds, gbs=gbs,
           copy_fraction=copy_fraction, tokens_per_s=tokens / seconds)
