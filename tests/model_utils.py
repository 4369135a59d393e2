"""Builders shared by the model tests: random configs with weights of order 1, masks, pairs of
(fastbert, transformers) models holding the same weights."""

from __future__ import annotations

import torch
import transformers

import fastbert

# name -> (hidden, heads, intermediate)
SHAPES = {
    "base": (768, 12, 3072),
    "large": (1024, 16, 4096),
    "h312": (312, 12, 1200),  # head dim 26 (TinyBERT)
    "h144": (144, 3, 288),  # head dim 48
    "h160": (160, 2, 320),  # head dim 80
    "h96": (96, 1, 192),  # head dim 96, one head
    "h128": (128, 2, 256),  # head dim 64 (BERT-base's), two heads: the compact attention grid's
}


def make_config(shape="h144", layers=2, hidden_act="gelu", vocab=512, max_positions=64, **kwargs):
    hidden, heads, intermediate = SHAPES[shape]
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, hidden_act=hidden_act, max_position_embeddings=max_positions,
        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs,
    )
    config._attn_implementation = "eager"  # the only transformers attention that returns probabilities
    return config


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order 1 everywhere: biases and LayerNorm parameters too (never the 1/0 defaults)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if "LayerNorm.weight" in name:
            p.copy_(1 + 0.2 * noise)
        elif p.dim() == 2 and "embeddings" not in name:
            p.copy_(noise / p.shape[1] ** 0.5)  # keeps activations of order 1
        else:
            p.copy_(0.5 * noise)
    return model


def model_pair(config, seed=0, add_pooling_layer=True, device="cpu"):
    """(fastbert, transformers) BertModels in eval mode with the same random weights."""
    hf = randomize_(transformers.BertModel(config, add_pooling_layer=add_pooling_layer), seed).eval()
    fast = fastbert.BertModel(config, add_pooling_layer=add_pooling_layer).eval()
    fast.load_state_dict(hf.state_dict(), strict=True)
    return fast.to(device), hf.to(device)


def make_mask(kind: str, batch: int, seqlen: int, gen=None) -> torch.Tensor:
    """0/1 masks: right / left padding, holes, and one fully masked row."""
    gen = gen or torch.Generator().manual_seed(1)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
    lengths[0] = seqlen  # the longest row is full, as a tokenizer pads
    cols = torch.arange(seqlen)
    if kind == "none":
        return torch.ones(batch, seqlen, dtype=torch.long)
    if kind == "right":
        return (cols < lengths[:, None]).long()
    if kind == "left":
        return (cols >= seqlen - lengths[:, None]).long()
    if kind == "holes":
        mask = (torch.rand(batch, seqlen, generator=gen) > 0.3).long()
        mask[:, 0] = 1
        return mask
    if kind == "fully_masked_row":
        mask = (cols < lengths[:, None]).long()
        mask[-1] = 0
        return mask
    raise ValueError(kind)


def random_inputs(config, batch, seqlen, gen=None, device="cpu"):
    gen = gen or torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (batch, seqlen), generator=gen)
    types = torch.randint(0, config.type_vocab_size, (batch, seqlen), generator=gen)
    return ids.to(device), types.to(device)


def word_piece_tokenizer(directory) -> None:
    """Save a BERT WordPiece tokenizer to ``directory`` whose vocabulary is the words of the benchmark
    sentences (no download, no checkpoint package: the GPU machine has neither)."""
    import re
    from pathlib import Path

    sentences = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "sentences.txt"
    words = sorted(set(re.findall(r"\w+|[^\w\s]", sentences.read_text(encoding="utf-8").lower())))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(directory)


def sentence_pipeline_dir(path, config, max_seq_length: int):
    """A sentence-transformers directory written without sentence-transformers (the GPU machine has
    none): a random ``config`` BERT, a WordPiece tokenizer (``word_piece_tokenizer``) and the modules
    Transformer -> mean Pooling -> Normalize, as all-MiniLM-L6-v2 has them."""
    import json
    from pathlib import Path

    path = Path(path)
    randomize_(transformers.BertModel(config, add_pooling_layer=False)).save_pretrained(path)
    word_piece_tokenizer(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": config.hidden_size, "pooling_mode_mean_tokens": True}))
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (path / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": where, "type": f"sentence_transformers.models.{kind}"}
        for i, (where, kind) in enumerate(modules)]))
    (path / "2_Normalize").mkdir()  # sentence-transformers saves Normalize as an empty folder
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return path


def mean_pooled_normalized(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """That pipeline's embeddings from a padded batch: the mean over the real tokens, L2-normalised,
    as sentence-transformers' Pooling and Normalize compute them."""
    mask = attention_mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
