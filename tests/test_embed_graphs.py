"""``fastbert embed`` through CUDA graphs: packed batches replayed by ``CUDAGraphRunner`` give the
embeddings that transformers gives, and only buckets that several batches share are captured.

No sentence-transformers here (the GPU image has none): the pipeline directory is written by hand
(a random BERT, a WordPiece tokenizer, Transformer -> mean Pooling -> Normalize), and the reference
is transformers' BertModel on the padded batch, pooled and normalised beside it, as
sentence-transformers does."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from fastbert.cli import _build_parser
from fastbert.embed import MIN_BATCHES_PER_GRAPH, SentenceEmbedder, read_lines
from tests.helpers import DEVICES, FP32_MODEL_RANDOM
from tests.model_utils import make_config, sentence_pipeline_dir
from tests.test_checkpoint import SENTENCES

MAX_SEQ_LENGTH = 40


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    config = make_config("h144", layers=2, vocab=30522, max_positions=64)
    return sentence_pipeline_dir(tmp_path_factory.mktemp("pipeline"), config, MAX_SEQ_LENGTH)


@torch.no_grad()
def _reference(model_dir, lines, device) -> np.ndarray:
    """transformers on the padded batch: mean over the real tokens, then L2-normalised."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir).to(device).eval()
    batch = tokenizer(lines, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_embed_through_graphs_equals_transformers(pipeline_dir, device, batch_size):
    """Batches of several sizes replayed in their buckets (captured on a GPU; on the CPU the runner's
    static buffers run eagerly) give transformers' embeddings, in input order."""
    lines = read_lines(str(SENTENCES))
    expected = _reference(pipeline_dir, lines, device)
    embedder = SentenceEmbedder(pipeline_dir, device=device, cuda_graphs=True)
    got = embedder.encode(lines, batch_size=batch_size)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= FP32_MODEL_RANDOM
    runner = embedder._runners[batch_size]
    if batch_size < 32:  # 86 lines in 3 batches of 32 share no bucket: those run eagerly
        assert runner._buckets, "no batch went through the graph runner"
    for bucket in runner._buckets.values():
        assert (bucket.graph is not None) == (device == "cuda")
    again = embedder.encode(lines[::-1], batch_size=batch_size)  # the same buckets replay other batches
    assert np.abs(again[::-1] - expected).max() <= FP32_MODEL_RANDOM


def test_graphs_only_for_buckets_several_batches_share(pipeline_dir):
    """A bucket is built where MIN_BATCHES_PER_GRAPH batches of a job replay it, or where an earlier
    job built it; other batches (and batches larger than every bucket) run on the model."""
    embedder = SentenceEmbedder(pipeline_dir, device="cpu", cuda_graphs=True)
    model = embedder.model
    shared, alone, too_large = [100] * MIN_BATCHES_PER_GRAPH, [1000], [10**6]
    models = embedder._models_for(shared + alone + too_large, batch_size=8)
    runner = embedder._runners[8]
    assert models == [runner] * len(shared) + [model, model]
    runner._bucket(100)  # built, as the first replay does (bucket 128)
    assert embedder._models_for([110, 1000], batch_size=8) == [runner, model]
    assert embedder._models_for([110, 110], batch_size=4) == [model, model]  # another batch size, another runner
    off = SentenceEmbedder(pipeline_dir, device="cpu")  # graphs are for CUDA devices unless asked for
    assert not off.cuda_graphs and off._models_for(shared, batch_size=8) == [off.model] * len(shared)


@pytest.mark.parametrize("flag, expected", [([], None), (["--no-cuda-graphs"], False)])
def test_embed_command_cuda_graphs_flag(monkeypatch, tmp_path, flag, expected):
    """``fastbert embed`` leaves the choice to the device (graphs on CUDA) unless told not to."""
    import fastbert.embed

    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise ValueError("recorded")

    monkeypatch.setattr(fastbert.embed, "SentenceEmbedder", Recorder)
    monkeypatch.setattr(fastbert.embed, "default_model_dir", lambda: tmp_path)
    args = _build_parser().parse_args(["embed", str(SENTENCES), "-o", str(tmp_path / "e.npy"), "--quiet",
                                       "--device", "cpu", *flag])
    with pytest.raises(SystemExit, match="recorded"):
        fastbert.embed.run(args)
    assert seen["cuda_graphs"] is expected
