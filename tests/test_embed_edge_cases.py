"""``fastbert.embed`` at its edges: how lines are read, settings only sentence-transformers applies,
do_lower_case, empty input, the model directory and the checkpoint's dtype."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from fastbert.embed import SentenceEmbedder, read_lines
from tests.helpers import minilm_path

st = pytest.importorskip("sentence_transformers")

LINES = ["hello world", "a fairly long sentence " * 60, "", "Short one."]


def minilm_copy(path, st_config=None, model_config=None):
    """The embedded all-MiniLM-L6-v2 in ``path`` with settings of sentence_bert_config.json /
    config_sentence_transformers.json updated (the weights are a link, never written to)."""
    shutil.copytree(minilm_path(), path, copy_function=lambda src, dst: (
        os.symlink(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)))
    for name, update in (("sentence_bert_config.json", st_config), ("config_sentence_transformers.json", model_config)):
        if update:
            config = json.loads((path / name).read_text())
            (path / name).write_text(json.dumps({**config, **update}))
    return path


# --- read_lines -----------------------------------------------------------------------------------

def test_read_lines_splits_on_newlines_only(tmp_path):
    """str.splitlines() also splits on \\x0b \\x0c \\x1c-\\x1e \\x85 \\u2028 \\u2029: 7 lines gave 14."""
    data = ("first line\r\nsecond\u2028half\r\npage\x0cbreak\r\nnel\x85here\r\nvt\x0bx\r\n"
            "fs\x1cgs\x1drs\x1e\u2029\r\nlast\r\n")
    src = tmp_path / "weird.txt"
    src.write_bytes(data.encode("utf-8"))
    assert read_lines(str(src)) == ["first line", "second\u2028half", "page\x0cbreak", "nel\x85here", "vt\x0bx",
                                    "fs\x1cgs\x1drs\x1e\u2029", "last"]


@pytest.mark.parametrize("data, lines", [
    (b"", []),
    (b"\n", [""]),
    (b"a\n\nb", ["a", "", "b"]),  # no final newline
    (b"a\r\nb\r\n", ["a", "b"]),
    (b"a\rb\n", ["a\rb"]),  # only a "\r" right before "\n" is part of the line ending
    (b"\xef\xbb\xbfhello\nworld\n", ["hello", "world"]),  # a byte-order mark is not text
])
def test_read_lines_endings_and_bom(tmp_path, data, lines):
    src = tmp_path / "in.txt"
    src.write_bytes(data)
    assert read_lines(str(src)) == lines


def test_read_lines_names_a_file_that_is_not_utf8(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("ab café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(invalid continuation byte at byte 6\)"):
        read_lines(str(src))


def test_read_lines_of_standard_input(monkeypatch):
    """``-`` reads standard input, bytes decoded as a file's are (a byte-order mark, "\\r\\n")."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfone\r\ntwo\n")))
    assert read_lines("-") == ["one", "two"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("café".encode("latin-1"))))
    with pytest.raises(ValueError, match=r"^standard input is not UTF-8 text"):
        read_lines("-")


# --- settings that sentence-transformers applies ----------------------------------------------------

@pytest.mark.parametrize("st_config, model_config", [
    ({}, {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "query"}),
    ({"tokenizer_args": {"model_max_length": 8}}, {}),
    ({"processor_kwargs": {"model_max_length": 8}}, {}),  # the name sentence-transformers 6 saves
    ({"processing_kwargs": {"text": {"max_length": 8}}}, {}),
    ({"config_args": {"layer_norm_eps": 1e-2}}, {}),
    ({"config_kwargs": {"layer_norm_eps": 1e-2}}, {}),
    ({}, {"truncate_dim": 32}),
], ids=["default_prompt", "tokenizer_args", "processor_kwargs", "processing_kwargs", "config_args",
        "config_kwargs", "truncate_dim"])
def test_settings_the_packed_pipeline_ignored_equal_sentence_transformers(tmp_path, st_config, model_config):
    """Each of these settings changes what sentence-transformers computes; the packed pipeline does
    not apply them, so the directory runs through sentence-transformers (with fastbert in it)."""
    import fastbert

    model_dir = minilm_copy(tmp_path / "m", st_config, model_config)
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(LINES)
    plain = st.SentenceTransformer(minilm_path(), device="cpu").encode(LINES)
    assert expected.shape != plain.shape or np.abs(expected - plain).max() > 1e-3  # the setting matters
    embedder = SentenceEmbedder(model_dir, device="cpu")
    assert embedder.st_model is not None and isinstance(embedder.st_model[0].model, fastbert.BertModel)
    got = embedder.encode(LINES)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("st_config", [{"model_args": {"attn_implementation": "eager"}},
                                       {"model_kwargs": {"attn_implementation": "eager"}}])
