"""Bad input: a Python exception that names the problem, never a crash or a silently wrong answer."""

import pytest
import torch

from fastbert.ops import backend
from tests.model_utils import make_config, model_pair


@pytest.fixture(scope="module")
def model():
    return model_pair(make_config(vocab=100, max_positions=16))[0]


def ids(*shape, high=100):
    return torch.randint(0, high, shape)


@pytest.mark.parametrize("value, where", [(100, "input_ids\\[1, 3\\] = 100"), (-1, "input_ids\\[1, 3\\] = -1")])
def test_id_outside_vocabulary(model, value, where):
    x = ids(2, 5)
    x[1, 3] = value
    with pytest.raises(ValueError, match=where + r" is out of range: the vocabulary is \[0, 100\)"):
        model(x)


def test_out_of_range_id_under_padding_is_ignored(model):
    """Padding is never computed on, so its ids are not looked up (transformers would crash)."""
    x = ids(2, 5)
    x[1, 4] = 10_000
    mask = torch.ones_like(x)
    mask[1, 4] = 0
    assert torch.isfinite(model(x, attention_mask=mask).last_hidden_state).all()


def test_sequence_longer_than_max_positions(model):
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings 16"):
        model(ids(1, 17))


def test_position_id_out_of_range(model):
    with pytest.raises(ValueError, match=r"position_ids\[0, 2\] = 16 is out of range"):
        model(ids(1, 4), position_ids=torch.tensor([[0, 1, 16, 3]]))


def test_token_type_out_of_range(model):
    with pytest.raises(ValueError, match=r"token_type_ids\[0, 1\] = 2 is out of range: type_vocab_size is \[0, 2\)"):
        model(ids(1, 4), token_type_ids=torch.tensor([[0, 2, 0, 1]]))


def test_mask_shape_mismatch(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), but the input is \(2, 5\)"):
        model(ids(2, 5), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("mask", [[[1, 2, 0]], [[1, -1, 1]], [[1.0, 0.5, 0.0]], [[1.0, 2.0, 1.0]]],
                         ids=["int 2", "int -1", "float 0.5", "float 2"])
def test_mask_values_must_be_zero_or_one(model, mask):
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(ids(1, 3), attention_mask=torch.tensor(mask))


def test_float_and_bool_masks_of_zeros_and_ones_are_taken(model):
    x = ids(2, 5)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    expected = model(x, attention_mask=mask.long()).last_hidden_state
    for same in (mask, mask.bool()):
        assert torch.equal(model(x, attention_mask=same).last_hidden_state, expected)


@pytest.mark.parametrize("name", ["input_ids", "token_type_ids"])
def test_out_of_range_at_a_real_token_of_a_masked_batch(model, name):
    """With a mask, the range checks look at real tokens only: a bad value at a padded position is
    ignored, one at a real position is named (a token type row broadcast over the batch too)."""
    x, types = ids(3, 6), torch.zeros(1, 6, dtype=torch.long)
    mask = torch.ones_like(x)
    mask[2, 4:] = 0
    bad = x if name == "input_ids" else types
    bad[-1, 5] = -7  # padding in row 2; for the broadcast token types, row 0 and 1 are real there
    kwargs = {"attention_mask": mask, "token_type_ids": types}
    if name == "input_ids":
        assert torch.isfinite(model(x, **kwargs).last_hidden_state).all()
        x[2, 1] = 100
        match = r"input_ids\[2, 1\] = 100 is out of range"
    else:
        match = r"token_type_ids\[0, 5\] = -7 is out of range"
    with pytest.raises(ValueError, match=match):
        model(x, **kwargs)


def test_float_ids(model):
    with pytest.raises(TypeError, match=r"input_ids must hold integer ids \(int64 or int32\), got dtype torch.float32"):
        model(torch.ones(1, 3))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8], ids=str)
@pytest.mark.parametrize("name", ["input_ids", "token_type_ids", "position_ids"])
def test_narrow_integer_ids_are_named(model, name, dtype):
    """Integer dtypes the lookups do not take fail at the boundary, naming the tensor (not inside
    the embedding, as "argument #1 'indices'")."""
    x = ids(2, 5)
    kwargs = {"input_ids": x, name: (x % 2).to(dtype)} if name != "input_ids" else {"input_ids": x.to(dtype)}
    with pytest.raises(TypeError, match=f"{name} must hold integer ids \\(int64 or int32\\), got dtype {dtype}"):
        model(**kwargs)


def test_complex_mask_is_refused_by_name(model):
    with pytest.raises(TypeError, match="attention_mask must be a 0/1 mask .* got dtype torch.complex64"):
        model(ids(2, 5), attention_mask=torch.ones(2, 5, dtype=torch.complex64))


def test_torch_jit_trace_is_refused(model):
    """A trace would freeze the unpadding decided from the traced mask: other masks silently wrong."""
    x, mask = ids(2, 5), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="torch.jit.trace"):
        torch.jit.trace(model, (x, mask), strict=False)


