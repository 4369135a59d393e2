"""The real all-MiniLM-L6-v2 checkpoint (embedded package) against transformers, on real sentences."""

from pathlib import Path

import pytest
import torch
import transformers

import fastbert
from tests.helpers import FP32_MODEL_CHECKPOINT, assert_close, minilm_path

SENTENCES = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "sentences.txt"


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return (fastbert.BertModel.from_pretrained(path).eval(),
            transformers.BertModel.from_pretrained(path).eval(), tokenizer)


def _check(fast, hf, batch):
    with torch.no_grad():
        ours, theirs = fast(**batch), hf(**batch)
    keep = batch["attention_mask"].bool()
    assert_close(ours.last_hidden_state[keep], theirs.last_hidden_state[keep], FP32_MODEL_CHECKPOINT,
                 "last_hidden_state")
    assert_close(ours.pooler_output, theirs.pooler_output, FP32_MODEL_CHECKPOINT, "pooler_output")


def test_real_sentences_padded_batches(minilm):
    fast, hf, tokenizer = minilm
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    for start in range(0, len(lines), 16):
        batch = tokenizer(lines[start:start + 16], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        _check(fast, hf, batch)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 17, 31, 64, 100, 128, 129, 200, 255, 256])
def test_every_length_up_to_256(minilm, length):
    fast, hf, tokenizer = minilm
    text = " ".join(SENTENCES.read_text(encoding="utf-8").splitlines())
    tokens = tokenizer(text, return_tensors="pt")["input_ids"]  # [CLS] + 1000+ real word pieces
    ids = torch.cat([tokens[:, :length - 1], tokens[:, -1:]], dim=1)[:, -length:]  # ends with [SEP]
    assert ids.shape[1] == length
    _check(fast, hf, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_left_padded_real_batch(minilm):
    fast, hf, tokenizer = minilm
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[:12]
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(lines, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        ours, theirs = fast(**batch), hf(**batch)
    keep = batch["attention_mask"].bool()
    assert_close(ours.last_hidden_state[keep], theirs.last_hidden_state[keep], FP32_MODEL_CHECKPOINT)
