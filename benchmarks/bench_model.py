"""End-to-end model suite on a GPU: fastbert against transformers eager, transformers SDPA and
torch.compile of the transformers model (default; max-autotune on the headline cases), fp16 and bf16,
BERT-base and BERT-large with random weights from their configs.

Peers get each batch padded to its longest sequence, as their users run them; fastbert gets the same
padded batch through the same API (it unpads inside), eagerly and through its two CUDA-graph runners
(``CUDAGraphRunner``: eager validation and unpadding around a replay per token-count bucket;
``PaddedCUDAGraphRunner``: the whole forward in a graph per batch-shape bucket). On BERT-base bf16,
fastbert's rows run the default ``FASTBERT_GEMM=cublaslt`` (the FFN's first matmul with its bias and
tanh-form GELU in cuBLASLt's epilogue), ``+compact`` rows ``CUDAGraphRunner`` with its attention on the
compact grid (opt-in), ``+cublas`` rows ``FASTBERT_GEMM=cublas`` (cuBLAS, then the
exact-GELU epilogue kernel: the default before the third H200 run), ``+triton-gemm`` rows
``FASTBERT_GEMM=triton`` (matmul and GELU as one Triton GEMM), and ``module-path`` rows time eager
fastbert without the encoder's fast path (each layer through its modules and ops: what the fast
path saves in host time, measured as a peer). On the headline cases,
``fastbert+torch.compile`` is ``torch.compile(fastbert model, fullgraph=True)`` (the fused ops as
custom ops inside Inductor's graph, static-size unpadding). For every case: median time, tokens/s (real
tokens), TFLOP/s of the useful work, its fraction of the matmul peak measured in this run, and (at
the end of the session, in results.json) the ratio to every peer. fastbert's output is checked against
an fp32 transformers reference (DESIGN.md's low-precision budget) before it is timed.

``FASTBERT_BENCH_QUICK=1``: BERT-base bf16 only (the headline cases), for a short GPU call.
``FASTBERT_BENCH_SMOKE=1``: the same harness on the CPU with a tiny fp32 model and torch.compile's
``aot_eager`` backend, a few rounds: it proves the suite's wiring (tests/test_benchmark_suite.py), not
speed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from benchmarks.conftest import DEVICE, SMOKE, device_or_skip, timed
from tests.helpers import LOW_PRECISION_SLACK, max_abs_diff

from fastbert import modeling_bert
from fastbert.cuda_graphs import CUDAGraphRunner, PaddedCUDAGraphRunner
from fastbert.ops import use_gemm
from fastbert.ops.backend import DEFAULT_GEMM
from fastbert.optimize import to_fastbert

MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DENSE = {"1x128": (1, 128), "8x128": (8, 128), "32x128": (32, 128), "32x512": (32, 512)}
SETS = ["varlen16x512", "sentences32"]
HEADLINE = {("bert-base", "bf16", "32x128"), ("bert-base", "bf16", "32x512"), ("bert-base", "bf16", "varlen16x512")}
QUICK = os.environ.get("FASTBERT_BENCH_QUICK") == "1"
if SMOKE:
    MODELS = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
    DTYPES = {"fp32": torch.float32}
    DENSE = {"8x128": (8, 128)}
    SETS = ["varlen16x512"]
    HEADLINE = {("tiny", "fp32", "varlen16x512")}


def lengths_of(shape: str) -> list[int]:
    if shape in DENSE:
        batch, seqlen = DENSE[shape]
        return [seqlen] * batch
    gen = torch.Generator().manual_seed(0)
    if shape == "varlen16x512":  # batch 16, at most 512 tokens, mean 0.6 x 512
        return torch.normal(0.6 * 512, 0.25 * 512, (16,), generator=gen).round().clamp(16, 512).int().tolist()
    real = json.loads((Path(__file__).parent / "data" / "sentence_lengths.json").read_text())["lengths"]
    pick = torch.randint(0, len(real), (32,), generator=gen).tolist()
    return [real[i] for i in pick]


def batch_of(lengths: list[int], vocab: int, device=DEVICE):
    gen = torch.Generator().manual_seed(1)
    longest = max(lengths)
    ids = torch.randint(1000, vocab, (len(lengths), longest), generator=gen)
    mask = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def matmul_flops(config, lengths: list[int]) -> float:
    """FLOPs of the useful work: every real token through every matmul, attention over real keys."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = sum(lengths)
    dense = 2 * tokens * (4 * h * h + 2 * h * i)
    attention = sum(4 * n * n * h for n in lengths)
    return layers * (dense + attention)


def bert(config, attn_implementation: str):
    return transformers.AutoModel.from_config(config, attn_implementation=attn_implementation)


