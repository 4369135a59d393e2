"""The static forms: torch.compile(fullgraph=True) of the whole model, the bucketed CUDA-graph
runner, and the last layer computing only the first token of each row."""

import contextlib

import pytest
import torch

from fastbert.cuda_graphs import DEFAULT_BUCKETS, CUDAGraphRunner, PaddedCUDAGraphRunner
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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_with_dynamic_shapes(dropout, monkeypatch):
    """torch.compile(dynamic=True): floats such as the LayerNorm's eps and the dropout probability
    become symbolic there (a math.isfinite or a bool argument of them broke the graph); a second shape
    reuses the graph. With dropout (training), the same graph runs, its randomness aside."""
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    config = make_config("h144", layers=2)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    fast, _ = model_pair(config)
    fast.train(dropout > 0)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, seqlen in ((3, 11), (2, 7)):
        ids, types = random_inputs(fast.config, batch, seqlen)
        mask = make_mask("right", batch, seqlen)
        got = _outputs(compiled, ids, mask, types)
        if dropout == 0:
            assert_close(got.last_hidden_state, _outputs(fast, ids, mask, types).last_hidden_state, 1e-5,
                         f"dynamic shapes {batch}x{seqlen}")
        assert got.last_hidden_state.shape == (batch, seqlen, fast.config.hidden_size)


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


@pytest.mark.parametrize("extra", [{}, {"output_hidden_states": True}])
def test_first_token_only_without_a_real_token(pair, extra):
    """A batch whose every position is padding has no first token to compute: each row's is zeros, as
    a padded first position is in a batch with real tokens, and the pooler reads them (no IndexError)."""
    fast, _ = pair
    ids, types = random_inputs(fast.config, 2, 6)
    mask = torch.zeros(2, 6, dtype=torch.long)
    full = _outputs(fast, ids, mask, types, **extra)
    first = _outputs(fast, ids, mask, types, first_token_only=True, **extra)
    assert first.last_hidden_state.shape == (2, 1, fast.config.hidden_size)
    assert (first.last_hidden_state == 0).all()
    assert_close(first.pooler_output, full.pooler_output, 1e-6, "pooler")


def test_first_token_only_per_packed_sequence(pair):
    fast, _ = pair
    lengths = [4, 2, 5]
    ids = torch.randint(0, fast.config.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    full = _outputs(fast, ids, None, None, position_ids=positions)
    first = _outputs(fast, ids, None, None, position_ids=positions, first_token_only=True)
    assert first.last_hidden_state.shape == (1, 3, fast.config.hidden_size)
    assert_close(first.last_hidden_state[0], full.last_hidden_state[0, [0, 4, 6]], 1e-5)


def test_graphs_are_captured_on_the_models_gpu(monkeypatch):
    """The runners make the model's GPU current around capture and replay, and capture on a side
    stream of that GPU: torch.cuda.graph's default capture stream is one per process, made on
    whichever GPU was current at the first capture, so a second runner on another GPU would capture
    nothing of its kernels. The CUDA calls are stand-ins (no GPU here; one per GPU test machine)."""
    import contextlib

    from fastbert import cuda_graphs

    class Stream:
        def wait_stream(self, other):
            pass

    side, captures = Stream(), []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None):
        captures.append((cuda_graph, pool, stream))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda: side)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "a graph")
    monkeypatch.setattr(torch.cuda, "graph", graph)
    assert cuda_graphs.capture_graph(lambda: 7, pool="a pool") == ("a graph", 7)
    assert captures == [("a graph", "a pool", side)]
    monkeypatch.setattr(torch.cuda, "device", lambda device: ("device context", device))
    assert cuda_graphs._on_device(torch.device("cuda", 1), capture=True) == ("device context", torch.device("cuda", 1))
    assert isinstance(cuda_graphs._on_device(torch.device("cpu"), capture=False), contextlib.nullcontext)


def test_default_buckets_bound_the_padding():
    """Every token count from 1 to 16384 has a bucket that computes at most 1.5x its tokens, and past
    1024 at most 512 tokens more (the work a replay wastes on padding)."""
    buckets = list(DEFAULT_BUCKETS)
    assert buckets == sorted(set(buckets)) and buckets[-1] == 16384
    for tokens in range(1, 16385):
        size = next(b for b in buckets if b >= tokens)
        assert size <= max(64, 1.5 * tokens) and (tokens <= 1024 or size - tokens < 512), (tokens, size)


@pytest.mark.parametrize("compact_attention", [False, True])
@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
def test_graph_runner_replays_other_lengths(capture, compact_attention):
    """Several length mixes through the same buckets: each equals the eager model (a stale graph or
    uninitialised rows past the last token would show here). On a GPU, also with the attention on its
    compact grid (the CPU runs PyTorch's attention either way)."""
    device = "cuda" if capture else "cpu"
    # head dim 64 where the compact grid runs (it is launched at that head dim only)
    fast, _ = model_pair(make_config("h128" if compact_attention else "h144", layers=2, max_positions=64))
    fast = fast.to(device)
    runner = CUDAGraphRunner(fast, buckets=(16, 64, 128), max_sequences=8, max_seqlen=32, capture=capture,
                             compact_attention=compact_attention)
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


