"""Opt-in CUDA graphs for fastbert.BertModel: one captured encoder per token-count bucket.

A captured graph bakes in its tensor addresses, its ``cu_seqlens`` capacity and its ``max_seqlen``.
So each bucket holds static buffers of ``bucket`` tokens and a fixed-capacity ``cu_seqlens``, and
its attention is launched for a static ``max_seqlen`` bound. A call validates and unpacks its batch
eagerly (host syncs are fine there), copies the packed tokens into the smallest bucket that holds
them, and replays. The tokens past the last real one are cut into short sequences (at most
``PADDING_PIECE`` tokens, so their attention costs little) that attend only among themselves: every
row is computed on initialised inputs (zeros, or the already validated indices of an earlier call),
and none of them is read back. The eager work around a replay is what small batches wait on (each
launch costs the host tens of microseconds), so it is kept to a few copies.

    runner = CUDAGraphRunner(model)            # model on a CUDA device, eval mode
    out = runner(input_ids, attention_mask)    # same outputs as model(...)

Without a GPU (or with ``capture=False``) the same static-buffer path runs eagerly, which is how the
bucketing is tested on the CPU.
"""

from __future__ import annotations

import bisect

import torch
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from . import ops
from .validation import check_inputs

# Steps of 1.5x or less: a batch computes at most 1.5x its tokens (powers of two cost up to 2x; an H200
# run with buckets 4096 and 16384 replayed a 4915-token batch at 3.3x its work).
DEFAULT_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
PADDING_PIECE = 64


class _Bucket:
    """Static buffers of one token-count bucket, and its graph once captured."""

    def __init__(self, tokens: int, sequences: int, device):
        self.tokens = tokens
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.token_type_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.cu_seqlens = torch.full((sequences + 1,), tokens, dtype=torch.int32, device=device)
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class CUDAGraphRunner:
    """Runs ``model`` (a fastbert.BertModel in eval mode) through CUDA graphs captured per bucket.

    ``buckets``: token counts with a graph each (a batch takes the smallest that holds its tokens;
    larger batches run eagerly). ``max_sequences``: sequences per batch a graph takes.
    ``max_seqlen``: the static attention bound (default: the model's max_position_embeddings).

    Graphs read the model's weights where they were at capture: updates in place (an optimizer step,
    ``load_state_dict``) are seen by the next replay; weights replaced by new tensors (``.to()``,
    ``load_state_dict(assign=True)``, ``param.data = ...``) need a new runner.
    """

    def __init__(self, model, buckets=DEFAULT_BUCKETS, max_sequences: int = 256, max_seqlen: int | None = None,
                 capture: bool | None = None):
        if model.training:
            raise ValueError("CUDAGraphRunner runs inference: put the model in eval mode first")
        self.model = model
        self.buckets = sorted(buckets)
        self.max_seqlen = int(max_seqlen or model.config.max_position_embeddings)
        self.max_sequences = max_sequences
        self.piece = min(PADDING_PIECE, self.max_seqlen)
        device = next(model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        self.device = device
        self._buckets: dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _slots(self, tokens: int) -> int:
        """cu_seqlens capacity: the real sequences, then the padding cut into pieces."""
        return self.max_sequences + -(-tokens // self.piece)

    def _encode(self, bucket: _Bucket) -> torch.Tensor:
        packing = ops.Packing(None, bucket.cu_seqlens, self.max_seqlen, 1, bucket.tokens)
        hidden = self.model.embeddings(bucket.input_ids, bucket.position_ids, bucket.token_type_ids)
        return self.model.encoder(hidden, packing)[0]

    def _bucket(self, tokens: int) -> _Bucket:
        size = self.buckets[bisect.bisect_left(self.buckets, tokens)]
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = self._buckets[size] = _Bucket(size, self._slots(size), self.device)
            if self.capture:
                self._capture(bucket)
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        bucket.cu_seqlens[0] = 0
        bucket.cu_seqlens[1:] = self._tail_offsets(0, 0, bucket)  # a valid layout for the warm-up
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning, lazy init, the fused QKV cache
            for _ in range(2):
                self._encode(bucket)
        torch.cuda.current_stream().wait_stream(side)
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            bucket.output = self._encode(bucket)

    def _tail_offsets(self, tokens: int, sequences: int, bucket: _Bucket) -> torch.Tensor:
        """``cu_seqlens[sequences + 1:]`` after ``sequences`` real ones holding ``tokens``: the padding
        in pieces of at most ``self.piece`` tokens, then empty sequences. Made on the host (both counts
        are host integers): one copy to the device instead of four small launches."""
        count = bucket.cu_seqlens.numel() - 1 - sequences
        steps = torch.arange(1, count + 1, dtype=torch.int32) * self.piece
        return (steps + tokens).clamp_(max=bucket.tokens)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 **kwargs) -> BaseModelOutputWithPoolingAndCrossAttentions:
        inputs = check_inputs(self.model.config, input_ids, attention_mask, token_type_ids, position_ids, None,
                              kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
        packing = inputs.packing
        tokens, sequences = packing.num_tokens, packing.cu_seqlens.numel() - 1
        fits = (tokens <= self.buckets[-1] and sequences <= self.max_sequences
                and packing.max_seqlen <= self.max_seqlen)
        if not fits or tokens == 0:
            return self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              position_ids=position_ids, **kwargs)
        bucket = self._bucket(tokens)
        # Checked above, so copying into the static buffers is all that is left: no host sync. The rows
        # past `tokens` keep indices already validated (their outputs are never read).
        for static, value in ((bucket.input_ids, inputs.input_ids), (bucket.position_ids, inputs.position_ids),
                              (bucket.token_type_ids, inputs.token_type_ids)):
            static[:tokens].copy_(value)
        bucket.cu_seqlens[:sequences + 1].copy_(packing.cu_seqlens)
        bucket.cu_seqlens[sequences + 1:].copy_(self._tail_offsets(tokens, sequences, bucket), non_blocking=True)
        if bucket.graph is not None:
            bucket.graph.replay()
            hidden = bucket.output[:tokens].clone()  # the next replay overwrites the static output
        else:
            hidden = self._encode(bucket)[:tokens]
        sequence_output = ops.pad(hidden, packing)
        pooler = self.model.pooler
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=pooler(sequence_output) if pooler is not None else None,
        )
