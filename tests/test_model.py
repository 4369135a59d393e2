"""fastbert.BertModel against transformers.BertModel with the same weights: on the CPU (PyTorch path)
and, where the test takes a ``device``, on a GPU too (the fused kernels, against transformers on the
same GPU)."""

import importlib

import pytest
import torch
import transformers

import fastbert
from fastbert.ops import backend
from tests.helpers import (DEVICES, FP32_MODEL_RANDOM, RecordFastbertOps, assert_close, assert_gradients_match,
                           assert_low_precision_within_budget, max_abs_diff, needs_cuda)
from tests.model_utils import SHAPES, make_config, make_mask, model_pair, random_inputs


def _compare(fast, hf, ids, mask, types=None, atol=FP32_MODEL_RANDOM, **kwargs):
    with torch.no_grad():
        ours = fast(ids, attention_mask=mask, token_type_ids=types, **kwargs)
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, **kwargs)
    keep = mask.bool()
    assert_close(ours.last_hidden_state[keep], theirs.last_hidden_state[keep], atol, "last_hidden_state")
    assert (ours.last_hidden_state[~keep] == 0).all(), "padded positions must be zeros"
    first_real = keep[:, 0]  # a row whose first position is padding pools a zero vector
    assert_close(ours.pooler_output[first_real], theirs.pooler_output[first_real], atol, "pooler_output")
    return ours, theirs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes"])
def test_random_configs_match_transformers(shape, mask_kind, device):
    layers = 1 if shape in ("base", "large") else 2
    fast, hf = model_pair(make_config(shape, layers=layers), device=device)
    ids, types = random_inputs(fast.config, 3, 13, device=device)
    _compare(fast, hf, ids, make_mask(mask_kind, 3, 13).to(device), types)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
def test_every_activation(hidden_act):
    fast, hf = model_pair(make_config("h144", hidden_act=hidden_act))
    ids, types = random_inputs(fast.config, 2, 11)
    _compare(fast, hf, ids, make_mask("right", 2, 11), types)


def test_unsupported_activation_is_refused_at_build():
    with pytest.raises(NotImplementedError, match="hidden_act='silu'"):
        fastbert.BertModel(make_config(hidden_act="silu"))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_row_is_finite_and_changes_no_other_row(device):
    fast, hf = model_pair(make_config(), device=device)
    ids, types = random_inputs(fast.config, 4, 9, device=device)
    mask = make_mask("fully_masked_row", 4, 9).to(device)
    ours, _ = _compare(fast, hf, ids, mask, types)
    assert torch.isfinite(ours.last_hidden_state).all() and torch.isfinite(ours.pooler_output).all()
    assert (ours.last_hidden_state[-1] == 0).all()
    with torch.no_grad():
        without = fast(ids[:-1], attention_mask=mask[:-1], token_type_ids=types[:-1])
    # On a GPU one row fewer may pick another GEMM kernel (other rounding): fp32 noise, no more.
    atol = 1e-6 if device == "cpu" else FP32_MODEL_RANDOM
    assert_close(ours.last_hidden_state[:-1], without.last_hidden_state, atol, "other rows")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_single_inputs(device):
    fast, _ = model_pair(make_config(), device=device)
    ids, types = random_inputs(fast.config, 4, 12, device=device)
    mask = make_mask("right", 4, 12).to(device)
    with torch.no_grad():
        batched = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for row in range(4):
            n = int(mask[row].sum())
            single = fast(ids[row:row + 1, :n], token_type_ids=types[row:row + 1, :n]).last_hidden_state
            assert_close(batched[row, :n], single[0], 1e-5, f"row {row}")


def test_inputs_embeds_and_position_ids():
    fast, hf = model_pair(make_config())
    ids, types = random_inputs(fast.config, 2, 10)
    mask = make_mask("holes", 2, 10)
    embeds = torch.randn(2, 10, fast.config.hidden_size)
    positions = torch.randint(0, fast.config.max_position_embeddings, (2, 10))
    with torch.no_grad():
        ours = fast(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, position_ids=positions)
        theirs = hf(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, position_ids=positions)
    keep = mask.bool()
    assert_close(ours.last_hidden_state[keep], theirs.last_hidden_state[keep], FP32_MODEL_RANDOM)
    _compare(fast, hf, ids, mask, types, position_ids=positions[:1])  # [1, seqlen] broadcasts


def test_hidden_states_and_attentions():
    fast, hf = model_pair(make_config(layers=2))
    ids, types = random_inputs(fast.config, 3, 10)
    mask = make_mask("holes", 3, 10)
    ours, theirs = _compare(fast, hf, ids, mask, types, output_hidden_states=True, output_attentions=True)
    keep = mask.bool()
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert_close(a[keep], b[keep], FP32_MODEL_RANDOM, "hidden_states")
    assert len(ours.attentions) == len(theirs.attentions) == 2
    key_mask = keep[:, None, None, :]
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == b.shape
        rows = a.transpose(1, 2)[keep]  # real queries: [tokens, heads, seqlen]
        assert_close(rows, b.transpose(1, 2)[keep], 1e-6, "attention probabilities")
        assert (a.masked_select(~key_mask.expand_as(a)) == 0).all()