@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
def test_padded_graph_runner_matches_eager(capture):
    """The whole-forward graphs per (batch, seqlen) bucket: every mask kind, batches and lengths smaller
    than their bucket (fully masked extra rows, padded extra columns), buckets replayed with other
    inputs, token types given or not, broadcast or not: each equals the eager model."""
    device = "cuda" if capture else "cpu"
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    fast = fast.to(device)
    runner = PaddedCUDAGraphRunner(fast, batch_buckets=(1, 4, 8), seqlen_step=16, capture=capture)
    gen = torch.Generator().manual_seed(11)
    for batch, seqlen, kind, with_types in [(3, 11, "right", True), (2, 7, "left", True), (4, 16, "holes", False),
                                            (1, 3, "none", True), (4, 30, "fully_masked_row", True),
                                            (3, 11, "right", False), (8, 16, "right", True), (6, 40, "none", False)]:
        ids, types = random_inputs(fast.config, batch, seqlen, gen)
        ids, types = ids.to(device), types.to(device) if with_types else None
        mask = None if kind == "none" else make_mask(kind, batch, seqlen, gen).to(device)
        got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
        what = f"{batch}x{seqlen} {kind}"
        assert got.last_hidden_state.shape == want.last_hidden_state.shape, what
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, what)
        assert_close(got.pooler_output, want.pooler_output, 1e-5, f"{what} pooler")
    # Every bucket was taken, several with other shapes inside them (the graphs were replayed).
    assert set(runner._buckets) == {(4, 16), (4, 32), (1, 16), (8, 16), (8, 48)}
    # Broadcast token types (1, seqlen), and a bool mask.
    ids, types = random_inputs(fast.config, 3, 9, gen)
    ids, types = ids.to(device), types[:1].to(device)
    mask = make_mask("right", 3, 9, gen).to(device).bool()
    assert_close(runner(ids, mask, types).last_hidden_state, _outputs(fast, ids, mask, types).last_hidden_state,
                 1e-5, "broadcast types, bool mask")


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
def test_graph_runners_refuse_bad_values_like_the_model(capture, runner_class):
    """A bad id, token type or mask value raises the model's own error (PaddedCUDAGraphRunner checks
    inside the graph and re-runs the batch eagerly; CUDAGraphRunner reads the checks back with its
    unpadding), and the runner keeps working after it."""
    device = "cuda" if capture else "cpu"
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    fast = fast.to(device)
    runner = (PaddedCUDAGraphRunner(fast, batch_buckets=(4,), seqlen_step=16, capture=capture)
              if runner_class is PaddedCUDAGraphRunner else
              CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=4, max_seqlen=32, capture=capture))
    ids, types = random_inputs(fast.config, 2, 12, device=device)
    mask = make_mask("right", 2, 12).to(device)
    bad_ids = ids.clone()
    bad_ids[1, 3] = fast.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids\[1, 3\] = {fast.config.vocab_size} is out of range"):
        runner(bad_ids, mask, types)
    bad_types = types.clone()
    bad_types[0, 2] = -1
    with pytest.raises(ValueError, match=r"token_type_ids\[0, 2\] = -1 is out of range"):
        runner(ids, mask, bad_types)
    bad_mask = mask.clone()
    bad_mask[0, 0] = 2
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        runner(ids, bad_mask, types)
    # An out-of-range id under the mask's padding is never looked up: no error, as in the model.
    padded_ids = ids.clone()
    padded_ids[mask == 0] = fast.config.vocab_size + 5
    assert_close(runner(padded_ids, mask, types).last_hidden_state, _outputs(fast, ids, mask, types).last_hidden_state,
                 1e-5, "bad ids under padding")
    # Calls the graphs do not take run eagerly: bool ids, position_ids, a float mask, a batch past the buckets.
    with pytest.raises(TypeError, match=r"input_ids must hold integer ids \(int64 or int32\)"):
        runner(ids.bool(), mask, types)
    # Other narrow id dtypes too: the graphs would widen them into their int64 buffers unchecked.
    with pytest.raises(TypeError, match=r"input_ids must hold integer ids \(int64 or int32\), got dtype torch.int16"):
        runner(ids.to(torch.int16), mask, types)
    with pytest.raises(TypeError, match=r"token_type_ids must hold integer ids \(int64 or int32\), got dtype torch.uint8"):
        runner(ids, mask, types.to(torch.uint8))
    positions = torch.arange(12, device=device).expand(2, 12)
    assert_close(runner(ids, mask, types, position_ids=positions).last_hidden_state,
                 _outputs(fast, ids, mask, types, position_ids=positions).last_hidden_state, 1e-5, "positions")
    with pytest.raises(ValueError, match="input_ids\\[1, 3\\]"):
        runner(bad_ids, mask.float(), types)
    big_ids, big_types = random_inputs(fast.config, 5, 12, device=device)
    assert runner(big_ids, None, big_types).last_hidden_state.shape == (5, 12, fast.config.hidden_size)
    if runner_class is CUDAGraphRunner:
        assert set(runner._buckets) == {64}  # the good batches replayed
        return
    # Rounding up never makes a bucket longer than the position table (64 here).
    long_runner = PaddedCUDAGraphRunner(fast, batch_buckets=(2,), seqlen_step=48, max_seqlen=100, capture=capture)
    long_ids, long_types = random_inputs(fast.config, 2, 60, device=device)
    assert_close(long_runner(long_ids, None, long_types).last_hidden_state,
                 _outputs(fast, long_ids, None, long_types).last_hidden_state, 1e-5, "seqlen 60 in a 64 bucket")
    assert set(long_runner._buckets) == {(2, 64)}