@functools.cache
@torch.inference_mode(False)  # built as users load models: ordinary tensors, not inference tensors
def models(name: str, dtype_name: str):
    """The transformers models (eager, SDPA) and fastbert, all sharing one set of random weights, and
    the fp32 reference they came from."""
    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[name])
    torch.manual_seed(0)
    reference = bert(config, "sdpa").to(DEVICE).eval()  # fp32
    sdpa = bert(config, "sdpa").to(DEVICE, DTYPES[dtype_name]).eval()
    eager = bert(config, "eager").to(DEVICE, DTYPES[dtype_name]).eval()
    sdpa.load_state_dict(reference.state_dict())
    eager.load_state_dict(reference.state_dict())
    return {"reference": reference, "sdpa": sdpa, "eager": eager, "fastbert": to_fastbert(sdpa)}


@functools.cache
def compiled(name: str, dtype_name: str, mode: str | None):
    if SMOKE:  # dynamo's capture of the transformers model, without inductor's minutes of codegen
        return torch.compile(models(name, dtype_name)["sdpa"], backend="aot_eager")
    # dynamic=False: a graph specialized to each batch shape, torch.compile's fastest form for a
    # fixed benchmark shape (its automatic dynamic shapes would compile a slower, shape-generic one).
    return torch.compile(models(name, dtype_name)["sdpa"], mode=mode, dynamic=False)


@functools.cache
def compiled_fastbert(name: str, dtype_name: str):
    """torch.compile of fastbert itself (fullgraph: the fused ops are custom ops Inductor sees)."""
    model = models(name, dtype_name)["fastbert"]
    if SMOKE:
        return torch.compile(model, backend="aot_eager", fullgraph=True)
    return torch.compile(model, fullgraph=True, dynamic=False)


def check_output(output, name: str, dtype_name: str, ids, mask) -> None:
    """fastbert's last_hidden_state at real tokens and its pooler output against the fp32 reference:
    within 2x the error of transformers (SDPA) at the same dtype + 1e-3 (DESIGN.md), so that no wrong
    result is ever timed."""
    group = models(name, dtype_name)
    keep = mask.bool()
    reference, peer = group["reference"](ids, attention_mask=mask), group["sdpa"](ids, attention_mask=mask)
    # last_hidden_state at real tokens; the pooler of rows whose first token is real (the batches here
    # are right-padded: every row).
    first_real = keep[:, 0]
    for what, ours, ref, theirs in (
            ("last_hidden_state", output.last_hidden_state[keep], reference.last_hidden_state[keep],
             peer.last_hidden_state[keep]),
            ("pooler_output", output.pooler_output[first_real], reference.pooler_output[first_real],
             peer.pooler_output[first_real])):
        err = max_abs_diff(ours, ref)
        budget = 2 * max_abs_diff(theirs, ref) + LOW_PRECISION_SLACK
        assert err <= budget, f"fastbert's {what} is off by {err:.3g} (budget {budget:.3g}): not timed"


@functools.cache
def graph_runner(name: str, dtype_name: str, gemm_kind: str = DEFAULT_GEMM, compact_attention: bool = False):
    # The default buckets: each case captures only the bucket it needs (one runner per GEMM choice and
    # attention grid: its graphs hold the kernels they were captured with).
    return CUDAGraphRunner(models(name, dtype_name)["fastbert"], max_sequences=64, max_seqlen=512,
                           compact_attention=compact_attention)


@functools.cache
def padded_graph_runner(name: str, dtype_name: str, gemm_kind: str = DEFAULT_GEMM):
    return PaddedCUDAGraphRunner(models(name, dtype_name)["fastbert"], max_seqlen=512)


IMPLS = ["fastbert", "fastbert+cudagraphs", "fastbert+cudagraphs+compact", "fastbert+padded-cudagraphs",
         "fastbert+triton-gemm",
         "fastbert+cudagraphs+triton-gemm", "fastbert+cublas", "fastbert+padded-cudagraphs+cublas",
         "fastbert+torch.compile", "module-path", "transformers-eager", "transformers-sdpa", "torch.compile",
         "torch.compile-max-autotune"]
GEMM_ROWS = {"+triton-gemm": "triton", "+cublas": "cublas"}  # impl suffix -> FASTBERT_GEMM (else the default)
ON_HEADLINE_MODEL = ("+triton-gemm", "+cublas", "+compact", "module-path")  # rows on HEADLINE_MODEL only (time)
# Rows that compile for minutes: only on the headline cases, after everything else.
HEADLINE_ONLY = ("fastbert+torch.compile", "torch.compile-max-autotune")
HEADLINE_MODEL = ("bert-base", "bf16")  # QUICK's only model and dtype; ON_HEADLINE_MODEL's rows' too