@pytest.mark.parametrize("selection", [-1, 1, [0, 2], (2, -3), [-1, 7], [5], 0, []])
def test_hidden_states_selected_by_index(selection):
    """output_hidden_states as an index or indices (transformers 5): the selected hidden states, the
    others None, as transformers returns them (negative from the end, out of range selecting none; its
    index 0 and an empty list select no hidden states at all)."""
    fast, hf = model_pair(make_config(layers=2))
    ids, types = random_inputs(fast.config, 3, 10)
    mask = make_mask("right", 3, 10)
    ours, theirs = _compare(fast, hf, ids, mask, types, output_hidden_states=selection)
    if theirs.hidden_states is None:
        assert ours.hidden_states is None
        return
    assert [h is None for h in ours.hidden_states] == [h is None for h in theirs.hidden_states]
    assert any(h is not None for h in theirs.hidden_states) == (selection not in ([5],))
    keep = mask.bool()
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        if b is not None:
            assert_close(a[keep], b[keep], FP32_MODEL_RANDOM, f"hidden_states {selection}")


def test_return_dict_false_gives_transformers_tuple_order():
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    with torch.no_grad():
        ours = fast(ids, return_dict=False, output_hidden_states=True, output_attentions=True)
        theirs = hf(ids, return_dict=False, output_hidden_states=True, output_attentions=True)
    assert isinstance(ours, tuple) and len(ours) == len(theirs)
    assert_close(ours[0], theirs[0], FP32_MODEL_RANDOM)
    assert_close(ours[1], theirs[1], FP32_MODEL_RANDOM)
    for a, b in zip(ours[2:], theirs[2:]):  # hidden states, attentions, (cross-attentions)
        assert type(a) is type(b) and len(a) == len(b)
        assert [t.shape for t in a] == [t.shape for t in b]
    with torch.no_grad():
        assert len(fast(ids, return_dict=False)) == len(hf(ids, return_dict=False)) == 2


def test_no_pooling_layer():
    fast, hf = model_pair(make_config(), add_pooling_layer=False)
    ids, _ = random_inputs(fast.config, 2, 8)
    with torch.no_grad():
        out = fast(ids)
    assert out.pooler_output is None
    assert set(fast.state_dict()) == set(hf.state_dict())


def test_state_dict_keys_equal_transformers():
    fast, hf = model_pair(make_config())
    assert list(fast.state_dict()) == list(hf.state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "right", "holes", "fully_masked_row"])
