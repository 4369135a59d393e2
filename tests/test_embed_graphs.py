"""``fastbert embed`` through CUDA graphs: packed batches replayed by ``CUDAGraphRunner`` give the
embeddings that transformers gives, and only buckets that several batches share are captured.

No sentence-transformers here (the GPU image has none): the pipeline directory is written by hand
(a random BERT, a WordPiece tokenizer, Transformer -> mean Pooling -> Normalize), and the reference
is transformers' BertModel on the padded batch, pooled and normalised beside it, as
sentence-transformers does."""

from collections import Counter

import numpy as np
import pytest
import torch
import transformers

from fastbert.cli import _build_parser
from fastbert.embed import MIN_BATCHES_PER_GRAPH, SentenceEmbedder, read_lines
from tests.helpers import DEVICES, FP32_MODEL_RANDOM
from tests.model_utils import make_config, mean_pooled_normalized, sentence_pipeline_dir
from tests.test_checkpoint import SENTENCES

MAX_SEQ_LENGTH = 40


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    config = make_config("h144", layers=2, vocab=30522, max_positions=64)
    return sentence_pipeline_dir(tmp_path_factory.mktemp("pipeline"), config, MAX_SEQ_LENGTH)


@torch.no_grad()
def _reference(model_dir, lines, device) -> np.ndarray:
    """transformers on the padded batch, then sentence-transformers' pooling and normalisation."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir).to(device).eval()
    batch = tokenizer(lines, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(device)
    return mean_pooled_normalized(model(**batch).last_hidden_state, batch["attention_mask"]).cpu().numpy()


def _shared_buckets(embedder, runner, lines, batch_size) -> set[int]:
    """The buckets that MIN_BATCHES_PER_GRAPH batches of the job share: batches of ``batch_size``
    sentences in order of decreasing length, each bucket the smallest that holds its tokens."""
    lengths = sorted((len(ids) for ids in embedder._tokenize(lines)[0]), reverse=True)
    tokens = [sum(lengths[start:start + batch_size]) for start in range(0, len(lengths), batch_size)]
    uses = Counter(min(b for b in runner.buckets if b >= n) for n in tokens)
    return {size for size, count in uses.items() if count >= MIN_BATCHES_PER_GRAPH}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size, repeats", [(1, 1), (5, 1), (32, 8)])
def test_embed_through_graphs_equals_transformers(pipeline_dir, device, batch_size, repeats):
    """Batches of several sizes replayed in their buckets (captured on a GPU, where graphs are the
    default; on the CPU, asked for, the runner's static buffers run eagerly) give transformers'
    embeddings, in input order; exactly the buckets several batches share are built, and a later
    job replays in them even where it has too few batches to build one."""
    lines = read_lines(str(SENTENCES)) * repeats
    expected = _reference(pipeline_dir, lines, device)
    embedder = SentenceEmbedder(pipeline_dir, device=device, cuda_graphs=None if device == "cuda" else True)
    got = embedder.encode(lines, batch_size=batch_size)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= FP32_MODEL_RANDOM
    runner = embedder._runner
    built = _shared_buckets(embedder, runner, lines, batch_size)
    assert built and set(runner._buckets) == built
    for bucket in runner._buckets.values():
        assert (bucket.graph is not None) == (device == "cuda")

    replays, replay = [], runner.replay_packed

    def counted(*args):  # 1 for a batch the graph took, 0 for one it handed back to the model
        hidden = replay(*args)
        replays.append(int(hidden is not None))
        return hidden

    runner.replay_packed = counted
    size = min(built)  # a job of one batch in a built bucket
    few = next(line for line in lines if runner.bucket_for(len(embedder._tokenize([line])[0][0]) * batch_size) == size)
    again = embedder.encode([few] * batch_size, batch_size=batch_size)
    assert replays == [1] and np.abs(again - _reference(pipeline_dir, [few], device)).max() <= FP32_MODEL_RANDOM


def test_graphs_only_for_buckets_several_batches_share(pipeline_dir):
    """A bucket is built where MIN_BATCHES_PER_GRAPH batches of a job replay it, or where an earlier
    job built it; other batches (and batches larger than every bucket) run on the model."""
    embedder = SentenceEmbedder(pipeline_dir, device="cpu", cuda_graphs=True)
    shared, alone, too_large = [100] * MIN_BATCHES_PER_GRAPH, [1000] * (MIN_BATCHES_PER_GRAPH - 1), [10**6] * 9
    runners = embedder._runners_for(shared + alone + too_large, batch_size=8)
    runner = embedder._runner
    assert runners == [runner] * len(shared) + [None] * (len(alone) + len(too_large))
    runner._bucket(100)  # built, as the first replay does (bucket 128)
    assert embedder._runners_for([110, 1000], batch_size=8) == [runner, None]
    assert embedder._runners_for([110], batch_size=4) == [None]  # another batch size: a new runner
    assert embedder._runner is not runner and embedder._runner.max_sequences == 4
    off = SentenceEmbedder(pipeline_dir, device="cpu")  # graphs are for CUDA devices unless asked for
    assert not off.cuda_graphs and off._runners_for(shared, batch_size=8) == [None] * len(shared)


def test_capture_out_of_memory_runs_the_job_eagerly(pipeline_dir, monkeypatch):
    """A capture that runs out of GPU memory (stood in for: the runner's bucket raises it) costs a
    warning, not the job: the batch and the rest run eagerly, with the same embeddings."""
    lines = read_lines(str(SENTENCES))
    embedder = SentenceEmbedder(pipeline_dir, device="cpu", cuda_graphs=True)
    embedder._runners_for([1], batch_size=1)

    def out_of_memory(tokens):
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(embedder._runner, "_bucket", out_of_memory)
    with pytest.warns(UserWarning, match="ran out of GPU memory"):
        got = embedder.encode(lines, batch_size=1)
    assert not embedder.cuda_graphs and embedder._runner is None
    assert np.abs(got - _reference(pipeline_dir, lines, "cpu")).max() <= FP32_MODEL_RANDOM


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