@pytest.mark.parametrize("mask_kind", ["right", "none"])
def test_static_forms_clamp_every_lookup_into_its_table(mask_kind):
    """Inside validation.static_forms (the padded graph runner, which checks the values after its
    replay) every lookup is clamped into its table: ids, token types and positions that are out of
    range at padded tokens change nothing at real ones (the eager model ignores them too), and out of
    range at a real token they read no memory outside a table (on the CPU that would raise IndexError).
    Under torch.compile only the padding is zeroed: a bad value at a real token fails its lookup."""
    from fastbert import validation

    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    config = fast.config
    ids, types = random_inputs(config, 3, 10)
    mask = make_mask(mask_kind, 3, 10)
    positions = torch.arange(10).expand(3, 10).clone()
    want = _outputs(fast, ids, mask, types, position_ids=positions).last_hidden_state
    if mask_kind == "right":
        pad = mask == 0
        ids, types, positions = ids.masked_fill(pad, config.vocab_size + 5), types.masked_fill(pad, -3), \
            positions.masked_fill(pad, 10_000)
        with validation.static_forms():
            got = _outputs(fast, ids, mask, types, position_ids=positions).last_hidden_state
        assert_close(got, want, 1e-5, "bad values at padded tokens")
    ids[0, 1], types[1, 2], positions[2, 0] = -1, config.type_vocab_size, config.max_position_embeddings
    with validation.static_forms():
        got = _outputs(fast, ids, mask, types, position_ids=positions).last_hidden_state
    assert got.shape == want.shape and bool(got.isfinite().all())


def test_value_extremes_refuse_what_check_inputs_refuses():
    """The padded runner's in-graph checks (read back after the replay): extremes at real tokens, so
    a bad value under padding passes, as in the model; the mask's own values too."""
    from fastbert import validation

    config = make_config("h144")
    ids, types = random_inputs(config, 2, 6)
    mask = make_mask("right", 2, 6, torch.Generator().manual_seed(3))
    mask[1, 4:] = 0

    def refused(i, m, t):
        extremes, limits = validation.value_extremes(config, i, m, t)
        return validation.refused(extremes.tolist(), limits)

    assert not refused(ids, mask, types) and not refused(ids, mask.bool(), types) and not refused(ids, None, None)
    for which, limit in ((0, config.vocab_size), (1, config.type_vocab_size)):
        for value in (limit, -1):
            for (row, column), expected in (((0, 2), True), ((1, 5), False)):  # a real token; padding
                tensors = [ids.clone(), types.clone()]
                tensors[which][row, column] = value
                assert refused(tensors[0], mask, tensors[1]) == expected, (which, value, row, column)
    for value in (2, -1):
        bad_mask = mask.clone()
        bad_mask[0, 0] = value
        assert refused(ids, bad_mask, types)
    with pytest.raises(TypeError, match="integer or bool attention_mask"):
        validation.value_extremes(config, ids, mask.float(), types)