def test_ids_are_checked_against_the_table_in_use():
    """A word-embedding table set with set_input_embeddings may differ from config.vocab_size: its ids
    are valid (as in transformers), and ids past it are refused by name (never read past the table)."""
    fast, hf = model_pair(make_config(vocab=100, max_positions=16))
    for module in (fast, hf):
        table = torch.nn.Embedding(150, fast.config.hidden_size)
        torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(0))
        module.set_input_embeddings(table)
    x = ids(2, 5)
    x[1, 2] = 120
    fast.eval(), hf.eval()
    with torch.no_grad():
        got, want = fast(x).last_hidden_state, hf(x).last_hidden_state
    assert (got - want).abs().max() <= 2e-5
    fast.set_input_embeddings(torch.nn.Embedding(50, fast.config.hidden_size))
    x = x % 50
    x[1, 2] = 60
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 60 is out of range: the vocabulary is \[0, 50\)"):
        fast(x)


def test_neither_ids_nor_embeddings(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids(1, 3), inputs_embeds=torch.randn(1, 3, 144))


def test_wrong_rank_and_embedding_width(model):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seqlen\], got shape \(5,\)"):
        model(ids(5))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seqlen, 144\]"):
        model(inputs_embeds=torch.randn(1, 3, 10))


def test_empty_sequences(model):
    """Sequences of no positions, in a batch or an empty one (whose output would have no first column
    for the pooler), by input_ids or inputs_embeds."""
    for given in ({"input_ids": ids(2, 0)}, {"input_ids": ids(0, 0)}, {"inputs_embeds": torch.zeros(0, 0, 144)}):
        with pytest.raises(ValueError, match=r"the input has shape \(\d, 0\): every sequence is empty"):
            model(**given)


def test_unknown_backend(model, monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND='cuda-please' is not one of auto, torch, triton"):
        model(ids(1, 3))
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    assert backend.backend_setting() == "torch"


@pytest.mark.parametrize("name, value", [("input_ids", 100), ("position_ids", 16), ("token_type_ids", -1)])
def test_out_of_range_in_packed_input(model, name, value):
    """Packed input (DataCollatorWithFlattening's form, with cu_seq_lens_q): the same checks, named
    at the input's [row, column]."""
    packed = {"input_ids": ids(1, 9), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]]),
              "token_type_ids": torch.zeros(1, 9, dtype=torch.long)}
    cu_seq_lens_q = torch.tensor([0, 4, 7, 9])
    assert torch.isfinite(model(**packed, cu_seq_lens_q=cu_seq_lens_q, max_length_q=4).last_hidden_state).all()
    packed[name][0, 5] = value
    with pytest.raises(ValueError, match=rf"{name}\[0, 5\] = {value} is out of range"):
        model(**packed, cu_seq_lens_q=cu_seq_lens_q, max_length_q=4)


def test_ids_are_checked_against_the_table_a_wrapper_holds():
    """A wrapper without its own ``weight`` (as PEFT wraps a layer: ``get_base_layer()``) is sized by
    the table it wraps, not by config.vocab_size."""
    from fastbert.validation import table_sizes

    fast, _ = model_pair(make_config(vocab=100, max_positions=16))

    class Wrapper(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_layer(self):
            return self.base

        def forward(self, x):
            return self.base(x)

    fast.embeddings.word_embeddings = Wrapper(torch.nn.Embedding(40, fast.config.hidden_size))
    assert table_sizes(fast.config, fast.embeddings).vocab_size == 40
    x = ids(2, 5, high=40)
    x[0, 1] = 70
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 70 is out of range: the vocabulary is \[0, 40\)"):
        fast(x)


def test_empty_batch_inside_static_forms():
    """The static forms (the padded graph runner's) take an empty batch as the eager model does."""
    from fastbert import validation

    fast, _ = model_pair(make_config(vocab=100, max_positions=16))
    with torch.no_grad(), validation.static_forms():
        out = fast(torch.zeros(0, 8, dtype=torch.long), attention_mask=torch.zeros(0, 8, dtype=torch.long),
                   token_type_ids=torch.zeros(0, 8, dtype=torch.long))
    assert out.last_hidden_state.shape == (0, 8, fast.config.hidden_size)


def test_sequence_of_exactly_max_positions_equals_transformers():
    """A sequence of max_position_embeddings tokens (BERT's 512) is taken and equals transformers; one
    more is refused (test_sequence_longer_than_max_positions)."""
    from tests.helpers import FP32_MODEL_RANDOM, assert_close

    fast, hf = model_pair(make_config(vocab=100, max_positions=16))
    x = ids(2, 16)
    with torch.no_grad():
        assert_close(fast(x).last_hidden_state, hf(x).last_hidden_state, FP32_MODEL_RANDOM, "16 of 16 positions")


PACKED = {"input_ids": torch.arange(9)[None] % 100, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])}


