"""fastbert.optimize swaps the encoder in place, really, and the numbers stay the same."""

import pytest
import torch
import transformers

import fastbert
from fastbert.optimize import optimize
from tests.helpers import DEVICES, FP32_MODEL_CHECKPOINT, FP32_MODEL_RANDOM, assert_close, minilm_path
from tests.model_utils import make_config, randomize_, random_inputs


def test_sentence_transformer_swap_is_real_and_equal():
    st_module = pytest.importorskip("sentence_transformers")
    from tests.test_checkpoint import SENTENCES

    model = st_module.SentenceTransformer(minilm_path(), device="cpu")
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[:40]
    stock = model.encode(lines, convert_to_tensor=True)
    weight = model[0].auto_model.embeddings.word_embeddings.weight
    assert optimize(model) is model
    encoder = model[0].auto_model  # sentence-transformers 6: a read-only view of model[0].model
    assert isinstance(encoder, fastbert.BertModel), type(encoder)
    assert encoder.embeddings.word_embeddings.weight is weight, "weights are shared, not copied"
    assert_close(model.encode(lines, convert_to_tensor=True), stock, FP32_MODEL_CHECKPOINT, "embeddings")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForTokenClassification",
                                  "BertForMaskedLM", "BertForQuestionAnswering", "BertForPreTraining"])