def test_padded_graph_runner_call_is_a_few_copies_around_the_replay():
    """What a PaddedCUDAGraphRunner call does besides its replay (the replay stubbed out here): a batch
    smaller than its bucket has the mask zeroed, ids and mask copied (one foreach copy), token types
    zeroed, two output slices cloned, no more; a batch of the bucket's shape with token types skips
    both fills. Each of these is a kernel launch on a GPU, and at small batches launches are the time
    (H200 run, 2026-11-26)."""
    from torch.profiler import ProfilerActivity, profile

    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = PaddedCUDAGraphRunner(fast, batch_buckets=(4,), seqlen_step=16, capture=False)
    gen = torch.Generator().manual_seed(5)
    no_device_work = {"aten::view", "aten::slice", "aten::select", "aten::as_strided", "aten::empty",
                      "aten::empty_strided", "aten::_local_scalar_dense", "aten::item", "aten::alias",
                      "aten::resolve_conj", "aten::resolve_neg", "aten::expand"}  # resolve_*: tolist()

    class Replayed:  # what a captured graph leaves in the bucket: outputs written by replay()
        def replay(self):
            pass

    for batch, seqlen, with_types, expected in [
            (3, 20, False, ["aten::_foreach_copy_", "aten::clone", "aten::clone", "aten::zero_", "aten::zero_"]),
            (4, 32, True, ["aten::_foreach_copy_", "aten::clone", "aten::clone"])]:
        ids, types = random_inputs(fast.config, batch, seqlen, gen)
        types = types if with_types else None
        mask = make_mask("holes", batch, seqlen, gen)
        want = runner(ids, mask, types).last_hidden_state  # makes the bucket (eagerly)
        bucket = runner._buckets[4, 32]
        bucket.outputs, bucket.graph = runner._forward(bucket), Replayed()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = runner(ids, mask, types).last_hidden_state
        assert_close(got, want, 0.0, f"stubbed replay {batch}x{seqlen}")
        assert_close(got, _outputs(fast, ids, mask, types).last_hidden_state, 1e-5, f"{batch}x{seqlen} vs eager")
        device_ops = sorted(e.name for e in prof.events()
                            if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in no_device_work)
        assert device_ops == expected, (batch, seqlen, device_ops)
        bucket.graph = None  # the next case's first call runs the bucket eagerly again


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_graph_runners_leave_what_a_replay_cannot_return_to_the_model(runner_class):
    """Hidden states, attentions, tuple output or a model back in training mode: the call runs eagerly
    and returns what the model returns, never a replay that silently drops it."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = runner_class(fast, capture=False)
    ids, types = random_inputs(fast.config, 2, 12)
    mask = make_mask("right", 2, 12)
    out = runner(ids, mask, types, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    fast.config.output_hidden_states = True
    assert len(runner(ids, mask, types).hidden_states) == 3
    fast.config.output_hidden_states = False
    fast.config.return_dict = False
    assert isinstance(runner(ids, mask, types), tuple)
    fast.config.return_dict = True
    # In training mode the model itself gets the caller's tensors (not a bucket's static buffers).
    seen = []
    forward = fast.forward
    fast.forward = lambda input_ids, *args, **kwargs: seen.append(input_ids) or forward(input_ids, *args, **kwargs)
    fast.train()
    assert runner(ids, mask, types).last_hidden_state.requires_grad  # autograd ran, as in the model
    assert len(seen) == 1 and seen[0] is ids
    # A replay's outputs are ordinary tensors: a trainable head can take them.
    fast.forward = forward
    fast.eval()
    out = runner(ids, mask, types)
    assert not out.last_hidden_state.is_inference() and not out.pooler_output.is_inference()
    head = torch.nn.Linear(fast.config.hidden_size, 2)
    head(out.pooler_output).sum().backward()
    assert head.weight.grad is not None


@needs_cuda
@pytest.mark.parametrize("update", ["no_grad", "fused_adamw", "data"])
@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_captured_graphs_follow_in_place_weight_updates(runner_class, update):
    """A graph captured before an optimizer step, load_state_dict or a write through ``.data`` replays
    with the new weights: each layer's copy of its QKV weights into its fused storage is part of the
    graph (fused AdamW and ``.data`` writes do not bump version counters, so nothing keyed on them
    could see those updates)."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64), device="cuda")
    if runner_class is CUDAGraphRunner:
        runner, bucket = CUDAGraphRunner(fast, buckets=(64,), max_sequences=4, max_seqlen=32), 64
    else:
        runner, bucket = PaddedCUDAGraphRunner(fast, batch_buckets=(2,), seqlen_step=16), (2, 16)
    ids, types = random_inputs(fast.config, 2, 12, device="cuda")
    mask = make_mask("right", 2, 12).to("cuda")
    before = runner(ids, mask, types).last_hidden_state.clone()
    storages = [layer.attention.self._qkv_fused.weight.data_ptr() for layer in fast.encoder.layer]
    qkv = [p for layer in fast.encoder.layer for m in (layer.attention.self.key, layer.attention.self.value)
           for p in m.parameters()]
    if update == "fused_adamw":
        optimizer = torch.optim.AdamW(qkv, lr=0.05, fused=True)
        for p in qkv:
            p.grad = torch.randn_like(p)
        optimizer.step()
    else:
        with torch.no_grad():
            for p in qkv:
                (p.data if update == "data" else p).mul_(1.5).add_(0.1)
    got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
    assert runner._buckets[bucket].graph is not None  # replayed, not run eagerly
    assert max_abs_diff(got.last_hidden_state, before) > 1e-2  # the update matters
    assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, f"after the update ({update})")
    assert [layer.attention.self._qkv_fused.weight.data_ptr() for layer in fast.encoder.layer] == storages


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_graph_runners_keep_what_their_graphs_read(runner_class, monkeypatch):
    """A graph reads and writes each layer's fused QKV storage at every replay; the runner keeps those
    storages, so a ``.to()`` that makes the layers new ones (even one that changes nothing) never
    leaves a graph on freed memory. Capture is a stand-in here (no GPU)."""
    from fastbert import cuda_graphs, modeling_bert

    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))

    class Graph:
        def replay(self):
            pass

    def capture(work, pool=None, warmup=2):
        for _ in range(warmup):
            work()
        return Graph(), work()

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture)
    monkeypatch.setattr(cuda_graphs, "_on_device", lambda device, capture: contextlib.nullcontext())
    monkeypatch.setattr(modeling_bert, "_cpu_inference", lambda x, tensors: False)  # the CUDA path
    if runner_class is CUDAGraphRunner:
        runner = CUDAGraphRunner(fast, buckets=(64,), max_sequences=4, max_seqlen=32, capture=False)
    else:
        runner = PaddedCUDAGraphRunner(fast, batch_buckets=(2,), seqlen_step=16, capture=False)
    runner.capture = True
    ids, types = random_inputs(fast.config, 2, 12)
    runner(ids, make_mask("right", 2, 12), types)
    captured = [layer.attention.self._qkv_fused for layer in fast.encoder.layer]
    (bucket,) = runner._buckets.values()
    assert all(s is not None for s in captured) and bucket.storages == captured
    fast.to("cpu")  # changes nothing, but drops the layers' storages
    assert all(layer.attention.self._qkv_fused is None for layer in fast.encoder.layer)
    assert all(a is b for a, b in zip(bucket.storages, captured))