def test_model_args_run_through_sentence_transformers(tmp_path, st_config):
    model_dir = minilm_copy(tmp_path / "m", st_config)
    embedder = SentenceEmbedder(model_dir, device="cpu")
    assert embedder.st_model is not None
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(LINES)
    assert np.abs(embedder.encode(LINES) - expected).max() <= 1e-5


def test_prompts_without_a_default_keep_the_packed_pipeline(tmp_path):
    """Prompts apply only when named (or a default is set): encode(lines) uses none."""
    model_dir = minilm_copy(tmp_path / "m", model_config={"prompts": {"query": "query: "}, "default_prompt_name": None})
    embedder = SentenceEmbedder(model_dir, device="cpu")
    assert embedder.st_model is None
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(LINES)
    assert np.abs(embedder.encode(LINES) - expected).max() <= 1e-5


def test_do_lower_case_as_sentence_transformers(tmp_path):
    """sentence-transformers 6 lowercases with the tokenizers Lowercase normalizer, not str.lower():
    a Greek final capital sigma becomes σ there, ς with str.lower() (a difference of 0.07)."""
    model_dir = minilm_copy(tmp_path / "m", {"do_lower_case": True})
    lines = ["ΟΔΟΣ ΚΑΙ ΛΟΓΟΣ", "ΣΟΦΟΣ.", "İstanbul", "ǅemal", "plain ascii"]
    embedder = SentenceEmbedder(model_dir, device="cpu")
    assert embedder.st_model is None  # the packed pipeline
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(lines)
    assert np.abs(embedder.encode(lines) - expected).max() <= 1e-5


# --- empty input, model directory, dtype --------------------------------------------------------

def test_no_lines_give_an_empty_array(tmp_path):
    packed = SentenceEmbedder(minilm_path(), device="cpu")
    fallback = SentenceEmbedder(minilm_copy(tmp_path / "m", {"tokenizer_args": {"model_max_length": 8}}), device="cpu")
    assert packed.st_model is None and fallback.st_model is not None
    for embedder in (packed, fallback):
        out = embedder.encode([])
        assert out.shape == (0, 384) and out.dtype == np.float32


@pytest.mark.parametrize("name", ["sentence-transformers/all-MiniLM-L6-v2", "no/such/dir"])
def test_model_must_be_a_local_directory(name):
    """A Hub id is not looked up: one that transformers finds in a local cache was loaded as a bare
    checkpoint (mean pooling, no Normalize), silently not the model's pipeline."""
    with pytest.raises(ValueError, match=f"model directory '{name}' does not exist"):
        SentenceEmbedder(name, device="cpu")


def test_model_directory_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="holds neither modules.json .* nor config.json"):
        SentenceEmbedder(tmp_path, device="cpu")


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"),
                                             ("meta", "runs on cpu or cuda")])
def test_bad_devices_are_named(device, message):
    with pytest.raises(ValueError, match=message):
        SentenceEmbedder(minilm_path(), device=device)


def _fp16_st_dir(tmp_path):
    """A small random sentence-transformers directory whose checkpoint is float16."""
    from safetensors.torch import load_file, save_file

    from tests.test_cli import _random_st_dir

    model_dir = _random_st_dir(tmp_path, "mean")
    weights = model_dir / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    return model_dir


def test_dtype_auto_is_the_checkpoint_dtype(tmp_path):
    """sentence-transformers runs an fp16 checkpoint in fp16; fastbert's default stays float32 (equal to
    sentence-transformers in float32), ``dtype="auto"`` runs the checkpoint's dtype, as it does."""
    from tests.test_checkpoint import SENTENCES

    model_dir = _fp16_st_dir(tmp_path)
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[:16]
    reference = st.SentenceTransformer(str(model_dir), device="cpu",
                                       model_kwargs={"dtype": torch.float32}).encode(lines)
    stock = st.SentenceTransformer(str(model_dir), device="cpu")
    assert stock[0].model.dtype == torch.float16
    fp32 = SentenceEmbedder(model_dir, device="cpu")
    assert fp32.dtype == torch.float32
    assert np.abs(fp32.encode(lines) - reference).max() <= 1e-5
    auto = SentenceEmbedder(model_dir, device="cpu", dtype="auto")
    assert auto.dtype == torch.float16
    stock_error = np.abs(stock.encode(lines) - reference).max()
    assert np.abs(auto.encode(lines) - reference).max() <= 2 * stock_error + 1e-3  # DESIGN.md's fp16 budget
