"""The static forms: torch.compile(fullgraph=True) of the whole model, the bucketed CUDA-graph
runner, and the last layer computing only the first token of each row."""

import pytest
import torch

from fastbert.cuda_graphs import CUDAGraphRunner
from tests.helpers import DEVICES, FP32_MODEL_RANDOM, assert_close, max_abs_diff, needs_cuda
from tests.model_utils import make_config, make_mask, model_pair, random_inputs


def _outputs(model, ids, mask, types, **kwargs):
    with torch.no_grad():
        return model(ids, attention_mask=mask, token_type_ids=types, **kwargs)


@pytest.fixture
def pair():
    return model_pair(make_config("h144", layers=2))


@pytest.mark.parametrize("mask_kind", ["right", "left", "holes", "fully_masked_row", "none"])
def test_compile_fullgraph_equals_eager(pair, mask_kind, monkeypatch):
    """aot_eager: Dynamo and AOTAutograd trace everything (no graph break allowed), quickly."""
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    fast, hf = pair
    ids, types = random_inputs(fast.config, 3, 11)
    mask = make_mask(mask_kind, 3, 11)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager", dynamic=False)
    got, want = _outputs(compiled, ids, mask, types), _outputs(fast, ids, mask, types)
    assert_close(got.last_hidden_state, want.last_hidden_state, 1e-6, "compiled last_hidden_state")
    assert_close(got.pooler_output, want.pooler_output, 1e-6, "compiled pooler_output")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_equals_transformers(pair, monkeypatch, device):
    """Inductor over the whole model: on the CPU around the PyTorch ops, on a GPU around the Triton
    kernels (wrap_triton lets it see them; tests/test_fake_cuda.py proves the traced graph calls them)."""
    if device == "cpu":
        monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    fast, hf = (model.to(device) for model in pair)
    ids, types = random_inputs(fast.config, 2, 9, device=device)
    mask = make_mask("left", 2, 9).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True)
    got, want = _outputs(compiled, ids, mask, types), _outputs(hf, ids, mask, types)
    keep = mask.bool()
    assert_close(got.last_hidden_state[keep], want.last_hidden_state[keep], FP32_MODEL_RANDOM)
    assert (got.last_hidden_state[~keep] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["right", "left", "holes", "fully_masked_row"])
def test_first_token_only(pair, mask_kind, device):
    fast, hf = (model.to(device) for model in pair)
    ids, types = random_inputs(fast.config, 4, 10, device=device)
    mask = make_mask(mask_kind, 4, 10).to(device)
    full, first = _outputs(fast, ids, mask, types), _outputs(fast, ids, mask, types, first_token_only=True)
    assert first.last_hidden_state.shape == (4, 1, fast.config.hidden_size)
    assert_close(first.last_hidden_state[:, 0], full.last_hidden_state[:, 0], 1e-5, "first tokens")
    assert_close(first.pooler_output, full.pooler_output, 1e-5, "pooler")


def test_first_token_only_per_packed_sequence(pair):
    fast, _ = pair
    lengths = [4, 2, 5]
    ids = torch.randint(0, fast.config.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    full = _outputs(fast, ids, None, None, position_ids=positions)
    first = _outputs(fast, ids, None, None, position_ids=positions, first_token_only=True)
    assert first.last_hidden_state.shape == (1, 3, fast.config.hidden_size)
    assert_close(first.last_hidden_state[0], full.last_hidden_state[0, [0, 4, 6]], 1e-5)


@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
def test_graph_runner_replays_other_lengths(capture):
    """Several length mixes through the same buckets: each equals the eager model (a stale graph or
    uninitialised rows past the last token would show here)."""
    device = "cuda" if capture else "cpu"
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    fast = fast.to(device)
    runner = CUDAGraphRunner(fast, buckets=(16, 64, 128), max_sequences=8, max_seqlen=32, capture=capture)
    gen = torch.Generator().manual_seed(7)
    for batch, seqlen, kind in [(3, 11, "right"), (2, 7, "left"), (5, 20, "holes"), (1, 3, "none"),
                                (4, 30, "fully_masked_row"), (3, 11, "right"), (8, 16, "right"), (6, 40, "right")]:
        ids, types = random_inputs(fast.config, batch, seqlen, gen)
        ids, types = ids.to(device), types.to(device)
        mask = make_mask(kind, batch, seqlen, gen).to(device)
        got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, f"{batch}x{seqlen} {kind}")
        assert_close(got.pooler_output, want.pooler_output, 1e-5, f"{batch}x{seqlen} {kind} pooler")
    assert set(runner._buckets) == {16, 64, 128}  # every bucket was taken, and replayed with new lengths


@needs_cuda
def test_captured_graphs_follow_in_place_weight_updates():
    """A graph captured before an optimizer step or load_state_dict must replay with the new weights
    (the fused QKV weight is concatenated inside the graph, not taken from a cache made before)."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64), device="cuda")
    runner = CUDAGraphRunner(fast, buckets=(64,), max_sequences=4, max_seqlen=32)
    ids, types = random_inputs(fast.config, 2, 12, device="cuda")
    mask = make_mask("right", 2, 12).to("cuda")
    before = runner(ids, mask, types).last_hidden_state.clone()
    with torch.no_grad():
        for layer in fast.encoder.layer:
            layer.attention.self.key.weight.mul_(1.5)
            layer.attention.self.value.bias.add_(0.3)
    got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
    assert runner._buckets[64].graph is not None  # replayed, not run eagerly
    assert max_abs_diff(got.last_hidden_state, before) > 1e-2  # the update matters
    assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, "after the update")