def test_without_autograd_each_call_copies_the_live_qkv_weights_in_one_launch():
    """Without autograd a layer copies its query, key and value parameters into its fused storage with
    one foreach copy at every call (a CUDA graph records it, so replays read the live weights), at the
    same address call after call; with autograd it concatenates (gradients reach the three weights)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    fast, _ = model_pair(make_config("h144", layers=1, max_positions=64))
    attention = fast.encoder.layer[0].attention.self
    with torch.no_grad():
        with Ops() as ops:
            weight, bias = attention._fused_qkv_parameters()
        assert [n for n in ops.names if n in ("cat", "_foreach_copy_", "copy_")] == ["_foreach_copy_"]
        assert attention._qkv_fused.weight is weight and attention._qkv_fused.bias is bias
        attention.key.weight.data.mul_(2.0)  # seen by the next call, though no version counter moved
        again, _ = attention._fused_qkv_parameters()
    assert again is weight and not weight.requires_grad
    assert torch.equal(weight, torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]))
    assert torch.equal(bias, torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))
    with Ops() as ops:
        weight, _ = attention._fused_qkv_parameters()
    assert "cat" in ops.names and "_foreach_copy_" not in ops.names and weight.requires_grad


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_runners_serve_threads_one_call_at_a_time(runner_class):
    """Two threads calling one runner with batches of the same bucket: each gets its own batch's
    output (the static buffers are written, replayed and read under a lock). Without the lock the
    second thread's inputs overwrote the first's between its copy and its replay."""
    import sys
    import threading

    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = runner_class(fast, capture=False) if runner_class is CUDAGraphRunner else \
        runner_class(fast, batch_buckets=(4,), seqlen_step=16, capture=False)
    gen = torch.Generator().manual_seed(21)
    batches = []
    for i in range(6):
        ids, types = random_inputs(fast.config, 3, 10 + i, gen)
        batches.append((ids, make_mask("right", 3, 10 + i, gen), types))
    want = [_outputs(fast, *b).last_hidden_state for b in batches]
    wrong = []

    def work(order):
        for _ in range(4):
            for i in order:
                if (runner(*batches[i]).last_hidden_state - want[i]).abs().max() > 1e-5:
                    wrong.append(i)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside a call
    try:
        threads = [threading.Thread(target=work, args=(order,)) for order in (range(6), range(5, -1, -1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, wrong


def test_cuda_graph_runner_runs_first_token_only_models_eagerly():
    """A model with first_token_only set returns one row per sequence; the runner returns the same
    (its graphs compute every row, so such calls run eagerly)."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    fast.first_token_only = True
    runner = CUDAGraphRunner(fast, capture=False)
    ids, types = random_inputs(fast.config, 3, 20)
    mask = make_mask("left", 3, 20)
    got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape == (3, 1, fast.config.hidden_size)
    assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, "first token only")


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_graph_runners_take_the_models_other_arguments(runner_class):
    """A call without input_ids (inputs_embeds, by keyword or in the model's positional order) runs the
    model eagerly and gives its output; a call with no input gets the model's error, not the runner's
    signature's."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = runner_class(fast, capture=False)
    embeds = torch.randn(2, 7, fast.config.hidden_size, generator=torch.Generator().manual_seed(37))
    mask = make_mask("right", 2, 7)
    want = _outputs(fast, None, mask, None, inputs_embeds=embeds)
    for got in (runner(inputs_embeds=embeds, attention_mask=mask), runner(None, mask, None, None, embeds)):
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-6, "inputs_embeds")
        assert_close(got.pooler_output, want.pooler_output, 1e-6, "inputs_embeds pooler")
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        runner()


def test_padded_graph_runner_takes_position_ids_positionally():
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = PaddedCUDAGraphRunner(fast, batch_buckets=(4,), seqlen_step=16, capture=False)
    ids, types = random_inputs(fast.config, 2, 9)
    mask = make_mask("right", 2, 9)
    positions = torch.arange(3, 12).expand(2, 9)
    assert_close(runner(ids, mask, types, positions).last_hidden_state,
                 _outputs(fast, ids, mask, types, position_ids=positions).last_hidden_state, 1e-5, "positions")


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_runners_refuse_weights_replaced_after_capture(runner_class):
    """Once a graph was captured (stood in for here: the runner keeps the model's storages), replacing
    the weights by new tensors (.double(), as .half() or .to() do) is refused by name: the graphs
    would read the old storage."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = runner_class(fast, capture=False)
    ids, types = random_inputs(fast.config, 2, 9)
    runner(ids, None, types)
    runner._keep_storages(fast)  # what a capture does
    assert len(runner._kept) == len(list(fast.parameters())) + len(list(fast.buffers()))
    runner(ids, None, types)  # same weights: fine
    fast.double()
    with pytest.raises(RuntimeError, match="weights were replaced by new tensors"):
        runner(ids, None, types)


def test_graph_runner_takes_the_bucket_a_batch_fills_exactly():
    """A batch of exactly a bucket's token count takes that bucket (not the next one), the largest
    bucket included (a batch that fills it is not past the buckets): each equals the eager model."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=8, max_seqlen=32, capture=False)
    gen = torch.Generator().manual_seed(13)
    for (batch, seqlen), taken in (((2, 8), {16}), ((4, 16), {16, 64})):
        ids, types = random_inputs(fast.config, batch, seqlen, gen)
        got, want = runner(ids, None, types), _outputs(fast, ids, None, types)
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, f"{batch}x{seqlen}")
        assert_close(got.pooler_output, want.pooler_output, 1e-5, f"{batch}x{seqlen} pooler")
        assert set(runner._buckets) == taken, (batch, seqlen)


def test_graph_runner_buckets_bound_their_sequences_by_their_tokens():
    """A bucket's static bounds are its own: at most its token count of sequences (then the padding's
    pieces) and of rows per sequence, so a small bucket's attention launches fewer programs, on the
    short-sequence tile. A batch whose empty sequences outnumber its tokens takes the bucket of its
    sequence count, and equals the eager model."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=32, max_seqlen=48, capture=False)
    bounds, taken = [], []
    encoder = fast.encoder.forward
    def recorded(hidden, packing, *args, **kwargs):  # each encoder call's sequence slots and max_seqlen
        bounds.append((packing.cu_seqlens.numel() - 1, packing.max_seqlen))
        return encoder(hidden, packing, *args, **kwargs)

    fast.encoder.forward = recorded
    gen = torch.Generator().manual_seed(19)
    ids, types = random_inputs(fast.config, 20, 3, gen)
    few = torch.zeros(20, 3, dtype=torch.long)
    few[:3] = 1  # 9 tokens in 20 sequences, 17 of them empty
    for batch_ids, batch_types, mask, size in ((ids[:4], types[:4], None, 16), (ids, types, few, 64)):
        got = runner(batch_ids, mask, batch_types)
        taken.append(bounds[-1])  # the runner's encoder call, before the eager model's
        want = _outputs(fast, batch_ids, mask, batch_types)
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, f"{size}-token bucket")
        assert_close(got.pooler_output, want.pooler_output, 1e-5, f"{size}-token bucket pooler")
        assert runner.has_graph(size)
    # 16 tokens: 16 sequences + 1 padding piece of at most 48 rows, 16 rows; 64: 32 + 2 pieces, 48 rows.
    assert taken == [(17, 16), (34, 48)]