@pytest.mark.parametrize("case, kwargs, error, match", [
    ("padding", {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])}, ValueError,
     r"packed sequences \(cu_seq_lens_q\) take no padding: attention_mask must be all ones"),
    ("batch of 2", {"input_ids": torch.arange(18).reshape(2, 9) % 100,
                    "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * 2)}, ValueError,
     r"input_ids must be \[1, total\], got \(2, 9\)"),
    ("2-D offsets", {"cu_seq_lens_q": torch.tensor([[0, 4, 7, 9]])}, ValueError,
     r"cu_seq_lens_q must be a 1-D integer tensor of offsets \[0, ..., total\], got torch.int64 of shape \(1, 4\)"),
    ("float offsets", {"cu_seq_lens_q": torch.tensor([0.0, 4.0, 7.0, 9.0])}, ValueError,
     "cu_seq_lens_q must be a 1-D integer tensor .* got torch.float32"),
    ("one offset", {"cu_seq_lens_q": torch.tensor([0])}, ValueError,
     r"cu_seq_lens_q must be a 1-D integer tensor .* of shape \(1,\)"),
])
def test_packed_input_that_is_not_packed_form_is_refused(model, case, kwargs, error, match):
    """cu_seq_lens_q describes the sequences of one [1, total] row: with padding in it (which would be
    computed on as real tokens), a batch of several rows, or offsets that are not a 1-D integer
    tensor, the call names the problem."""
    args = {**PACKED, "cu_seq_lens_q": torch.tensor([0, 4, 7, 9]), "max_length_q": 4, **kwargs}
    with pytest.raises(error, match=match):
        model(**args)


def test_out_of_range_is_named_at_the_real_token_when_padding_before_it_is_bad_too(model):
    """The first bad value in row order is at a padded position (never looked up): the error names
    the real token's, after it."""
    x = ids(3, 6)
    mask = torch.ones_like(x)
    mask[0, 3:] = 0
    x[0, 4] = 5000  # padding: ignored
    x[2, 1] = 100
    with pytest.raises(ValueError, match=r"input_ids\[2, 1\] = 100 is out of range"):
        model(x, attention_mask=mask)


def test_token_types_of_one_column_are_refused(model):
    """token_type_ids broadcast over the batch ([1, seqlen]) are taken; one value per row ([batch, 1],
    which transformers would broadcast over the tokens) is named: one type per token is the contract."""
    x = ids(2, 5)
    types = torch.tensor([[0, 1, 1, 0, 1]])
    with torch.no_grad():
        assert torch.equal(model(x, token_type_ids=types).last_hidden_state,
                           model(x, token_type_ids=types.expand(2, 5)).last_hidden_state)
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(2, 1\), but the input is \(2, 5\)"):
        model(x, token_type_ids=torch.tensor([[1], [0]]))


def test_integer_inputs_embeds_are_refused(model):
    with pytest.raises(TypeError, match="inputs_embeds must be a floating-point tensor, got dtype torch.int64"):
        model(inputs_embeds=torch.ones(1, 3, model.config.hidden_size, dtype=torch.long))


@pytest.mark.parametrize("name", ["input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"])
@pytest.mark.parametrize("form", ["list", "numpy"])
def test_inputs_that_are_not_tensors_are_named(model, name, form):
    """A list or a NumPy array where a tensor goes: named, not an AttributeError from inside, nor an
    integer-dtype error that names int64."""
    x = ids(2, 5)
    args = {"input_ids": x, "attention_mask": torch.ones_like(x), "token_type_ids": torch.zeros_like(x),
            "position_ids": torch.arange(5).expand(2, 5)}
    if name == "inputs_embeds":
        del args["input_ids"]
    given = torch.randn(2, 5, model.config.hidden_size) if name == "inputs_embeds" else args[name]
    args[name] = given.tolist() if form == "list" else given.numpy()
    kind = "list" if form == "list" else "ndarray"
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got {kind}"):
        model(**args)


def test_inputs_embeds_wider_than_the_model_are_named():
    """fp64 embeddings into an fp32 model (or fp32 into fp16): named; narrower ones are taken, as
    transformers takes them (the sum promotes to the model's dtype)."""
    model = model_pair(make_config(vocab=100, max_positions=16))[0]
    embeds = torch.randn(2, 5, model.config.hidden_size)
    with pytest.raises(TypeError, match="inputs_embeds of dtype torch.float64 are wider than the model's "
                                        "torch.float32"):
        model(inputs_embeds=embeds.double())
    narrow = model(inputs_embeds=embeds.bfloat16()).last_hidden_state
    assert narrow.dtype == torch.float32
    assert torch.equal(narrow, model(inputs_embeds=embeds.bfloat16().float()).last_hidden_state)
    with pytest.raises(TypeError, match="torch.float32 are wider than the model's torch.float16"):
        model.half()(inputs_embeds=embeds)


def test_default_token_type_without_a_token_type_table_is_named():
    """type_vocab_size 0: the default token type 0 has no row to look up (a GPU kernel would read past
    the empty table); given token types are range-checked as ever."""
    config = make_config(vocab=100, max_positions=16)
    config.type_vocab_size = 0
    model = model_pair(config)[0]
    x = ids(2, 5)
    with pytest.raises(ValueError, match="token_type_ids default to 0, but the token type embedding table has no rows"):
        model(x)
    with pytest.raises(ValueError, match=r"token_type_ids\[0, 0\] = 0 is out of range"):
        model(x, token_type_ids=torch.zeros_like(x))
