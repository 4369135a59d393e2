"""Microbenchmark of the padded graph runner's static packing and value checks (GPU only).

Implementations, each on the same ``[batch, seqlen]`` batch (ids, token types, a right-padded mask of
random lengths, as a tokenizer pads):

- ``fastbert-triton``: ``fastbert.ops.pack_padded_batch``, blocks of positions in two Triton launches;
- ``torch-eager``: ``pack_padded_batch_reference``, the PyTorch composition it replaces (a sort, sums
  and offsets, gathers, clamps and masked extremes: ~19 kernels).

Both are captured in a CUDA graph and replayed (``timed_kernel``), as the runner replays them: at
batch 1 the composition's time is its chain of launches, which the graph shortens but does not remove.
The shapes are the runner's buckets of the model benchmarks. ``FASTBERT_BENCH_SMOKE=1``: a tiny batch
on the CPU, the kernel under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE, SMOKE, device_or_skip, timed_kernel, triton_or_skip

SHAPES = [(1, 128), (8, 128), (32, 128), (32, 512), (64, 512)]
IMPLS = ["fastbert-triton", "torch-eager"]
VOCAB, TYPES = 30522, 2
if SMOKE:
    SHAPES = [(2, 16)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_padded_batch(benchmark, record, shape, impl):
    device_or_skip()
    from fastbert.ops import backend
    from fastbert.ops.pack_padded_batch import pack_padded_batch, pack_padded_batch_reference

    if impl == "fastbert-triton":
        triton_or_skip()
    batch, seqlen = shape

    def build(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        ids = torch.randint(0, VOCAB, shape, device=DEVICE, generator=gen)
        types = torch.randint(0, TYPES, shape, device=DEVICE, generator=gen)
        lengths = torch.randint(1, seqlen + 1, (batch,), device=DEVICE, generator=gen)
        mask = (torch.arange(seqlen, device=DEVICE) < lengths[:, None]).long()
        if impl == "fastbert-triton":
            def call():
                with backend.use_backend("triton"):
                    return pack_padded_batch(ids, mask, types, VOCAB, TYPES)
        else:
            def call():
                return pack_padded_batch_reference(ids, mask, types, VOCAB, TYPES)
        call.inputs = (ids, mask, types)
        return call

    moved = batch * seqlen * (3 * 8 + 4 * 8 + 1)  # three int64 inputs read; four int64 and one bool written
    with torch.inference_mode():
        if impl == "fastbert-triton":  # agrees with the reference before it is timed
            first = build(0)
            packed = first()
            want = pack_padded_batch_reference(*first.inputs, VOCAB, TYPES)
            got = packed.outputs()
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        seconds = timed_kernel(benchmark, build, moved, rounds=50, warmup=5)
    benchmark.extra_info.update(impl=impl, bytes=moved)
    record(case=f"pack_padded_batch {batch}x{seqlen}", impl=impl, seconds=seconds,
           tokens_per_s=batch * seqlen / seconds)
