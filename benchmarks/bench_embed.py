"""``fastbert embed``'s job: sentences to normalised mean-pooled embeddings, timed whole (tokenizing,
the forwards, pooling, the copy to the host) with an all-MiniLM-L6-v2-shaped BERT in float32 (what
``fastbert embed`` runs by default). Random weights: the checkpoint does not travel to the GPU
machine. The sentences are benchmarks/data/sentences.txt repeated, in batches of 32.

- ``fastbert``: ``SentenceEmbedder.encode``, batches replayed through CUDA graphs of their token count
  (its default on a GPU; in smoke mode on the CPU the runner's static buffers run eagerly), the graphs
  captured before the timed rounds (an embedder serving job after job);
- ``fastbert+capture``: the same, each round a new job that captures its graphs (one
  ``fastbert embed`` command; the model's kernels already compiled): what capturing costs;
- ``fastbert+eager``: the same with ``cuda_graphs=False``;
- ``transformers-sdpa`` / ``transformers-eager``: what sentence-transformers runs (the GPU image has no
  sentence-transformers): batches sorted by length, each padded to its longest, mean over the mask,
  normalised.

Every implementation's embeddings are checked against transformers' before anything is timed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.conftest import DEVICE, SMOKE, cuda_or_skip, timed

MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's
BATCH = 32
REPEATS = 6 if SMOKE else 12  # in smoke mode too, enough batches share a bucket to capture it


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import transformers

    from tests.model_utils import sentence_pipeline_dir

    layers, hidden = (2, 64) if SMOKE else (6, 384)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=hidden // 32, intermediate_size=4 * hidden,
                                     max_position_embeddings=512)
    return sentence_pipeline_dir(tmp_path_factory.mktemp("minilm-shaped"), config, MAX_SEQ_LENGTH)


@pytest.fixture(scope="module")
def lines():
    from benchmarks.bench_cpu import SENTENCES
    from fastbert.embed import read_lines

    return read_lines(str(SENTENCES)) * REPEATS


def _transformers_encoder(model_dir, attn_implementation):
    """sentence-transformers' encode on transformers' BertModel: length-sorted padded batches."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir, attn_implementation=attn_implementation)
    model = model.to(DEVICE).eval()

    from tests.model_utils import mean_pooled_normalized

    @torch.inference_mode()
    def encode(lines):
        order = np.argsort([-len(line) for line in lines], kind="stable")
        out = np.zeros((len(lines), model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(lines), BATCH):
            chunk = order[start:start + BATCH]
            batch = tokenizer([lines[i] for i in chunk], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                              return_tensors="pt").to(DEVICE)
            out[chunk] = mean_pooled_normalized(model(**batch).last_hidden_state, batch["attention_mask"]).cpu().numpy()
        return out

    return encode


@pytest.mark.parametrize("impl", ["fastbert", "fastbert+capture", "fastbert+eager", "transformers-sdpa",
                                  "transformers-eager"])
def test_embed(benchmark, record, pipeline, lines, impl):
    if not SMOKE:
        cuda_or_skip()
    from fastbert.embed import SentenceEmbedder

    embedder = None
    if impl.startswith("fastbert"):
        embedder = SentenceEmbedder(pipeline, device=DEVICE, cuda_graphs=impl != "fastbert+eager")

        def encode(x):
            if impl == "fastbert+capture":
                embedder._runner = None  # a new job: no graph captured yet
            return embedder.encode(x, batch_size=BATCH)
    else:
        encode = _transformers_encoder(pipeline, impl.removeprefix("transformers-"))
    reference = _transformers_encoder(pipeline, "sdpa")(lines)
    diff = float(np.abs(encode(lines) - reference).max())
    assert diff <= 2e-5, f"{impl}: embeddings differ from transformers' by {diff}: not timed"
    case = f"embed MiniLM-shaped fp32 {len(lines)} sentences batch {BATCH}"
    benchmark.group = case
    seconds = timed(benchmark, lambda: encode(lines), rounds=10, warmup=2)
    runner = embedder and embedder._runner
    record(case=case, impl=impl, seconds=seconds, sentences=len(lines), sentences_per_s=len(lines) / seconds,
           graph_buckets=None if runner is None else sorted(runner._buckets))
