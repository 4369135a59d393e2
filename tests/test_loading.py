"""from_pretrained / save_pretrained in both directions, and what loading refuses."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fastbert
from tests.helpers import FP32_MODEL_RANDOM, assert_close
from tests.model_utils import make_config, model_pair, random_inputs


def _same_outputs(a, b, config):
    ids, types = random_inputs(config, 2, 9)
    with torch.no_grad():
        assert_close(a(ids, token_type_ids=types).last_hidden_state,
                     b(ids, token_type_ids=types).last_hidden_state, FP32_MODEL_RANDOM)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_transformers_checkpoint_loads_into_fastbert(tmp_path, safe_serialization):
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    if not safe_serialization:  # transformers 5 may always write safetensors; then make the .bin ourselves
        for f in tmp_path.glob("*.safetensors"):
            torch.save(load_file(f), tmp_path / "pytorch_model.bin")
            f.unlink()
    fast = fastbert.BertModel.from_pretrained(tmp_path).eval()
    assert isinstance(fast, fastbert.BertModel)
    _same_outputs(fast, hf, hf.config)


def test_fastbert_checkpoint_loads_into_transformers(tmp_path):
    fast, hf = model_pair(make_config())
    fast.save_pretrained(tmp_path)
    back = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert type(back) is transformers.BertModel
    _same_outputs(fast, back, fast.config)
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["BertModel"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_pretrained_dtype(tmp_path, dtype):
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path)
    fast = fastbert.BertModel.from_pretrained(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in fast.parameters())


def _edit_checkpoint(path, edit):
    file = next(path.glob("*.safetensors"))
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_keys_are_named(tmp_path):
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: encoder\.layer\.1\.output\.dense\.bias"):
        fastbert.BertModel.from_pretrained(tmp_path)
    fastbert.BertModel.from_pretrained(tmp_path, strict=False)  # transformers' lenient behaviour


def test_unexpected_encoder_keys_are_named(tmp_path):
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"encoder.layer.2.output.dense.bias": torch.zeros(144)}))
    with pytest.raises(ValueError, match=r"not weights of fastbert\.BertModel: encoder\.layer\.2\.output\.dense\.bias"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_unexpected_encoder_keys_of_a_head_checkpoint_are_named(tmp_path):
    """A head's checkpoint names the encoder's weights ``bert.*``: those the model lacks (layers of a
    deeper checkpoint, loaded with fewer layers) are refused by name too, not silently dropped."""
    transformers.BertForSequenceClassification(make_config(layers=3)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not weights of fastbert\.BertModel: bert\.encoder\.layer\.2\."):
        fastbert.BertModel.from_pretrained(tmp_path, num_hidden_layers=2)
    fastbert.BertModel.from_pretrained(tmp_path, num_hidden_layers=2, strict=False)


@pytest.mark.parametrize("head", [False, True])
def test_checkpoints_holding_the_unsaved_buffers_load(tmp_path, head):
    """Some checkpoints hold the embeddings' position_ids and token_type_ids buffers, which the model
    does not save: no weight is left out, so they load as in transformers (token_type_ids was refused)."""
    _, hf = model_pair(make_config())
    prefix = "bert." if head else ""
    (transformers.BertForSequenceClassification(hf.config) if head else hf).save_pretrained(tmp_path)
    buffers = {f"{prefix}embeddings.{name}": getattr(hf.embeddings, name).clone()
               for name in ("position_ids", "token_type_ids")}
    _edit_checkpoint(tmp_path, lambda t: t.update(buffers))
    loaded = fastbert.BertModel.from_pretrained(tmp_path)
    reference = transformers.BertModel.from_pretrained(tmp_path)
    _same_outputs(loaded.eval(), reference.eval(), hf.config)


def test_strict_loads_in_threads_leave_transformers_logging_as_it_was(monkeypatch):
    """Strict loads silence transformers' report by its global level. Two overlapping loads, the first
    in leaving first: the level is restored when the last ends (each restoring the level it saw on
    entry left it at ERROR, the first's silencing)."""
    import threading

    from transformers.utils import logging

    first_inside, second_inside = threading.Event(), threading.Event()

    def load(cls, *args, **kwargs):
        if threading.current_thread() is threads[0]:
            first_inside.set()
            second_inside.wait(5)  # then leaves first
        else:
            second_inside.set()
            threads[0].join(5)
        return None, {}

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(load))
    monkeypatch.setattr(fastbert.modeling_bert, "check_model_type", lambda *args: None)
    monkeypatch.setattr(fastbert.modeling_bert, "check_loading_info", lambda *args: None)
    before = logging.get_verbosity()
    assert before != logging.ERROR
    threads = [threading.Thread(target=fastbert.BertModel.from_pretrained, args=("unused",)) for _ in range(2)]
    threads[0].start()
    assert first_inside.wait(5)
    threads[1].start()
    for t in threads:
        t.join(10)
    assert second_inside.is_set() and logging.get_verbosity() == before


@pytest.mark.parametrize("ignore", [None, False])
def test_weights_of_another_shape_are_named_with_both_shapes(tmp_path, ignore):
    """Also when the caller passes ignore_mismatched_sizes=False: strict raises fastbert's named error
    (transformers' own points to a report strict mode silences)."""
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"encoder.layer.0.output.dense.bias": torch.zeros(7)}))
    kwargs = {} if ignore is None else {"ignore_mismatched_sizes": ignore}
    with pytest.raises(ValueError, match=r"of another shape than the model's: encoder\.layer\.0\.output\.dense\.bias "
                                         r"\(checkpoint \(7,\), model \(144,\)\)"):
        fastbert.BertModel.from_pretrained(tmp_path, **kwargs)