@pytest.mark.parametrize("shape", ["h144", "h312", "base"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_budget(dtype, shape, mask_kind, device):
    """fp16 / bf16 against transformers in fp32 (the reference), within 2x transformers' own error at
    that dtype + 1e-3. On a GPU every fused op and the embeddings op must have run."""
    layers = 1 if shape == "base" else 2
    fast32, hf32 = model_pair(make_config(shape, layers=layers), device=device)
    fast = fastbert.BertModel(fast32.config).to(device, dtype).eval()
    fast.load_state_dict(fast32.state_dict())
    hf = transformers.BertModel(hf32.config).to(device, dtype).eval()
    hf.load_state_dict(hf32.state_dict())
    ids, types = random_inputs(fast.config, 3, 37, device=device)
    mask = make_mask(mask_kind, 3, 37).to(device)
    keep = mask.bool()
    with torch.no_grad(), RecordFastbertOps() as record:
        ours = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
    with torch.no_grad():
        reference = hf32(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
    assert ours.dtype == dtype
    assert_low_precision_within_budget(ours.float(), reference, theirs.float(), f"{dtype} {shape} model")
    if device == "cuda":
        ran = {name.split(".")[1] for name in record.names}
        # The FFN's bias + GELU: cuBLASLt's epilogue under the default FASTBERT_GEMM, else the kernel.
        epilogue = "_addmm_activation" if backend.gemm_setting() == "cublaslt" else "bias_activation"
        assert {"varlen_attention", epilogue, "bias_residual_layer_norm"} <= ran, ran
        assert ran & {"embedding_layer_norm", "embedding_layer_norm_triton"}, ran


@needs_cuda
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("mask_kind", ["right", "holes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublaslt_setting_within_budget(dtype, mask_kind, hidden_act, monkeypatch):
    """FASTBERT_GEMM=cublaslt on a GPU: the FFN's first matmul runs with its bias + GELU in cuBLASLt's
    epilogue (tanh-approximated; erf-GELU models too, in 16-bit), within the 16-bit budget of
    transformers in fp32, in eager calls and through PaddedCUDAGraphRunner."""
    from fastbert.cuda_graphs import PaddedCUDAGraphRunner

    monkeypatch.setenv("FASTBERT_GEMM", "cublaslt")
    fast32, hf32 = model_pair(make_config("base", layers=2, hidden_act=hidden_act), device="cuda")
    fast = fastbert.BertModel(fast32.config).to("cuda", dtype).eval()
    fast.load_state_dict(fast32.state_dict())
    hf = transformers.BertModel(hf32.config).to("cuda", dtype).eval()
    hf.load_state_dict(hf32.state_dict())
    ids, types = random_inputs(fast.config, 3, 37, device="cuda")
    mask = make_mask(mask_kind, 3, 37).to("cuda")
    keep = mask.bool()
    with torch.no_grad(), RecordFastbertOps() as record:  # the module path (a dispatch mode is active)
        ours = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
    gemm = importlib.import_module("fastbert.ops.linear_activation")
    fast_path_calls, original = [], gemm.cublaslt_linear_activation
    monkeypatch.setattr(gemm, "cublaslt_linear_activation", lambda *a: fast_path_calls.append(1) or original(*a))
    with torch.no_grad():
        fast_path = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
        graphed = PaddedCUDAGraphRunner(fast)(ids, mask, types).last_hidden_state[keep]
        reference = hf32(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
    assert record.names.count("aten._addmm_activation.default") == 2, record.names
    assert "fastbert.bias_activation.default" not in record.names, record.names
    assert len(fast_path_calls) >= 4, fast_path_calls  # the eager fast path's 2 layers, then the capture's
    for out, what in ((ours, "eager"), (fast_path, "fast path"), (graphed, "graphs")):
        assert out.dtype == dtype
        assert_low_precision_within_budget(out.float(), reference, theirs.float(), f"{dtype} {hidden_act} {what}")


@pytest.mark.parametrize("device", DEVICES)
def test_large_activations_in_half_precision_stay_finite(device):
    """LayerNorm statistics and softmax in fp32: inputs of magnitude 1e3 must not overflow fp16."""
    fast32, _ = model_pair(make_config("h96"), device=device)
    fast = fastbert.BertModel(fast32.config).to(device).half().eval()
    fast.load_state_dict(fast32.state_dict())
    embeds = 300 * torch.randn(2, 9, 96, device=device)
    with torch.no_grad():
        out = fast(inputs_embeds=embeds.half()).last_hidden_state
        ref = fast32(inputs_embeds=embeds).last_hidden_state
    assert torch.isfinite(out).all()
    assert max_abs_diff(out.float(), ref) < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_equal_transformers_in_train_mode(device):
    fast, hf = model_pair(make_config(layers=2), device=device)
    fast.train(), hf.train()  # dropout probabilities are 0 in these configs
    ids, types = random_inputs(fast.config, 3, 10, device=device)
    mask = make_mask("left", 3, 10).to(device)
    keep = mask.bool()[..., None]
    weight = torch.randn(3, 10, fast.config.hidden_size).to(device)
    for model in (fast, hf):
        out = model(ids, attention_mask=mask, token_type_ids=types)
        ((out.last_hidden_state * weight * keep).sum() + out.pooler_output[keep[:, 0, 0]].sum()).backward()
    assert_gradients_match(fast, hf)


def _train_step_gradients(model, ids, mask):
    out = model(ids, attention_mask=mask)
    ((out.last_hidden_state * mask[..., None]).pow(2).sum() + out.pooler_output.sum()).backward()


def test_padding_row_gets_no_gradient():
    """``pad_token_id`` inside computed positions (no mask, or a pad id within a sequence): the word
    table's padding row gets no gradient, as ``nn.Embedding(padding_idx=...)`` gives it in transformers;
    every other gradient matches."""
    fast, hf = model_pair(make_config())
    fast.train(), hf.train()
    pad = fast.config.pad_token_id
    ids, _ = random_inputs(fast.config, 3, 9)
    ids[:, 3] = pad
    for mask in (None, make_mask("holes", 3, 9)):
        for model in (fast, hf):
            model.zero_grad()
            _train_step_gradients(model, ids, torch.ones(3, 9, dtype=torch.long) if mask is None else mask)
        assert fast.embeddings.word_embeddings.weight.grad[pad].abs().max() == 0
        assert_gradients_match(fast, hf)


@pytest.mark.parametrize("option, value", [("max_norm", 1.0), ("scale_grad_by_freq", True), ("sparse", True)])
def test_embedding_options_are_honoured(option, value):
    """An ``nn.Embedding`` option that changes the lookup (max_norm) or its gradient (scale_grad_by_freq,
    sparse) on any table: the table is looked up as a module, as transformers does. (scale_grad_by_freq
    counts the packed tokens a table is looked up for: transformers also counts padded positions, and
    looks positions up once for the whole batch, so only the word table without padding compares.)"""
    frequency = option == "scale_grad_by_freq"
    for table in ("word_embeddings",) if frequency else ("word_embeddings", "position_embeddings",
                                                         "token_type_embeddings"):
        fast, hf = model_pair(make_config())
        fast.train(), hf.train()
        ids, _ = random_inputs(fast.config, 2, 6)
        ids[:, :3] = ids[0, 0]  # repeated ids: scale_grad_by_freq scales their gradients
        mask = make_mask("none" if frequency else "right", 2, 6)
        for model in (fast, hf):
            setattr(getattr(model.embeddings, table), option, value)
            if frequency:  # else the padding row's rule alone would send the lookup through the module
                model.embeddings.word_embeddings.padding_idx = None
            _train_step_gradients(model, ids, mask)
        for name, p in fast.named_parameters():
            q = dict(hf.named_parameters())[name]
            assert p.grad.layout == q.grad.layout, (table, name)
            assert max_abs_diff(p.grad.to_dense(), q.grad.to_dense()) <= 1e-4 * q.grad.to_dense().abs().max().item() + 1e-5, \
                (table, name)
        with torch.no_grad():
            _compare(fast.eval(), hf.eval(), ids, mask)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_forward_mode_ad_equals_transformers(grad):
    """torch.func.jvp through the model (with gradients on or off: forward mode does not need them)
    gives transformers' tangent at real tokens."""
    fast, hf = model_pair(make_config())
    embeds, tangent = torch.randn(2, 7, 144), torch.randn(2, 7, 144)
    mask = make_mask("right", 2, 7)
    tangents = []
    for model in (fast, hf):
        with torch.set_grad_enabled(grad):
            tangents.append(torch.func.jvp(lambda e: model(inputs_embeds=e, attention_mask=mask).last_hidden_state,
                                           (embeds,), (tangent,))[1])
    keep = mask.bool()
    assert tangents[1][keep].abs().max() > 0.1
    assert_close(tangents[0][keep], tangents[1][keep], FP32_MODEL_RANDOM, "jvp tangent")


@pytest.mark.parametrize("where", ["embeddings.dropout", "encoder.layer.0.attention.output.dropout",
                                   "encoder.layer.1.output.dropout"])
def test_dropout_replaced_or_hooked(where):
    """A hidden dropout replaced by ``nn.Identity`` (a common way to turn one off) runs in training and
    inference; one with a forward hook is called, as in transformers."""
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 6)
    mask = make_mask("right", 2, 6)
    for model in (fast, hf):
        parent, _, name = where.rpartition(".")
        setattr(model.get_submodule(parent), name, torch.nn.Identity())
    for train in (True, False):
        fast.train(train), hf.train(train)
        with torch.no_grad():
            _compare(fast, hf, ids, mask)
    calls = []
    fast.eval().get_submodule(where).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        fast(ids, attention_mask=mask)
    assert calls == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_inference_within_budget(device):
    """Inference under bf16 autocast without autograd (evaluation inside a bf16 Trainer): within 2x
    transformers' own error under the same autocast + 1e-3 of transformers in fp32. (On a CPU, the QKV
    projection's three GEMMs into one output would not be autocast: it takes F.linear there instead.)"""
    fast, hf = model_pair(make_config(layers=2), device=device)
    ids, types = random_inputs(fast.config, 3, 10, device=device)
    mask = make_mask("right", 3, 10).to(device)
    keep = mask.bool()
    outputs = []
    with torch.no_grad():
        for model, autocast in ((fast, True), (hf, True), (hf, False)):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                outputs.append(model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep].float())
    ours, theirs, reference = outputs
    assert_low_precision_within_budget(ours, reference, theirs, "autocast inference output")


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_training_within_budget(device):
    """Fine-tuning under bf16 autocast (what Trainer(bf16=True) does): fastbert's output and its
    parameter gradients against transformers' in fp32, within 2x transformers' own error under the
    same autocast + 1e-3 (gradients: relative error of all of them together)."""
    fast, hf = model_pair(make_config(layers=2), device=device)
    _, hf_autocast = model_pair(make_config(layers=2), device=device)
    ids, types = random_inputs(fast.config, 3, 10, device=device)
    mask = make_mask("right", 3, 10).to(device)
    keep = mask.bool()
    weight = torch.randn(3, 10, fast.config.hidden_size).to(device)
    outputs, grads = [], []
    for model, autocast in ((fast, True), (hf_autocast, True), (hf, False)):
        model.train()  # dropout probabilities are 0 in these configs
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        (out.float() * weight * keep[..., None]).sum().backward()
        outputs.append(out[keep].float())
        named = sorted((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
        grads.append((tuple(name for name, _ in named), torch.cat([g.float().flatten() for _, g in named])))
    ours, theirs, reference = outputs
    assert_low_precision_within_budget(ours, reference, theirs, "autocast output")
    assert grads[0][0] == grads[2][0]  # the same parameters got gradients (the pooler's none: unused)
    g_ours, g_theirs, g_ref = (g for _, g in grads)
    relative = [(g - g_ref).norm().item() / g_ref.norm().item() for g in (g_ours, g_theirs)]
    assert relative[0] <= 2 * relative[1] + 1e-3, relative


def test_dropout_is_applied_in_train_mode():
    config = make_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.1
    fast = fastbert.BertModel(config).train()
    ids, _ = random_inputs(config, 2, 8)
    a, b = fast(ids).last_hidden_state, fast(ids).last_hidden_state
    assert not torch.equal(a, b)
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(ids).last_hidden_state, fast(ids).last_hidden_state)


DROPOUT_SITES = {
    "embeddings": lambda model: [model.embeddings.dropout],
    "attention probabilities": lambda model: [layer.attention.self.dropout for layer in model.encoder.layer],
    "attention output": lambda model: [layer.attention.output.dropout for layer in model.encoder.layer],
    "FFN output": lambda model: [layer.output.dropout for layer in model.encoder.layer],
}


@pytest.mark.parametrize("site", DROPOUT_SITES)
def test_each_dropout_is_applied_in_train_mode(site):
    """One dropout site at p = 0.5, every other at 0: training outputs leave the eval ones by far (a
    site whose dropout was skipped would leave them equal), and about half of the elements of that
    site's output are zeroed (the embeddings' output checked directly)."""
    config = make_config()
    fast = fastbert.BertModel(config)
    for dropout in DROPOUT_SITES[site](fast):
        dropout.p = 0.5
    ids, _ = random_inputs(config, 2, 8)
    with torch.no_grad():
        expected = fast.eval()(ids).last_hidden_state
    torch.manual_seed(0)
    got = fast.train()(ids).last_hidden_state
    assert (got - expected).abs().max() > 0.1, site
    if site == "embeddings":
        kept = fast.embeddings(ids.flatten(), torch.arange(8).repeat(2), torch.zeros(16, dtype=torch.long))
        assert 0.3 < (kept == 0).float().mean() < 0.7


@pytest.fixture(params=["cpu_blocks", "fused_storage"])
def qkv_path(request, monkeypatch):
    """The two ways inference computes the QKV projection: on a CPU, three GEMMs into the blocks of one
    output; elsewhere (CUDA), the weights copied into fused storage, then one GEMM (forced here)."""
    from fastbert import modeling_bert

    if request.param == "fused_storage":
        monkeypatch.setattr(modeling_bert, "_cpu_inference", lambda x, tensors: False)
    return request.param


@pytest.mark.parametrize("update", ["in_place", "new_storage", "data", "fused_adamw", "conversions"])
def test_fused_qkv_follows_every_kind_of_weight_update(update, qkv_path):
    """Inference calls before and after the query / key / value weights change agree with transformers
    however they changed: in place under no_grad (version counters move), a new ``.data``, in place
    through ``.data`` (what PEFT's merge does) and a fused AdamW step (neither moves a version counter),
    half() then float() (each weight converted in place of its Parameter)."""
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    mask = torch.ones_like(ids)
    _compare(fast, hf, ids, mask)  # an inference call before the update
    gen = torch.Generator().manual_seed(5)
    for model in (fast, hf):
        layer0, layer1 = (layer.attention.self for layer in model.encoder.layer)
        weights = [layer0.key.weight, layer1.value.bias, layer0.query.weight]
        if update == "fused_adamw":
            optimizer = torch.optim.AdamW(weights, lr=0.05, fused=True)
            for w in weights:
                w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel()))
            optimizer.step()
        elif update == "conversions":
            model.half().float()  # rounds every weight to fp16
        elif update == "new_storage":
            for w in weights:
                w.data = torch.randn(w.shape, generator=gen) * 0.1
        else:
            with torch.no_grad():
                for w in weights:
                    (w.data if update == "data" else w).mul_(1.5).add_(0.1)
        gen = torch.Generator().manual_seed(5)
    assert torch.equal(fast.encoder.layer[0].attention.self.key.weight, hf.encoder.layer[0].attention.self.key.weight)
    _compare(fast, hf, ids, mask)


def test_fused_qkv_follows_a_peft_merge(qkv_path):
    """Inference, then a LoRA adapter injected and trained one step and merged into the weights: the
    merged model equals the adapted one (PEFT merges through ``.data``, which moves no version counter)."""
    peft = pytest.importorskip("peft")
    fast, _ = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    with torch.no_grad():
        fast(ids)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False),
                                 fast)
    with torch.no_grad():
        adapted = fast(ids).last_hidden_state
    for layer in fast.encoder.layer:
        attention = layer.attention.self
        for name in ("query", "value"):
            wrapped = getattr(attention, name)
            wrapped.merge()
            setattr(attention, name, wrapped.get_base_layer())
    with torch.no_grad():
        merged = fast(ids).last_hidden_state
    assert_close(merged, adapted, 2e-5, "merged against adapted")


def test_pickled_model_follows_later_weight_updates(monkeypatch):
    """A pickle round trip (multiprocessing, joblib) must not leave the fused QKV storage's blocks
    apart from the weight the GEMM reads: updates after unpickling are seen."""
    import pickle

    from fastbert import modeling_bert

    monkeypatch.setattr(modeling_bert, "_cpu_inference", lambda x, tensors: False)  # the CUDA path
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    mask = torch.ones_like(ids)
    _compare(fast, hf, ids, mask)  # makes the storage
    fast = pickle.loads(pickle.dumps(fast))
    with torch.no_grad():
        for model in (fast, hf):
            model.encoder.layer[0].attention.self.key.weight.mul_(1.5)
    _compare(fast, hf, ids, mask)


def test_fused_qkv_storage_is_dropped_by_conversions(monkeypatch):
    """Every conversion (even one that changes nothing) drops the fused storage, so that the converted
    weights get storage of their dtype and device and the old one is freed (a CUDA-graph runner keeps
    what its graphs read)."""
    from fastbert import modeling_bert

    monkeypatch.setattr(modeling_bert, "_cpu_inference", lambda x, tensors: False)  # the CUDA path
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    _compare(fast, hf, ids, torch.ones_like(ids))
    attentions = [layer.attention.self for layer in fast.encoder.layer]
    assert all(a._qkv_fused is not None for a in attentions)
    fast.to("cpu")
    assert all(a._qkv_fused is None for a in attentions)


def test_fused_qkv_storage_follows_a_dtype_change_that_bypasses_conversions(monkeypatch):
    """``p.data = p.data.double()`` (as ``load_state_dict(assign=True)`` with tensors of another dtype)
    changes the weights' dtype without ``_apply``: the fused storage is made again in that dtype, not
    reused in the old one (a silent cast, then a matmul of mixed dtypes)."""
    from fastbert import modeling_bert

    monkeypatch.setattr(modeling_bert, "_cpu_inference", lambda x, tensors: False)  # the CUDA path
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    mask = torch.ones_like(ids)
    _compare(fast, hf, ids, mask)  # makes fp32 storage
    for model in (fast, hf):
        for parameter in model.parameters():
            parameter.data = parameter.data.double()
    ours, _ = _compare(fast, hf, ids, mask)
    assert ours.last_hidden_state.dtype == torch.float64
    assert all(layer.attention.self._qkv_fused.weight.dtype == torch.float64 for layer in fast.encoder.layer)


def test_pruned_or_hooked_qkv_run_unfused_and_equal_transformers():
    """Pruning keeps ``weight`` as an attribute that a forward pre-hook recomputes, and a forward hook
    changes the module's output: such query / key / value modules run as modules (unfused), as in
    transformers, even after an inference call fused their weights."""
    from torch.nn.utils import prune

    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    mask = torch.ones_like(ids)
    _compare(fast, hf, ids, mask)  # every layer's QKV fused
    for model in (fast, hf):
        prune.l1_unstructured(model.encoder.layer[0].attention.self.query, "weight", 0.3)
        model.encoder.layer[1].attention.self.value.register_forward_hook(lambda module, args, out: 2 * out)
    _compare(fast, hf, ids, mask)


def test_hooks_and_pruning_on_the_dense_layers_behave_as_in_transformers():
    """A forward hook on a dense layer fires with that layer's output (bias included) and may change
    it; a pruned dense layer uses its pruned weight, also after the pruned weight changes."""
    from torch.nn.utils import prune

    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    mask = make_mask("right", 2, 8)
    seen = {}
    for name, model in (("fast", fast), ("hf", hf)):
        layer = model.encoder.layer[0]
        layer.attention.output.dense.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, out))
        layer.intermediate.dense.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
        layer.output.dense.register_forward_hook(lambda m, args, out: out + 0.25)
        prune.l1_unstructured(model.encoder.layer[1].output.dense, "weight", 0.5)
    _compare(fast, hf, ids, mask)
    keep = mask.bool()
    # The hooked layer saw the same output in both (packed rows in fastbert, padded in transformers).
    assert_close(seen["fast"], seen["hf"][keep], FP32_MODEL_RANDOM, "hooked dense output")
    with torch.no_grad():
        for model in (fast, hf):
            model.encoder.layer[1].output.dense.weight_orig.mul_(1.5)
    _compare(fast, hf, ids, mask)