def cases():
    """Every (model, dtype, shape, peer); the ``+triton-gemm`` and ``+cublas`` rows after the others, then
    fastbert's torch.compile and max-autotune (their compilation takes minutes), so a call cut at its
    time limit loses the optional rows first (run them alone with ``-k max-autotune`` and the like)."""
    everything = [(name, dtype_name, shape, impl)
                  for name in MODELS for dtype_name in DTYPES for shape in [*DENSE, *SETS] for impl in IMPLS
                  if not (QUICK and (name, dtype_name) != HEADLINE_MODEL)
                  and (impl not in HEADLINE_ONLY or (name, dtype_name, shape) in HEADLINE)
                  and (not any(k in impl for k in ON_HEADLINE_MODEL) or (name, dtype_name) == HEADLINE_MODEL
                       or SMOKE)]
    # Stable: the order is kept otherwise.
    order = {"fastbert+torch.compile": 2, "torch.compile-max-autotune": 3}
    everything.sort(key=lambda case: order.get(case[3], any(case[3].endswith(k) for k in GEMM_ROWS)))
    for case in everything:
        yield pytest.param(*case, id="-".join(case))


@pytest.mark.parametrize("name, dtype_name, shape, impl", list(cases()))
@torch.inference_mode()
def test_model(benchmark, record, matmul_peak_tflops, monkeypatch, name, dtype_name, shape, impl):
    device_or_skip()
    if impl == "module-path":
        monkeypatch.setattr(modeling_bert, "fast_path_ready", lambda *args: False)
    if SMOKE and ("cudagraphs" in impl or impl == "torch.compile-max-autotune"):
        pytest.skip("CUDA graphs and max-autotune need a GPU")
    lengths = lengths_of(shape)
    group = models(name, dtype_name)
    ids, mask = batch_of(lengths, group["sdpa"].config.vocab_size)
    fn = {
        "fastbert": lambda: group["fastbert"](ids, attention_mask=mask),
        "fastbert+cudagraphs": lambda: graph_runner(name, dtype_name)(ids, mask),
        "fastbert+cudagraphs+compact": lambda: graph_runner(name, dtype_name, compact_attention=True)(ids, mask),
        "fastbert+triton-gemm": lambda: group["fastbert"](ids, attention_mask=mask),
        "fastbert+cudagraphs+triton-gemm": lambda: graph_runner(name, dtype_name, "triton")(ids, mask),
        "fastbert+padded-cudagraphs": lambda: padded_graph_runner(name, dtype_name)(ids, mask),
        "fastbert+cublas": lambda: group["fastbert"](ids, attention_mask=mask),
        "fastbert+padded-cudagraphs+cublas": lambda: padded_graph_runner(name, dtype_name, "cublas")(ids, mask),
        "module-path": lambda: group["fastbert"](ids, attention_mask=mask),
        "transformers-eager": lambda: group["eager"](ids, attention_mask=mask),
        "transformers-sdpa": lambda: group["sdpa"](ids, attention_mask=mask),
        "fastbert+torch.compile": lambda: compiled_fastbert(name, dtype_name)(ids, attention_mask=mask),
        "torch.compile": lambda: compiled(name, dtype_name, None)(ids, attention_mask=mask),
        "torch.compile-max-autotune": lambda: compiled(name, dtype_name, "max-autotune")(ids, attention_mask=mask),
    }[impl]
    gemm = next((kind for suffix, kind in GEMM_ROWS.items() if impl.endswith(suffix)), DEFAULT_GEMM)
    with use_gemm(gemm):
        if impl.startswith("fastbert") and not SMOKE:  # the row times its GEMM setting, or nothing
            from fastbert.ops.linear_activation import active_backend

            expected = {"cublas": "cublas+triton"}.get(gemm, gemm)
            assert active_backend(DEVICE) == expected, (active_backend(DEVICE), expected)
        if impl.startswith("fastbert"):
            check_output(fn(), name, dtype_name, ids, mask)
        benchmark.group = f"{name} {dtype_name} {shape}"
        seconds = timed(benchmark, fn, rounds=10 if "large" in name else 20, warmup=3)
    flops = matmul_flops(group["sdpa"].config, lengths)
    tflops = flops / seconds / 1e12
    row = dict(case=f"{name} {dtype_name} {shape}", impl=impl, seconds=seconds, tokens=sum(lengths),
               padded_tokens=len(lengths) * max(lengths), tokens_per_s=sum(lengths) / seconds, tflops=tflops,
               roofline_fraction=tflops / matmul_peak_tflops if matmul_peak_tflops else None)
    benchmark.extra_info.update(row)
    record(**row)