def test_config_given_as_a_path(tmp_path):
    """``config=`` as a path (transformers takes it) is the config checked, not the weights' folder."""
    _, hf = model_pair(make_config())
    weights, config = tmp_path / "weights", tmp_path / "config"
    hf.save_pretrained(weights)
    hf.config.save_pretrained(config)
    (weights / "config.json").unlink()
    _same_outputs(fastbert.BertModel.from_pretrained(weights, config=str(config)).eval(), hf, hf.config)


def test_a_directory_without_config_is_named_and_a_config_without_model_type_loads(tmp_path):
    with pytest.raises(OSError, match="has no config.json"):
        fastbert.BertModel.from_pretrained(tmp_path)
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    del config["model_type"]
    config_file.write_text(json.dumps(config))
    _same_outputs(fastbert.BertModel.from_pretrained(tmp_path).eval(), hf, hf.config)
    with pytest.raises(OSError, match=r"^.* \(subfolder 'nothere'\) has no config.json"):  # not the folder's
        fastbert.BertModel.from_pretrained(tmp_path, subfolder="nothere")


def test_task_head_checkpoint_loads_the_encoder(tmp_path):
    """A BertForMaskedLM checkpoint (bert.* + cls.*) loads as transformers loads it: heads skipped."""
    config = make_config()
    head = transformers.BertForMaskedLM(config).eval()
    head.save_pretrained(tmp_path)
    fast = fastbert.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    _same_outputs(fast, head.bert, config)


def test_full_checkpoint_loads_without_its_pooler(tmp_path):
    """A BertModel checkpoint with its pooler loads into add_pooling_layer=False, as transformers loads
    it: the pooler's weights are skipped, not refused as weights fastbert does not have."""
    _, hf = model_pair(make_config())
    hf.save_pretrained(tmp_path)
    fast = fastbert.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert fast.pooler is None
    _same_outputs(fast, hf, hf.config)


def test_other_model_type_is_refused(tmp_path):
    config = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=37, vocab_size=100)
    transformers.RobertaModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'roberta' model"):
        fastbert.BertModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        fastbert.BertModel(config)


@pytest.mark.parametrize("feature", ["is_decoder", "add_cross_attention", "relative_key"])
def test_decoder_and_relative_positions_are_refused(feature):
    config = make_config()
    if feature == "relative_key":
        config.position_embedding_type = "relative_key"
    else:
        config.is_decoder = True
        setattr(config, feature, True)
    with pytest.raises(NotImplementedError, match=feature if feature != "add_cross_attention" else "is_decoder"):
        fastbert.BertModel(config)


def test_decoder_arguments_as_transformers_takes_them_on_an_encoder():
    """Without is_decoder / add_cross_attention, transformers ignores encoder_hidden_states,
    encoder_attention_mask and use_cache: so does fastbert. A cache (it would shift transformers'
    positions) and causal attention (transformers' SDPA masks future tokens) are refused by name."""
    fast, hf = model_pair(make_config())
    ids, types = random_inputs(fast.config, 2, 5)
    extra = {"encoder_hidden_states": torch.randn(2, 3, 144), "encoder_attention_mask": torch.ones(2, 3),
             "use_cache": True}
    with torch.no_grad():
        ours = fast(ids, token_type_ids=types, **extra).last_hidden_state
        theirs = hf(ids, token_type_ids=types, **extra).last_hidden_state
    assert_close(ours, theirs, FP32_MODEL_RANDOM, "with decoder arguments")
    with pytest.raises(NotImplementedError, match="past_key_values"):
        fast(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(NotImplementedError, match="is_causal=True"):
        fast(ids, is_causal=True)
    config = make_config()
    config.is_causal = True
    with pytest.raises(NotImplementedError, match="is_causal=True"):
        fastbert.BertModel(config)


def test_a_path_transformers_cannot_read_keeps_transformers_error(tmp_path):
    """A folder that does not exist, or a config.json that is not JSON: transformers' own OSError and
    message come through (code catching OSError keeps working)."""
    with pytest.raises(OSError) as error:
        fastbert.BertModel.from_pretrained(tmp_path / "does-not-exist", local_files_only=True)
    assert "has no config.json" not in str(error.value)  # transformers' message, whatever its version's words
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_peft_adapter_folder_loads_its_base_and_adapter(tmp_path):
    """A PEFT adapter's folder (adapter_config.json naming a local base checkpoint, no config.json):
    transformers loads the base model and then the adapter, and so does fastbert (its model-type check
    reads the base's config); the output is the PeftModel's."""
    peft = pytest.importorskip("peft")
    _, hf = model_pair(make_config())
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    hf.save_pretrained(base)
    lora = peft.get_peft_model(transformers.BertModel.from_pretrained(base),
                               peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    lora.save_pretrained(adapter)
    assert not (adapter / "config.json").exists()
    fast = fastbert.BertModel.from_pretrained(adapter).eval()
    ids, types = random_inputs(hf.config, 2, 7)
    with torch.no_grad():
        expected = lora.eval()(ids, token_type_ids=types).last_hidden_state
        assert_close(fast(ids, token_type_ids=types).last_hidden_state, expected, FP32_MODEL_RANDOM, "adapter model")
        assert (expected - hf(ids, token_type_ids=types).last_hidden_state).abs().max() > 1e-3  # the adapter counts