def test_hooks_on_embeddings_and_layer_norms_behave_as_in_transformers():
    """Hooks on the embedding tables and on every LayerNorm fire and may change outputs: those modules
    then run as modules (the fused embeddings and bias + residual + LayerNorm ops would skip them)."""
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    mask = make_mask("left", 2, 8)
    calls = {"fast": 0, "hf": 0}

    def count(name):
        def hook(module, args, out):
            calls[name] += 1
        return hook

    for name, model in (("fast", fast), ("hf", hf)):
        model.embeddings.position_embeddings.register_forward_hook(lambda m, args, out: 0.5 * out)
        model.embeddings.LayerNorm.register_forward_hook(count(name))
        model.encoder.layer[0].attention.output.LayerNorm.register_forward_hook(lambda m, args, out: out - 0.1)
        model.encoder.layer[1].output.LayerNorm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    _compare(fast, hf, ids, mask)
    assert calls == {"fast": 1, "hf": 1}


def test_inference_call_then_backward_through_frozen_weights():
    """An inference call (a CUDA-graph runner's warm-up, say) before a call with autograd on, through
    frozen weights to the input embeddings: backward runs, and its input gradient equals transformers'."""
    fast, hf = model_pair(make_config())
    for model in (fast, hf):
        model.requires_grad_(False)
    ids, _ = random_inputs(fast.config, 2, 8)
    with torch.inference_mode():
        fast(ids)
    grads = []
    for model in (fast, hf):
        embeds = model.embeddings.word_embeddings(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).last_hidden_state.square().sum().backward()
        grads.append(embeds.grad)
    assert_close(grads[0], grads[1], 1e-4, "input-embedding gradients")