def test_transformers_heads_swap_in_place(head, device):
    config = make_config()
    config.num_labels = 2  # question answering reads exactly two (start, end)
    model = randomize_(getattr(transformers, head)(config)).to(device).eval()
    ids, types = random_inputs(config, 2, 9, device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    params = {id(p) for p in model.parameters()}
    assert optimize(model) is model
    assert isinstance(model.bert, fastbert.BertModel)
    assert {id(p) for p in model.parameters()} == params
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    for key in before.keys():
        assert_close(after[key], before[key], FP32_MODEL_RANDOM, key)


def test_masked_lm_keeps_tied_weights():
    model = transformers.BertForMaskedLM(make_config())
    optimize(model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_bare_bert_model_returns_fastbert_sharing_weights():
    hf = randomize_(transformers.BertModel(make_config())).eval()
    fast = optimize(hf)
    assert isinstance(fast, fastbert.BertModel)
    assert fast.encoder.layer[0].attention.self.query.weight is hf.encoder.layer[0].attention.self.query.weight
    ids, types = random_inputs(hf.config, 2, 7)
    with torch.no_grad():
        assert_close(fast(ids, token_type_ids=types).last_hidden_state,
                     hf(ids, token_type_ids=types).last_hidden_state, FP32_MODEL_RANDOM)


@pytest.mark.parametrize("device", DEVICES)
def test_training_through_optimized_head(device):
    """Fine-tuning a classifier after optimize(): the loss equals transformers', and a step moves the
    encoder's weights (on a GPU: the Triton forward and the reference's backward)."""
    config = make_config()
    reference = randomize_(transformers.BertForSequenceClassification(config)).to(device).train()
    model = randomize_(transformers.BertForSequenceClassification(config)).to(device).train()
    optimize(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, _ = random_inputs(config, 4, 6, device=device)
    labels = torch.tensor([0, 1, 0, 1], device=device)
    loss = model(input_ids=ids, labels=labels).loss
    assert_close(loss, reference(input_ids=ids, labels=labels).loss, FP32_MODEL_RANDOM, "loss")
    loss.backward()
    before = model.bert.encoder.layer[0].attention.self.query.weight.clone()
    optimizer.step()
    assert not torch.equal(before, model.bert.encoder.layer[0].attention.self.query.weight)


def test_nothing_to_swap_is_an_error():
    with pytest.raises(ValueError, match="found no transformers BertModel"):
        optimize(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForMultipleChoice",
                                  "BertForNextSentencePrediction"])
def test_pooled_heads_keep_their_encoder_whole_unless_asked(head):
    """optimize() leaves the encoder of a head that reads only the pooled output as transformers has it:
    ``head.bert(...)`` returns every row. Setting ``head.bert.first_token_only = True`` (the opt-in) gives
    the head the same output with the last layer computing only the first tokens."""
    config = make_config()
    model = randomize_(getattr(transformers, head)(config)).eval()
    ids, types = random_inputs(config, 2, 9)
    batch = ids[:, None].repeat(1, 3, 1) if head == "BertForMultipleChoice" else ids
    with torch.no_grad():
        want = model(input_ids=batch).logits
        want_bert = model.bert(ids, token_type_ids=types).last_hidden_state
    optimize(model)
    with torch.no_grad():
        got_bert = model.bert(ids, token_type_ids=types).last_hidden_state
        got = model(input_ids=batch).logits
        model.bert.first_token_only = True
        first_only = model(input_ids=batch).logits
        assert model.bert(ids).last_hidden_state.shape == (2, 1, config.hidden_size)
    assert got_bert.shape == want_bert.shape
    assert_close(got_bert, want_bert, FP32_MODEL_RANDOM, "encoder called on its own")
    assert_close(got, want, FP32_MODEL_RANDOM, "head")
    assert_close(first_only, want, FP32_MODEL_RANDOM, "head, first tokens only")


def test_subclasses_with_their_own_forward_and_other_configs_are_left_in_place():
    """A BertModel subclass with its own forward keeps it (swapping would drop it), and a BertModel whose
    config is not BERT's (DPR) is refused by name; both left in place with a warning, or an error when
    nothing could be swapped."""

    class Scaled(transformers.BertModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.last_hidden_state = out.last_hidden_state * 2
            return out

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled = Scaled(make_config())
            self.plain = transformers.BertModel(make_config())

    holder = Holder()
    with _logged("overrides BertModel.forward"):
        optimize(holder)
    assert type(holder.scaled) is Scaled and isinstance(holder.plain, fastbert.BertModel)
    with pytest.raises(ValueError, match="overrides BertModel.forward"):
        optimize(Scaled(make_config()))
    dpr = transformers.DPRQuestionEncoder(transformers.DPRConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"question_encoder.bert_model \(its config is of model_type 'dpr'"):
        optimize(dpr)


def test_configs_fastbert_refuses_are_left_in_place_before_anything_is_swapped():
    """A BERT encoder-decoder (the decoder a BertModel with is_decoder / add_cross_attention) and a head
    whose activation fastbert lacks: the BertModels fastbert cannot run are left in place with the
    reason, the others swapped; nothing is left half converted by an error raised midway."""
    encoder = transformers.BertConfig(**make_config().to_dict())
    decoder = transformers.BertConfig(**{**make_config().to_dict(), "is_decoder": True, "add_cross_attention": True})
    pair = transformers.EncoderDecoderModel(
        config=transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    with _logged("is_decoder=True"):
        optimize(pair)
    assert isinstance(pair.encoder, fastbert.BertModel) and type(pair.decoder.bert) is transformers.BertModel
    silu = transformers.BertForSequenceClassification(transformers.BertConfig(
        **{**make_config().to_dict(), "hidden_act": "silu"}))
    with pytest.raises(ValueError, match=r"bert \(hidden_act='silu' is not supported"):
        optimize(silu)
    assert type(silu.bert) is transformers.BertModel


class _Doubled(transformers.models.bert.modeling_bert.BertSelfOutput):
    def forward(self, hidden_states, input_tensor):
        return super().forward(hidden_states, input_tensor) * 2


class _Halved(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return (out[0] / 2, *out[1:])


def _patch_intermediate(head, monkeypatch):
    forward = transformers.models.bert.modeling_bert.BertIntermediate.forward
    monkeypatch.setattr(transformers.models.bert.modeling_bert.BertIntermediate, "forward",
                        lambda self, hidden_states: forward(self, hidden_states) * 0)


def _replace_feed_forward_chunk(head, monkeypatch):
    layer = head.bert.encoder.layer[0]
    layer.feed_forward_chunk = lambda attention_output: attention_output


MODIFIED_TREES = {
    "another activation module": (lambda head, mp: setattr(head.bert.encoder.layer[1].intermediate,
                                                            "intermediate_act_fn", torch.nn.SiLU()),
                                  "encoder.layer.1.intermediate.intermediate_act_fn is a SiLU, not transformers' "
                                  "GELUActivation"),
    "a container subclass": (lambda head, mp: setattr(head.bert.encoder.layer[0].attention, "output",
                                                      _Doubled(head.config)),
                             "encoder.layer.0.attention.output is a _Doubled, not transformers' BertSelfOutput"),
    "a wrapped container": (lambda head, mp: setattr(head.bert.encoder.layer[1].attention, "self",
                                                     _Halved(head.bert.encoder.layer[1].attention.self)),
                            "encoder.layer.1.attention.self is a _Halved"),
    "a layer removed": (lambda head, mp: setattr(head.bert.encoder, "layer", head.bert.encoder.layer[:1]),
                        r"it has no encoder.layer.1 \(config.num_hidden_layers = 2\)"),
    "a layer added": (lambda head, mp: head.bert.encoder.layer.append(
                          transformers.models.bert.modeling_bert.BertLayer(head.config)),
                      r"encoder.layer.2 \(BertLayer\) is not part of a BertModel of its config"),
    "a class patched": (_patch_intermediate, "BertIntermediate.forward is not transformers' own"),
    "the head count changed in the config": (
        lambda head, mp: setattr(head.config, "num_attention_heads", 2),
        r"encoder.layer.0.attention.self.num_attention_heads is 3 where its config now makes it 2 \(the config was "
        r"changed after the model was built\)"),
    "a method replaced on an instance": (_replace_feed_forward_chunk,
                                         "encoder.layer.0.feed_forward_chunk is replaced on the instance"),
}


@pytest.mark.parametrize("change", MODIFIED_TREES)
def test_encoders_changed_by_hand_are_left_in_place(change, monkeypatch):
    """A transformers BertModel changed after construction in a way fastbert's own containers would
    not compute (they are built from the config; only leaf modules are shared): left in place, the
    change named, its outputs unchanged, where a swap gave other numbers (0.36 to 3.7 off) or an
    AttributeError naming no reason."""
    torch.manual_seed(0)
    head = transformers.BertForSequenceClassification(make_config()).eval()
    modify, reason = MODIFIED_TREES[change]
    modify(head, monkeypatch)
    ids = torch.randint(0, head.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = head(ids).logits
    encoder = head.bert
    with pytest.raises(ValueError, match=f"any BertModel in BertForSequenceClassification: bert \\(.*{reason}"):
        optimize(head)
    assert head.bert is encoder and type(encoder) is transformers.BertModel
    with torch.no_grad():
        assert torch.equal(head(ids).logits, want)


def test_an_encoder_held_in_two_places_stays_one():
    """A bi-encoder whose query and document sides hold one BertModel: one fastbert model takes both
    places (its flags and hooks reach both), as the one transformers model did."""

    class Twin(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.query, self.document = encoder, encoder
            self.both = torch.nn.ModuleList([encoder])

    torch.manual_seed(0)
    twin = Twin(transformers.BertModel(make_config()).eval())
    ids = torch.randint(0, twin.query.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = twin.query(ids).last_hidden_state
    optimize(twin)
    assert isinstance(twin.query, fastbert.BertModel) and twin.query is twin.document is twin.both[0]
    with torch.no_grad():
        assert_close(twin.document(ids).last_hidden_state, want, FP32_MODEL_RANDOM, "the shared encoder")


def test_unchanged_trees_and_wrapped_leaves_still_swap():
    """What fastbert runs as transformers does: a PEFT-style wrapper around a shared Linear (with
    modules of its own below it), a replaced pooler activation (the pooler calls it), and transformers'
    own output-capturing hooks (left by a call with output_hidden_states, inert otherwise: no warning)."""

    class Scaled(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        def forward(self, x):
            return self.base_layer(x) * 0.5

    torch.manual_seed(0)
    hf = transformers.BertModel(make_config()).eval()
    hf.encoder.layer[0].attention.self.value = Scaled(hf.encoder.layer[0].attention.self.value)
    hf.pooler.activation = torch.nn.Identity()
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = hf(ids, output_hidden_states=True)
    assert any(m._forward_hooks for m in hf.modules()), "transformers left its output-capturing hooks"
    with _logged(None):
        fast = optimize(hf)
    with torch.no_grad():
        got = fast(ids, output_hidden_states=True)
    assert_close(got.last_hidden_state, want.last_hidden_state, FP32_MODEL_RANDOM, "last_hidden_state")
    assert_close(got.pooler_output, want.pooler_output, FP32_MODEL_RANDOM, "pooler_output")


def test_training_flags_kept_and_dropped_hooks_named():
    """Each module keeps its own training flag (one dropout put in eval mode stays so), and hooks on
    transformers' container modules, which fastbert replaces, are named in a warning."""
    hf = transformers.BertModel(make_config()).train()
    hf.encoder.layer[0].attention.self.dropout.eval()
    hf.encoder.layer[1].register_forward_hook(lambda module, args, out: out)
    with _logged("hooks (or a replaced forward) on encoder.layer.1 are not carried over"):
        fast = optimize(hf)
    assert fast.training and fast.encoder.training and fast.encoder.layer[1].training
    assert not fast.encoder.layer[0].attention.self.dropout.training
    assert hf.training and not hf.encoder.layer[0].attention.self.dropout.training


def test_gradient_checkpointing_enabled_before_the_swap_is_kept():
    """``gradient_checkpointing_enable()`` and then ``optimize``: each fastbert layer keeps its flag and
    checkpointing function, so a training step recomputes each layer (its FFN runs twice)."""
    head = transformers.BertForSequenceClassification(make_config()).train()
    head.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimize(head)
    assert all(layer.gradient_checkpointing for layer in head.bert.encoder.layer)
    calls = []
    head.bert.encoder.layer[0].intermediate.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, head.config.vocab_size, (2, 7))
    head(ids, labels=torch.tensor([0, 1])).loss.backward()
    assert len(calls) == 2, calls  # the forward, then its recomputation in backward


def _logged(text):
    """A context manager asserting that fastbert.optimize's logger emitted ``text``, or nothing where
    ``text`` is None (transformers' loggers do not propagate to caplog, so the handler is attached
    here)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def check():
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("fastbert.optimize")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
        messages = [record.getMessage() for record in records]
        assert (not messages) if text is None else any(text in message for message in messages), messages

    return check()


def test_eval_mode_model_stays_in_eval_mode_and_a_second_optimize_is_a_no_op():
    """optimize of a model in eval mode gives fastbert containers in eval mode too (new modules start
    in training mode: a graph runner would refuse them, dropout would run); optimizing again returns
    the model as it is."""
    head = transformers.BertForSequenceClassification(make_config()).eval()
    assert optimize(head) is head and isinstance(head.bert, fastbert.BertModel)
    assert not any(m.training for m in head.modules())
    encoder = head.bert
    assert optimize(head) is head and head.bert is encoder
