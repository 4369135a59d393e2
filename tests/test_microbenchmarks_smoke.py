"""The kernel microbenchmarks' wiring, proven on the CPU before a GPU session spends its minutes on them.

``FASTBERT_BENCH_SMOKE=1`` runs benchmarks/bench_{attention,bias_activation,bias_residual_layer_norm,
embeddings,linear_activation,pack_padded_batch}.py at tiny sizes on the CPU, the Triton kernels under ``TRITON_INTERPRET=1``: every fast
path checked against its reference, every case timed and recorded, ratios computed, results.json
written. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, interpreter_unusable_reason

pytest.importorskip("triton", reason="the microbenchmarks' fast paths are Triton kernels: triton is not installed")

FILES = ["bench_attention.py", "bench_bias_activation.py", "bench_bias_residual_layer_norm.py", "bench_embeddings.py",
         "bench_linear_activation.py", "bench_pack_padded_batch.py"]
# The case names each file records, and the implementations each of its cases times on the CPU.
PEERS = {
    "attention": {"sdpa-flash", "sdpa-flash-varlen-bound"},  # no memory-efficient SDPA kernel on the CPU
    "bias+gelu": {"torch-eager", "torch-compile"},
    "bias+residual+LayerNorm": {"torch-eager", "torch-compile"},
    "embeddings": {"torch-eager", "torch-compile", "copy"},
    "linear+gelu": {"torch-eager", "torch-compile"},
    "pack_padded_batch": {"torch-eager"},
}
UNTYPED = {"pack_padded_batch"}  # integer inputs: no fp32 / fp16 cases
SKIP_REASON = "SDPA's memory-efficient backend has no CPU kernel"


def _family(case: str) -> str:
    """The file a case came from, by its name ("bias+gelu_tanh ..." is bias+activation's too)."""
    name = case.split()[0]
    return "bias+gelu" if name.startswith("bias+gelu") else name


# What bench_bias_residual_layer_norm.py sets under FASTBERT_BENCH_SMOKE (this process has no such
# variable, so importing the module would give the GPU run's values): its small row count and sweep.
SMOKE_SMALL_LAYER_NORM_TOKENS, SMOKE_LAYER_NORM_SWEEP = 16, {"fastbert-triton-M8-w4"}


def _small_layer_norm_case(case: str) -> bool:
    """A LayerNorm case at the small row count (its block sweep, no torch.compile peer)."""
    return case.startswith("bias+residual+LayerNorm") and case.endswith(f"tokens={SMOKE_SMALL_LAYER_NORM_TOKENS}")


def _peers(family: str, case: str) -> set[str]:
    return {"torch-eager"} if _small_layer_norm_case(case) else PEERS[family]


def _fastbert_impls(family: str, dtype: str, case: str = "") -> set[str]:
    if _small_layer_norm_case(case):  # the block sweep runs on 16-bit inputs
        return {"fastbert-triton"} | (SMOKE_LAYER_NORM_SWEEP if dtype == "fp16" else set())
    if family == "attention":  # the block-configuration sweep and the runner's slots run on 16-bit inputs
        runner = {"fastbert-triton+runner-slots", "fastbert-triton+runner-slots+compact"}
        return {"fastbert-triton"} | ({"fastbert-triton-M32-N16-w4"} | runner if dtype == "fp16" else set())
    if family == "linear+gelu":  # the fused GEMM (and its tile sweep, 16-bit), cuBLAS + the epilogue, and
        # FASTBERT_GEMM=cublaslt (on the CPU: its fallback, cuBLAS + the epilogue's path; wiring only)
        from fastbert.kernels.linear_activation import SWEEP

        sweep = {f"fastbert-triton-gemm-{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}-w{c['num_warps']}-s{c['num_stages']}"
                 for c in SWEEP}
        return ({"fastbert-triton-gemm", "fastbert-cublas+epilogue", "fastbert-cublaslt"}
                | (sweep if dtype == "fp16" else set()))
    if family != "embeddings":
        return {"fastbert-triton"}
    from fastbert import _extension

    # The extension's CPU kernel runs where it is built; elsewhere that case skips and says why.
    return {"fastbert-triton"} | ({"fastbert-cuda-extension"} if _extension.usable_on("cpu") else set())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    reason = interpreter_unusable_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench") / "results.json"
    # Not PYTEST_XDIST_WORKER & co: under xdist, pytest-benchmark would see them and refuse to time.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # TRITON_INTERPRET: Triton reads it when the kernels are defined, so only a fresh process can have it.
    env.update(FASTBERT_BENCH_SMOKE="1", TRITON_INTERPRET="1", FASTBERT_BENCH_JSON=str(out))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *(f"benchmarks/{name}" for name in FILES), "--benchmark-only", "-q",
         "-rs", "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output, json.loads(out.read_text())["results"]


def test_every_microbenchmark_times_its_fast_paths_against_its_peers(smoke_run):
    _, rows = smoke_run
    assert {_family(row["case"]) for row in rows} == set(PEERS)
    for family in set(PEERS) - UNTYPED:  # fp32 and fp16: bf16 is not exact under the interpreter
        assert {row["case"].split()[1] for row in rows if _family(row["case"]) == family} == {"fp32", "fp16"}
    for row in rows:
        assert row["case"] and row["impl"] and row["seconds"] > 0, row
    for case in {row["case"] for row in rows}:
        family, dtype = _family(case), case.split()[1]
        impls = {row["impl"]: row for row in rows if row["case"] == case}
        peers = _peers(family, case)
        assert set(impls) == peers | _fastbert_impls(family, dtype, case), case
        for ours in _fastbert_impls(family, dtype, case):
            speedup = impls[ours]["speedup"]
            assert set(speedup) == peers, (case, ours)
            for peer in peers:
                assert speedup[peer] == pytest.approx(impls[peer]["seconds"] / impls[ours]["seconds"])
    # No GPU, no measured copy bandwidth: the fraction is recorded as unknown rather than crashing.
    assert all(row["copy_fraction"] is None for row in rows if _family(row["case"]).startswith("bias+"))


def test_skipped_cases_say_why(smoke_run):
    output, _ = smoke_run
    assert SKIP_REASON in output