def test_two_forwards_through_frozen_weights_then_their_backwards():
    """With autograd on, the fused QKV weight is a fresh concatenation at each call (never the storage
    a later call overwrites), so two forwards before their backwards work (a contrastive loss, prompt
    tuning on a frozen encoder)."""
    fast, hf = model_pair(make_config())
    ids, _ = random_inputs(fast.config, 2, 8)
    grads = []
    for model in (fast, hf):
        model.requires_grad_(False)
        first, second = (model.embeddings.word_embeddings(ids).detach().requires_grad_() for _ in range(2))
        loss = model(inputs_embeds=first).last_hidden_state.square().sum() + \
            model(inputs_embeds=second * 0.5).last_hidden_state.square().sum()
        loss.backward()
        grads.append((first.grad, second.grad))
    assert all(p.grad is None for p in fast.parameters())
    assert_close(grads[0][0], grads[1][0], 1e-4, "first input's gradients")
    assert_close(grads[0][1], grads[1][1], 1e-4, "second input's gradients")


def test_model_built_under_inference_mode_follows_in_place_updates():
    # Weights made under torch.inference_mode are inference tensors (no version counter): an in-place
    # update there must still be seen.
    with torch.inference_mode():
        fast, hf = model_pair(make_config())
        ids, _ = random_inputs(fast.config, 2, 8)
        mask = make_mask("right", 2, 8)
        assert fast.encoder.layer[0].attention.self.key.weight.is_inference()
        _compare(fast, hf, ids, mask)
        for model in (fast, hf):
            model.encoder.layer[0].attention.self.key.weight.mul_(1.5)
            model.encoder.layer[1].attention.self.value.bias.add_(0.3)
        _compare(fast, hf, ids, mask)