def _packed_reference(model, ids, types, lengths):
    """The model on the packed row (DataCollatorWithFlattening's form), on the model's device."""
    device = next(model.parameters()).device
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    with torch.no_grad():
        return model(ids[None].to(device), token_type_ids=types[None].to(device),
                     position_ids=positions[None].to(device), cu_seq_lens_q=cu_seqlens.to(device)).last_hidden_state[0]


@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
def test_graph_runner_replays_packed_host_input(capture):
    """replay_packed: sequences given on the host (ids, token types, lengths) through their bucket
    equal the model on the same packed row, for several length mixes (an empty sequence, one bucket
    replayed with other lengths, one whose empty sequences outnumber its tokens), each compared once
    every call has run (a result that a later replay overwrote would show). On a GPU, a replay of a
    captured bucket makes no host sync (CUDA's sync debug mode raises on one)."""
    device = "cuda" if capture else "cpu"
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    fast = fast.to(device)
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=24, max_seqlen=32, capture=capture)
    gen = torch.Generator().manual_seed(23)
    batches = []
    for lengths in ([5, 0, 9], [3, 1, 12], [32, 20, 7], [2] + [0] * 20, [16]):
        ids, types = random_inputs(fast.config, 1, sum(lengths), gen)
        batches.append((ids[0], types[0], lengths, runner.replay_packed(ids[0], types[0], lengths)))
    for ids, types, lengths, got in batches:
        assert got is not None and got.device.type == device, lengths
        assert_close(got, _packed_reference(fast, ids, types, lengths), 1e-5, f"lengths {lengths}")
    assert set(runner._buckets) == {16, 64}
    if capture:
        ids, types = random_inputs(fast.config, 1, 14, gen)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = runner.replay_packed(ids[0], types[0], [6, 8])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_close(got, _packed_reference(fast, ids[0], types[0], [6, 8]), 1e-5, "no-sync replay")


