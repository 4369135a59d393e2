"""Host time of the eager GPU path, measured on the CPU: what a forward costs the Python side when
every Triton launch is stubbed out (a no-op), so only the work around the kernels is timed. Small
batches on a GPU wait on this time (without CUDA graphs), so it is worth measuring where no GPU is.

Three implementations of the same forward (12 layers, hidden 64, 16 tokens, one CPU thread; the
GEMMs are tiny and still run, on the CPU):

- ``fastbert``: each layer's kernels launched from one function (``ops.encoder_layer``, the eager
  fast path);
- ``module-path``: each layer through its modules and fused ops, which launch their kernels
  directly (``backend.direct_launch``), as without the fast path;
- ``torch.library-ops``: every fused op goes through its ``torch.library`` op (dispatcher,
  ``wrap_triton``, the kernel-wrapper higher-order op), as it would without either shortcut.

The embeddings take their PyTorch reference in both (the CUDA extension is not the subject here).
Needs triton; runs on any machine.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.conftest import timed

KERNELS = {"attention": "_attention_fwd_kernel", "bias_activation": "_bias_activation_fwd_kernel",
           "bias_residual_layer_norm": "_bias_residual_layer_norm_fwd_kernel"}


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Every fused op takes its Triton path on CPU tensors, and every launch does nothing."""
    pytest.importorskip("triton", reason="the fused ops' fast path is Triton")
    from fastbert.ops import backend

    for module, name in KERNELS.items():
        monkeypatch.setattr(getattr(importlib.import_module(f"fastbert.kernels.{module}"), name), "run",
                            lambda *args, **kwargs: None)
    monkeypatch.setattr(backend, "check_kernel_runs_here", lambda *args: None)
    monkeypatch.setattr(backend, "use_triton", lambda *args, **kwargs: True)
    monkeypatch.setattr(importlib.import_module("fastbert.ops.embeddings"), "_choose", lambda device: "torch")
    return backend


@pytest.mark.parametrize("impl", ["fastbert", "module-path", "torch.library-ops"])
@torch.no_grad()  # not inference_mode: the model is built here, and its weights would be inference tensors
def test_host_time_per_forward(benchmark, record, stubbed_launches, monkeypatch, impl):
    import transformers

    import fastbert

    if impl == "module-path":
        monkeypatch.setattr(importlib.import_module("fastbert.modeling_bert"), "fast_path_ready", lambda *args: False)
    if impl == "torch.library-ops":
        monkeypatch.setattr(stubbed_launches, "direct_launch", lambda *tensors: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                         num_hidden_layers=12)
        model = fastbert.BertModel(config).eval()
        ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        case = "cpu host time per forward, Triton launches stubbed (12 layers, 16 tokens)"
        benchmark.group = case
        seconds = timed(benchmark, lambda: model(ids), rounds=200, warmup=20)
    finally:
        torch.set_num_threads(threads)
    record(case=case, impl=impl, seconds=seconds)