def test_lora_wrapped_query_value_equal_transformers():
    peft = pytest.importorskip("peft")
    fast, hf = model_pair(make_config())
    lora = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    torch.manual_seed(5)
    hf_lora = peft.get_peft_model(hf, peft.LoraConfig(**lora))
    torch.manual_seed(5)
    fast_lora = peft.get_peft_model(fast, peft.LoraConfig(**lora))
    fast_lora.load_state_dict(hf_lora.state_dict())
    assert type(fast_lora.base_model.model.encoder.layer[0].attention.self.query) is not torch.nn.Linear
    ids, _ = random_inputs(fast.config, 2, 9)
    mask = make_mask("right", 2, 9)
    keep = mask.bool()
    with torch.no_grad():
        ours = fast_lora(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = hf_lora(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(ours[keep], theirs[keep], FP32_MODEL_RANDOM, "LoRA")
    with torch.no_grad(), hf_lora.disable_adapter():
        no_adapter = hf_lora(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_abs_diff(no_adapter[keep], theirs[keep]) > 1e-3, "the adapter must change the output"


@pytest.mark.parametrize("device", DEVICES)
def test_packed_input_equals_separate_sequences(device):
    """transformers' DataCollatorWithFlattening form: one row, position_ids restarting at 0."""
    fast, hf = model_pair(make_config(), device=device)
    lengths = [5, 1, 7, 3]
    seqs = [torch.randint(0, fast.config.vocab_size, (n,)).to(device) for n in lengths]
    collated = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in seqs])
    collated = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
    flat, positions = collated["input_ids"], collated["position_ids"]
    with torch.no_grad():
        by_positions = fast(flat, position_ids=positions).last_hidden_state
        by_offsets = fast(flat, position_ids=positions, cu_seq_lens_q=collated["cu_seq_lens_q"],
                          max_length_q=collated["max_length_q"]).last_hidden_state
        start = 0
        for s in seqs:
            expected = hf(s[None]).last_hidden_state[0]
            assert_close(by_positions[0, start:start + len(s)], expected, FP32_MODEL_RANDOM, "packed")
            assert_close(by_offsets[0, start:start + len(s)], expected, FP32_MODEL_RANDOM, "packed")
            start += len(s)
        # Without position_ids, positions are the row's columns, cu_seq_lens_q or not, as transformers
        # counts them (its flash-attention path then attends within each sequence, as here).
        by_columns = fast(flat, cu_seq_lens_q=collated["cu_seq_lens_q"]).last_hidden_state
        start = 0
        for s in seqs:
            columns = torch.arange(start, start + len(s), device=device)[None]
            expected = hf(s[None], position_ids=columns).last_hidden_state[0]
            assert_close(by_columns[0, start:start + len(s)], expected, FP32_MODEL_RANDOM, "packed, column positions")
            start += len(s)
    with pytest.raises(ValueError, match="max_length_q=2 is shorter"):
        fast(flat, position_ids=positions, cu_seq_lens_q=collated["cu_seq_lens_q"], max_length_q=2)
    long_row = torch.randint(0, fast.config.vocab_size, (1, fast.config.max_position_embeddings + 1), device=device)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings .* restart at position 0 only with"):
        fast(long_row, cu_seq_lens_q=torch.tensor([0, 10, long_row.shape[1]], device=device))
    with pytest.raises(ValueError, match="must rise from 0"):
        fast(flat, cu_seq_lens_q=torch.tensor([0, 5, 4, 16], device=device))


@pytest.mark.parametrize("positions", [[3, 2, 1, 0, 1, 2, 3, 4], [1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 2, 3, 4]],
                         ids=["decreasing", "not-from-0", "a-skip"])
def test_positions_with_a_later_0_that_are_not_packed_form_are_one_row(positions):
    """Only DataCollatorWithFlattening's form (from 0, each step +1 or back to 0) is read as packed
    sequences; other custom positions with a 0 in them are one ordinary row, as transformers' eager and
    SDPA attention compute it (the whole row attends to itself)."""
    fast, hf = model_pair(make_config())
    ids = torch.randint(0, fast.config.vocab_size, (1, len(positions)))
    position_ids = torch.tensor([positions])
    with torch.no_grad():
        got = fast(ids, position_ids=position_ids).last_hidden_state
        want = hf(ids, position_ids=position_ids).last_hidden_state
    assert_close(got, want, FP32_MODEL_RANDOM, f"positions {positions}")


@pytest.mark.parametrize("form", ["input_ids", "inputs_embeds"])
def test_empty_batch_gives_empty_outputs(form):
    fast, _ = model_pair(make_config())
    hidden, seqlen = fast.config.hidden_size, 7
    given = torch.zeros(0, seqlen, dtype=torch.long) if form == "input_ids" else torch.zeros(0, seqlen, hidden)
    with torch.no_grad():
        out = fast(**{form: given})
    assert out.last_hidden_state.shape == (0, seqlen, hidden)
    assert out.pooler_output.shape == (0, hidden)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_boundary_validates_and_unpads_with_one_sync():
    """Every host sync stalls the launch queue: validation + unpadding of a padded batch take one."""
    from fastbert.validation import check_inputs

    config = make_config()
    ids, types = (t.cuda() for t in random_inputs(config, 4, 12))
    mask = make_mask("holes", 4, 12).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as caught:
            check_inputs(config, ids, mask, types, None, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1


def test_gradient_checkpointing_recomputes_layers_with_equal_gradients():
    """``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` in transformers 5.17;
    what ``Trainer(gradient_checkpointing=True)`` calls) makes each layer run again in backward
    instead of keeping its activations; every gradient equals those without it and transformers'."""
    runs = []
    results = []
    for checkpointing in (False, True):
        fast, hf = model_pair(make_config())
        for model in (fast, hf):
            model.train()  # dropout probabilities are 0 in these configs
            if checkpointing:  # renamed after transformers 5.17 (5.24 warns at the old name)
                getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        calls = []
        fast.encoder.layer[0].attention.register_forward_hook(lambda module, args, out: calls.append(1))
        ids, types = random_inputs(fast.config, 2, 8)
        mask = make_mask("right", 2, 8)
        grads = []
        for model in (fast, hf):
            out = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            (out * mask[..., None]).square().sum().backward()  # real tokens only (padding differs)
            grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        runs.append(len(calls))
        results.append(grads)
    assert runs == [1, 2]  # checkpointed: the layer ran again in backward
    for grads in results:
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert_close(grads[0][name], grads[1][name], 1e-4, name)
    for name in results[0][0]:
        assert_close(results[1][0][name], results[0][0][name], 1e-5, f"{name} with against without checkpointing")


@pytest.mark.parametrize("extra", ["output_hidden_states", "output_attentions"])
def test_first_token_only_with_hidden_states_or_attentions(extra):
    """first_token_only with hidden states or attentions asked for: the last layer computes every row
    (its hidden state is returned whole), the first tokens are still the full call's, and the
    returned tuples equal the full call's."""
    fast, _ = model_pair(make_config())
    ids, types = random_inputs(fast.config, 3, 9)
    mask = make_mask("holes", 3, 9)
    with torch.no_grad():
        full = fast(ids, attention_mask=mask, token_type_ids=types, **{extra: True})
        first = fast(ids, attention_mask=mask, token_type_ids=types, first_token_only=True, **{extra: True})
    assert first.last_hidden_state.shape == (3, 1, fast.config.hidden_size)
    assert_close(first.last_hidden_state[:, 0], full.last_hidden_state[:, 0], 1e-5, "first tokens")
    assert_close(first.pooler_output, full.pooler_output, 1e-5, "pooler")
    got, want = (first.hidden_states, full.hidden_states) if extra == "output_hidden_states" else \
        (first.attentions, full.attentions)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape
        assert_close(g, w, 1e-5, f"{extra}[{i}]")


def test_config_output_attentions_returns_attentions():
    """config.output_attentions = True (no keyword) returns the attentions, as transformers does."""
    fast, hf = model_pair(make_config())
    fast.config.output_attentions = hf.config.output_attentions = True
    ids, types = random_inputs(fast.config, 2, 7)
    with torch.no_grad():
        got, want = fast(ids, token_type_ids=types), hf(ids, token_type_ids=types)
    assert got.attentions is not None and len(got.attentions) == len(want.attentions) == fast.config.num_hidden_layers
    for g, w in zip(got.attentions, want.attentions):
        assert_close(g, w, FP32_MODEL_RANDOM, "attentions")