def test_graph_runner_hands_packed_input_it_cannot_take_back():
    """replay_packed returns None (the caller runs the model, which names a bad value) for a value out
    of its table, more sequences than the runner or its largest bucket holds, more tokens than its
    largest bucket, a sequence longer than its max_seqlen or the position table, a model in training
    mode and one that computes only first tokens; and refuses malformed arguments by name."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=4, max_seqlen=32, capture=False)
    gen = torch.Generator().manual_seed(29)
    ids, types = random_inputs(fast.config, 1, 40, gen)
    ids, types = ids[0], types[0]
    for what, args in (("id past the vocabulary", (ids[:6].clone().index_fill_(0, torch.tensor([4]), 10**6),
                                                   types[:6], [3, 3])),
                       ("negative id", (ids[:6].clone().index_fill_(0, torch.tensor([1]), -1), types[:6], [6])),
                       ("token type past its table", (ids[:6], types[:6].clone().fill_(2), [6])),
                       ("more sequences than max_sequences", (ids[:5], types[:5], [1] * 5)),
                       ("more tokens than the largest bucket", (torch.cat([ids, ids]), torch.cat([types, types]),
                                                                [20] * 4)),
                       ("a sequence past max_seqlen", (ids, types, [33, 7]))):
        assert runner.replay_packed(*args) is None, what
    wide = CUDAGraphRunner(fast, buckets=(16, 128), max_sequences=160, max_seqlen=100, capture=False)
    long_ids, long_types = (t[0] for t in random_inputs(fast.config, 1, 70, gen))
    assert wide.replay_packed(long_ids, long_types, [70]) is None, "a sequence past the 64 positions"
    assert wide.replay_packed(long_ids[:1], long_types[:1], [1] + [0] * 140) is None, "141 sequences, bucket of 128"
    assert wide.replay_packed(long_ids[:60], long_types[:60], [60]) is not None  # within every bound
    fast.train()
    assert runner.replay_packed(ids[:6], types[:6], [6]) is None, "training mode"
    fast.eval()
    assert not runner._buckets and set(wide._buckets) == {128}
    with pytest.raises(ValueError, match=r"input_ids\[0, 4\] = 1000000 is out of range"):  # what the caller hears
        _packed_reference(fast, ids[:6].clone().index_fill_(0, torch.tensor([4]), 10**6), types[:6], [3, 3])
    for bad, match in (((ids[:6, None], types[:6], [6]), "1-D int64 or int32 CPU tensors"),
                       ((ids[:6].float(), types[:6], [6]), "1-D int64 or int32 CPU tensors"),
                       ((ids[:6].bool(), types[:6], [6]), "1-D int64 or int32 CPU tensors"),
                       ((ids[:6], types[:6].to(torch.uint8), [6]), "1-D int64 or int32 CPU tensors"),
                       ((ids[:6], types[:5], [6]), "1-D int64 or int32 CPU tensors"),
                       ((ids[:6], types[:6], [2, 3]), "add up to the 6 tokens"),
                       ((ids[:6], types[:6], [7, -1]), "add up to the 6 tokens"),
                       ((ids[:0], types[:0], []), "add up to the 0 tokens"),
                       ((ids[:6], types[:6], [6.5]), r"integer token counts .* got \[6\.5\]"),
                       ((ids[:6], types[:6], [3, 3.9]), "integer token counts"),
                       ((ids[:6], types[:6], [True] * 6), "integer token counts"),
                       ((ids[:6], types[:6], torch.tensor([3.0, 3.0])), "integer token counts")):
        with pytest.raises(ValueError, match=match):
            runner.replay_packed(*bad)
    fast.first_token_only = True
    assert runner.replay_packed(ids[:6], types[:6], [6]) is None


def test_graph_runner_unpads_a_tokenizer_batch_in_one_op(monkeypatch):
    """A padded batch with an integer or bool mask (what a tokenizer gives) is unpadded and checked by
    pack_padded_batch (two launches on a GPU) instead of check_inputs' composition, with token types
    given, broadcast from one row or absent, and every mask kind: each equals the eager model. Batches
    without a mask, with a float mask or with position_ids still go through check_inputs."""
    import fastbert.cuda_graphs as cuda_graphs
    from fastbert import ops

    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=8, max_seqlen=32, capture=False)
    calls = []
    for module, name in ((cuda_graphs, "check_inputs"), (ops, "pack_padded_batch")):
        def counted(*args, _original=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    gen = torch.Generator().manual_seed(31)
    for kind, types_form, mask_dtype, taken in [
            ("right", "full", torch.long, "pack_padded_batch"), ("left", "row", torch.long, "pack_padded_batch"),
            ("holes", None, torch.bool, "pack_padded_batch"),
            ("fully_masked_row", "full", torch.int32, "pack_padded_batch"),
            ("none", "full", None, "check_inputs"), ("right", "full", torch.float32, "check_inputs")]:
        ids, types = random_inputs(fast.config, 4, 9, gen)
        types = {"full": types, "row": types[:1], None: None}[types_form]
        mask = None if mask_dtype is None else make_mask(kind, 4, 9, gen).to(mask_dtype)
        calls.clear()
        got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
        assert calls[0] == taken and calls.count(taken) == 1, (kind, types_form, mask_dtype, calls)
        what = f"{kind} mask ({mask_dtype}), types {types_form}"
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, what)
        assert_close(got.pooler_output, want.pooler_output, 1e-5, f"{what} pooler")
    ids, types = random_inputs(fast.config, 2, 9, gen)
    calls.clear()
    runner(ids, torch.ones_like(ids), types, position_ids=torch.arange(9).expand(2, 9))
    assert calls[0] == "check_inputs"
    # What check_inputs names: no input_ids, a complex mask.
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        runner(None, torch.ones(2, 9, dtype=torch.long), types)
    with pytest.raises(TypeError, match="attention_mask must be a 0/1 mask"):
        runner(ids, torch.ones(2, 9, dtype=torch.complex64), types)
    monkeypatch.setattr(cuda_graphs, "ONE_OP_UNPAD_POSITIONS", 17)  # past it: check_inputs
    mask = make_mask("right", 2, 9, gen)
    calls.clear()
    assert_close(runner(ids, mask, types).last_hidden_state, _outputs(fast, ids, mask, types).last_hidden_state,
                 1e-5, "18 positions")
    assert calls[0] == "check_inputs"
    monkeypatch.setattr(cuda_graphs, "ONE_OP_UNPAD_POSITIONS", 18)
    calls.clear()
    runner(ids, mask, types)
    assert calls[0] == "pack_padded_batch"
    # Padded past the runner's max_seqlen, its sequences within it: the bound is the longest real row.
    narrow = CUDAGraphRunner(fast, buckets=(64,), max_sequences=8, max_seqlen=24, capture=False)
    ids, types = random_inputs(fast.config, 2, 40, gen)
    mask = (torch.arange(40) < torch.tensor([[10], [20]])).long()
    assert_close(narrow(ids, mask, types).last_hidden_state, _outputs(fast, ids, mask, types).last_hidden_state,
                 1e-5, "rows of 10 and 20 tokens padded to 40")
    assert narrow.has_graph(64)


def test_graph_runner_runs_batches_of_more_sequences_than_it_holds_eagerly():
    """More sequences than ``max_sequences`` (a bucket's cu_seqlens holds no more): the call runs the
    model eagerly, equals it, and makes no bucket; an empty batch (every token masked) too."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=2, max_seqlen=32, capture=False)
    gen = torch.Generator().manual_seed(17)
    ids, types = random_inputs(fast.config, 8, 2, gen)  # 16 tokens in 8 sequences
    for mask in (None, make_mask("right", 8, 2, gen), torch.zeros(8, 2, dtype=torch.long)):
        got, want = runner(ids, mask, types), _outputs(fast, ids, mask, types)
        assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5, "8 sequences")
        assert_close(got.pooler_output, want.pooler_output, 1e-5, "8 sequences pooler")
    assert not runner._buckets
    empty = torch.zeros(2, 5, dtype=torch.long)  # 2 sequences, no token
    ids, types = random_inputs(fast.config, 2, 5, gen)
    got, want = runner(ids, empty, types), _outputs(fast, ids, empty, types)
    assert_close(got.last_hidden_state, want.last_hidden_state, 0.0, "empty batch")
    assert_close(got.pooler_output, want.pooler_output, 1e-5, "empty batch pooler")
    assert not runner._buckets


