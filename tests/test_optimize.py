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
