"""The ``fastbert`` command: embed equals sentence-transformers' pipeline; info reports."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastbert.cli import main
from tests.helpers import FP32_MODEL_RANDOM, minilm_path, needs_cuda
from tests.test_checkpoint import SENTENCES

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def minilm_reference():
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    return lines, model.encode(lines, convert_to_numpy=True)


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_embed_equals_sentence_transformers(tmp_path, minilm_reference, batch_size):
    lines, expected = minilm_reference
    out = tmp_path / "e.npy"
    assert main(["embed", str(SENTENCES), "-o", str(out), "--batch-size", str(batch_size), "--quiet"]) == 0
    got = np.load(out)
    assert got.shape == expected.shape == (len(lines), 384)
    assert np.abs(got - expected).max() <= 1e-5


def test_embed_jsonl(tmp_path, minilm_reference):
    lines, expected = minilm_reference
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines[:5] + [""]) + "\n", encoding="utf-8")  # an empty line is a sentence too
    out = tmp_path / "e.jsonl"
    main(["embed", str(src), "-o", str(out), "--quiet"])
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == lines[:5] + [""]
    assert np.abs(np.array([r["embedding"] for r in rows[:5]]) - expected[:5]).max() <= 1e-5


def _random_st_dir(path, pooling, extra_modules=()):
    """A sentence-transformers directory around a small random BERT, with the given pooling."""
    from sentence_transformers import models

    from tests.model_utils import make_config, randomize_, word_piece_tokenizer

    config = make_config("h144", layers=2, vocab=30522, max_positions=512)
    import transformers

    bert = randomize_(transformers.BertModel(config))
    bert.save_pretrained(path / "bert")
    word_piece_tokenizer(path / "bert")
    word = models.Transformer(str(path / "bert"), max_seq_length=24)
    modules = [word, models.Pooling(144, pooling_mode=pooling), *extra_modules]
    model = st.SentenceTransformer(modules=modules, device="cpu")
    model.save(str(path / "st"))
    return path / "st"


@pytest.mark.parametrize("pooling", ["cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                     ("cls", "mean")])
def test_embed_pooling_modes_equal_sentence_transformers(tmp_path, pooling):
    model_dir = _random_st_dir(tmp_path, list(pooling) if isinstance(pooling, tuple) else pooling)
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[::4]
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(lines)
    out = tmp_path / "e.npy"
    main(["embed", str(SENTENCES), "-o", str(out), "--model", str(model_dir), "--quiet"])
    got = np.load(out)[::4]
    assert np.abs(got - expected).max() <= 1e-5


@needs_cuda
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_on_cuda_equals_sentence_transformers_on_cuda(tmp_path, pooling):
    """The packed pipeline on the fused kernels (fp32) against sentence-transformers on the same GPU."""
    model_dir = _random_st_dir(tmp_path, pooling)
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    expected = st.SentenceTransformer(str(model_dir), device="cuda").encode(lines)
    out = tmp_path / "e.npy"
    assert main(["embed", str(SENTENCES), "-o", str(out), "--model", str(model_dir), "--device", "cuda",
                 "--quiet"]) == 0
    assert np.abs(np.load(out) - expected).max() <= FP32_MODEL_RANDOM


def test_embed_other_pipelines_run_through_sentence_transformers(tmp_path):
    """A Dense module is not part of the packed pipeline: sentence-transformers runs it, on fastbert."""
    from sentence_transformers import models

    torch.manual_seed(3)
    model_dir = _random_st_dir(tmp_path, "mean", [models.Dense(144, 32)])
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[:10]
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(lines)
    from fastbert.embed import SentenceEmbedder

    embedder = SentenceEmbedder(model_dir, device="cpu")
    assert embedder.st_model is not None
    import fastbert

    assert isinstance(embedder.st_model[0].auto_model, fastbert.BertModel)
    assert np.abs(embedder.encode(lines) - expected).max() <= 1e-5


def test_embed_rejects_unknown_output_format(tmp_path):
    with pytest.raises(SystemExit, match="must end in .npy or .jsonl"):
        main(["embed", str(SENTENCES), "-o", str(tmp_path / "e.csv")])


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fastbert.cli", "info"], capture_output=True, text=True,
                         check=True).stdout
    for expected in ("torch", "transformers", "FASTBERT_BACKEND", "op attention", "op embeddings",
                     "op bias_activation", "op bias_residual_layer_norm", "CUDA extension"):
        assert expected in out, out
    assert re.search(r"encoder eager fast path +cpu: off", out), out  # the CPU runs PyTorch's ops