def test_padded_graph_runner_leaves_what_the_model_refuses_to_the_model():
    """A float mask (one of 0.5s, which the graphs' integer buffer would truncate to 0), a (1, seqlen)
    mask for a larger batch, (batch, 1) token types (which a copy would broadcast): the model's own
    error, not a replay; a float mask of 0s and 1s reaches the model as the caller's tensor."""
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    runner = PaddedCUDAGraphRunner(fast, batch_buckets=(4,), seqlen_step=16, capture=False)
    ids, types = random_inputs(fast.config, 3, 9)
    mask = make_mask("right", 3, 9)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        runner(ids, mask.float() * 0.5, types)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 9\), but the input is \(3, 9\)"):
        runner(ids, mask[:1], types)
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(3, 1\), but the input is \(3, 9\)"):
        runner(ids, mask, types[:, :1])
    seen = []
    forward = fast.forward
    fast.forward = lambda input_ids, attention_mask=None, *args, **kwargs: seen.append(attention_mask) or \
        forward(input_ids, attention_mask, *args, **kwargs)
    float_mask = mask.float()
    got = runner(ids, float_mask, types)
    fast.forward = forward
    assert len(seen) == 1 and seen[0] is float_mask
    assert_close(got.last_hidden_state, _outputs(fast, ids, mask, types).last_hidden_state, 1e-5, "float mask")


@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_runners_refuse_training_models_and_capture_on_the_cpu(runner_class):
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    with pytest.raises(ValueError, match="put the model in eval mode first"):
        runner_class(fast.train(), capture=False)
    fast.eval()
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
        runner_class(fast, capture=True)


def test_graph_runner_keeps_the_first_captures_storages_at_later_captures(monkeypatch):
    """The storages kept for the graphs are those of the first capture: a later capture (another
    bucket) after a weight was replaced by a new tensor (``param.data = ...``, which the runner cannot
    see) does not swap them for the new ones, which would free what the first graph still reads.
    Capture is a stand-in here (no GPU)."""
    from fastbert import cuda_graphs, modeling_bert

    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))

    class Graph:
        def replay(self):
            pass

    def capture(work, pool=None, warmup=2):
        return Graph(), work()

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture)
    monkeypatch.setattr(cuda_graphs, "_on_device", lambda device, capture: contextlib.nullcontext())
    monkeypatch.setattr(modeling_bert, "_cpu_inference", lambda x, tensors: False)  # the CUDA path
    runner = CUDAGraphRunner(fast, buckets=(16, 64), max_sequences=4, max_seqlen=32, capture=False)
    runner.capture = True
    ids, types = random_inputs(fast.config, 2, 5)
    runner(ids, None, types)  # captures bucket 16
    kept = [s.data_ptr() for s in runner._kept]
    middle = fast.encoder.layer[0].output.dense.weight
    old = middle.data
    middle.data = old.clone()
    ids, types = random_inputs(fast.config, 3, 10)
    runner(ids, None, types)  # captures bucket 64
    assert set(runner._buckets) == {16, 64}
    assert [s.data_ptr() for s in runner._kept] == kept and old.data_ptr() in kept


@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("runner_class", [CUDAGraphRunner, PaddedCUDAGraphRunner])
def test_runners_first_used_in_inference_mode_serve_calls_outside_it(runner_class, capture):
    """A bucket made during a call under torch.inference_mode (as fastbert embed calls its runner)
    keeps ordinary static buffers: a later call outside inference mode writes into them (an inference
    tensor would refuse the in-place copy) and still equals the eager model."""
    device = "cuda" if capture else "cpu"
    fast, _ = model_pair(make_config("h144", layers=2, max_positions=64))
    fast = fast.to(device)
    runner = runner_class(fast, capture=capture)
    ids, types = random_inputs(fast.config, 2, 9, device=device)
    with torch.inference_mode():
        first = runner(ids, None, types).last_hidden_state
    again = runner(ids, None, types).last_hidden_state
    assert not again.is_inference()
    want = _outputs(fast, ids, None, types).last_hidden_state
    assert_close(first, want, 1e-5, "in inference mode")
    assert_close(again, want, 1e-5, "outside it")


def test_compact_attention_refuses_more_slots_than_the_kernel_takes():
    """The compact grid takes at most MAX_COMPACT_SLOTS sequence slots: a runner whose largest bucket
    needs more (its sequences and its padding pieces) says so, rather than silently launching the
    plain grid."""
    pytest.importorskip("triton", reason="the compact grid is the Triton kernel's")
    from fastbert.ops.attention import MAX_COMPACT_SLOTS

    fast, _ = model_pair(make_config("h144", layers=1, max_positions=64))
    CUDAGraphRunner(fast, max_sequences=256, capture=False, compact_attention=True)  # 256 + 16384 / 64 slots
    with pytest.raises(ValueError, match=f"at most {MAX_COMPACT_SLOTS} sequence slots; max_sequences=1000"):
        CUDAGraphRunner(fast, max_sequences=1000, capture=False, compact_attention=True)
    CUDAGraphRunner(fast, max_sequences=1000, capture=False)  # the plain grid takes any count
