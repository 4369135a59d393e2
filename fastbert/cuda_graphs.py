"""Opt-in CUDA graphs for fastbert.BertModel: one captured encoder per token-count bucket.

A captured graph bakes in its tensor addresses, its ``cu_seqlens`` capacity and its ``max_seqlen``.
So each bucket holds static buffers of ``bucket`` tokens and a fixed-capacity ``cu_seqlens``, and
its attention is launched for a static ``max_seqlen`` bound. A call validates and unpacks its batch
eagerly with one host sync (a tokenizer's padded batch in the one ``pack_padded_batch`` op,
other forms through ``check_inputs``), copies the packed tokens into the smallest bucket that holds
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
import contextlib
import functools
import threading

import torch
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from . import ops, validation
from .modeling_bert import BertSelfAttention
from .validation import ID_DTYPES, check_inputs, table_sizes

# Steps of at most 1.5x up to 1024 tokens, then every 512: a batch computes at most 512 tokens more than
# it holds past 1024 (12.5% at 4096), at the price of more graphs, each captured on first use (an H200
# run with power-of-two buckets replayed a 4915-token batch in 16384: 3.3x its work).
DEFAULT_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024) + tuple(range(1536, 16384 + 1, 512))
PADDING_PIECE = 64
# Up to this many positions (batch x seqlen) CUDAGraphRunner unpads a padded batch in the one
# pack_padded_batch op. Its kernel was then a single program, 7-8x faster than the composition it
# replaced up to 1024 positions, 2.7x at 4096, 0.81x at 16384 and 0.44x at 32768 (H200, 2026-11-26): up
# to here the ~25 launches it saves (each tens of microseconds of host time) outweigh that; past it,
# not. It now runs as blocks of positions in two launches (not yet timed): the bound stays until a GPU
# run times them past it.
ONE_OP_UNPAD_POSITIONS = 32768


def _plain_call(model, kwargs, allowed=()) -> bool:
    """Whether a call asks only for what a replay returns (last_hidden_state and pooler_output in a
    ModelOutput) of a model in eval mode: hidden states, attentions, tuple output, other arguments or
    a model switched back to training run eagerly instead of being silently ignored."""
    config = model.config
    return (not model.training and not config.output_attentions and not config.output_hidden_states
            and getattr(config, "return_dict", True) and all(key in allowed for key in kwargs))


def _integer_padded_batch(input_ids, attention_mask, token_type_ids, device=None) -> bool:
    """Whether a call's tensors are the padded batch both runners unpad themselves: 2-D non-empty
    int64 / int32 ``input_ids``, an integer or bool mask of its shape, token types of its shape or one
    row (mask and types may be missing), all on ``device`` (default: ``input_ids``'). Anything else
    goes to the model or check_inputs, which name what is wrong (bool or uint8 ids included)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        return False
    device = input_ids.device if device is None else device
    batch, seqlen = input_ids.shape
    for t in (input_ids, attention_mask, token_type_ids):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.device != device or t.is_floating_point() or t.is_complex():
            return False
        if t is not attention_mask and t.dtype not in ID_DTYPES:
            return False
        if t is not input_ids and tuple(t.shape) not in ((batch, seqlen), (1, seqlen)):
            return False
    return attention_mask is None or tuple(attention_mask.shape) == (batch, seqlen)


def _on_device(device: torch.device, capture: bool):
    """The model's GPU as the current device while graphs are captured and replayed: capture records
    the current device's streams, and replay launches on them (a model on ``cuda:1`` with ``cuda:0``
    current would capture nothing of its kernels)."""
    return torch.cuda.device(device) if capture else contextlib.nullcontext()


def capture_graph(work, pool=None, warmup: int = 2):
    """``work()`` run ``warmup`` times on a side stream (kernel compilation, autotuning, lazy init stay
    out of the graph), then captured on that stream: (the graph, what the captured call returned).
    The side stream is the current device's; torch.cuda.graph's default capture stream is one per
    process, made on whichever GPU was current at the first capture, so a runner on another GPU
    would capture nothing of its kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        outputs = work()
    return graph, outputs


class _GraphRunner:
    """What both runners share: the model in eval mode on its device, a graph memory pool, and calls
    served one at a time, in order on the device, refusing weights replaced since capture.

    A call writes the static input buffers, replays, then copies the static outputs out; a second
    thread doing the same in between would overwrite the first's inputs or outputs (wrong answers,
    no error). So calls hold a lock, and a call made on another CUDA stream than the previous one
    first waits for that stream's work (the lock orders the host, not the GPU). Weights replaced by
    new tensors (``.to()``, ``.half()``, ``load_state_dict(assign=True)``) would leave the graphs
    reading the old storage: the runner keeps every storage its graphs read (so none is freed and
    reused under them) and refuses calls once the first and last parameters are no longer the tensors
    it captured with (two pointer reads a call, where checking every parameter costs ~30 us)."""

    def __init__(self, model, capture: bool | None):
        if model.training:
            raise ValueError(f"{type(self).__name__} runs inference: put the model in eval mode first")
        self.model = model
        device = next(model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        self.device = device
        self._buckets: dict = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._lock = threading.Lock()
        self._last_stream = None
        self._sentinels: list = []  # (tensor, address, dtype) of the first and last parameter at capture
        self._kept: list = []  # every parameter's and buffer's storage, once a graph reads them

    @contextlib.contextmanager
    def _serialized(self):
        with self._lock:
            if self.capture and self.device.type == "cuda":
                stream = torch.cuda.current_stream()
                if self._last_stream is not None and self._last_stream != stream:
                    stream.wait_stream(self._last_stream)
                self._last_stream = stream
            for t, ptr, dtype in self._sentinels:  # set once a graph was captured
                if t.data_ptr() != ptr or t.dtype != dtype:
                    raise RuntimeError(
                        "the model's weights were replaced by new tensors (.to(), .half(), "
                        "load_state_dict(assign=True), ...) after this runner captured its CUDA graphs, "
                        "which read the old ones: make a new runner")
            yield

    def _keep_storages(self, model) -> list:
        """The storages a graph just captured reads besides its buffers: every parameter and buffer
        of the model (kept once for the runner) and each layer's fused QKV storage."""
        if not self._kept:
            params = list(model.parameters())
            self._kept = [t.untyped_storage() for t in (*params, *model.buffers())]
            self._sentinels = [(t, t.data_ptr(), t.dtype) for t in (params[0], params[-1])] if params else []
        return fused_storages(model)


def fused_storages(model) -> list:
    """The fused QKV storage of each layer (``BertSelfAttention._qkv_fused``), which a graph captured
    just before reads and writes at every replay (the layer copies its live weights into it). A runner
    keeps them, so that no replay ever touches freed memory, even after a ``.to()`` made the layers
    new ones."""
    return [m._qkv_fused for m in model.modules() if isinstance(m, BertSelfAttention) and m._qkv_fused is not None]


class _Bucket:
    """Static buffers of one token-count bucket, and its graph once captured."""

    # Never inference tensors, whatever mode the first call ran in: later calls outside
    # torch.inference_mode write into them too (fastbert embed calls a runner inside it).
    @torch.inference_mode(False)
    def __init__(self, tokens: int, sequences: int, device):
        self.tokens = tokens
        # One buffer, so that input from the host is one copy (CUDAGraphRunner.replay_packed).
        self.indices = torch.zeros(3, tokens, dtype=torch.long, device=device)
        self.input_ids, self.position_ids, self.token_type_ids = self.indices
        self.cu_seqlens = torch.full((sequences + 1,), tokens, dtype=torch.int32, device=device)
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.storages: list = []  # what the graph reads besides the weights (fused_storages)


class CUDAGraphRunner(_GraphRunner):
    """Runs ``model`` (a fastbert.BertModel in eval mode) through CUDA graphs captured per bucket.

    ``buckets``: token counts with a graph each (a batch takes the smallest that holds its tokens;
    larger batches run eagerly). ``max_sequences``: sequences per batch a graph takes.
    ``max_seqlen``: the static attention bound (default: the model's max_position_embeddings). A
    bucket of fewer tokens takes at most its token count of either.
    ``compact_attention``: launch the fused attention on its compact grid (a program per query block
    with rows) rather than one per query block of ``max_seqlen`` and sequence slot, most of them
    empty, at head dim 64 (the kernel's ``COMPACT_HEAD_DIM``; other head dims keep the plain grid);
    opt-in: on the H200 the model's times with it were within 1.3% of the plain grid's
    (benchmarks/RESULTS.md, fourth measurement).

    Graphs read the model's weights where they were at capture: updates in place (an optimizer step,
    ``load_state_dict``) are seen by the next replay; weights replaced by new tensors (``.to()``,
    ``load_state_dict(assign=True)``, ``param.data = ...``) need a new runner (the runner keeps the
    storages its graphs read, so they never read freed memory, and refuses calls after ``.to()`` and
    the like, which replace the first and last parameters; a single ``param.data = ...`` it cannot
    see). A model with ``first_token_only`` set runs eagerly. Calls from several threads are served
    one at a time.
    """

    def __init__(self, model, buckets=DEFAULT_BUCKETS, max_sequences: int = 256, max_seqlen: int | None = None,
                 capture: bool | None = None, compact_attention: bool = False):
        super().__init__(model, capture)
        self.compact_attention = compact_attention
        self.buckets = sorted(buckets)
        self.max_seqlen = int(max_seqlen or model.config.max_position_embeddings)
        self.max_sequences = max_sequences
        self.piece = min(PADDING_PIECE, self.max_seqlen)
        slots, limit = self._slots(self.buckets[-1]), ops.attention.MAX_COMPACT_SLOTS  # limit 0: no Triton
        if compact_attention and 0 < limit < slots:
            raise ValueError(f"compact_attention takes at most {limit} sequence slots; max_sequences={max_sequences} "
                             f"and the padding of the {self.buckets[-1]}-token bucket need {slots}")

    # A bucket's static bounds are its own: a batch it takes has at most `tokens` non-empty sequences
    # (and takes a larger bucket when empty ones outnumber its tokens), none longer than `tokens`. The
    # attention grid is a program per query block of max_seqlen x sequence slot x head, and the bound
    # picks its tile: at bf16 BERT-base 1x128 the runner's defaults (256 sequences, max_seqlen 512) gave
    # 12384 programs a layer, 12 with rows, on the long-sequence tile; the 128-token bucket's own
    # bounds give 3120 on the tile the eager model uses at 128 (the H200 profile of 2026-11-26 timed
    # that layer's attention at 19.3 us in the runner against 3.7 us eagerly padded).
    def _slots(self, tokens: int) -> int:
        """cu_seqlens capacity of a ``tokens`` bucket: the real sequences, then the padding in pieces."""
        return min(self.max_sequences, tokens) + -(-tokens // self.piece)

    def _encode(self, bucket: _Bucket) -> torch.Tensor:
        packing = ops.Packing(None, bucket.cu_seqlens, min(self.max_seqlen, bucket.tokens), 1, bucket.tokens,
                              compact_attention=self.compact_attention)
        hidden = self.model.embeddings(bucket.input_ids, bucket.position_ids, bucket.token_type_ids)
        return self.model.encoder(hidden, packing)[0]

    def bucket_for(self, tokens: int) -> int | None:
        """The bucket a batch of ``tokens`` tokens replays in, or None where it runs eagerly (a batch
        with more sequences than tokens, some of them empty, takes the bucket of its sequence count)."""
        index = bisect.bisect_left(self.buckets, tokens)
        return self.buckets[index] if tokens > 0 and index < len(self.buckets) else None

    def has_graph(self, size: int) -> bool:
        """Whether the bucket of ``size`` tokens is built (captured, where the runner captures)."""
        return size in self._buckets

    def _bucket(self, tokens: int) -> _Bucket:
        size = self.bucket_for(tokens)
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = _Bucket(size, self._slots(size), self.device)
            if self.capture:
                self._capture(bucket)
            self._buckets[size] = bucket  # only once captured: a failed capture is retried, not run eagerly
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        bucket.cu_seqlens[0] = 0
        bucket.cu_seqlens[1:] = self._tail_offsets(0, 0, bucket)  # a valid layout for the warm-up
        bucket.graph, bucket.output = capture_graph(lambda: self._encode(bucket), self._pool)
        bucket.storages = self._keep_storages(self.model)

    def _tail_offsets(self, tokens: int, sequences: int, bucket: _Bucket) -> torch.Tensor:
        """``cu_seqlens[sequences + 1:]`` after ``sequences`` real ones holding ``tokens``: the padding
        in pieces of at most ``self.piece`` tokens, then empty sequences. Made on the host (both counts
        are host integers): one copy to the device instead of four small launches."""
        count = bucket.cu_seqlens.numel() - 1 - sequences
        steps = torch.arange(1, count + 1, dtype=torch.int32) * self.piece
        return (steps + tokens).clamp_(max=bucket.tokens)

    def replay_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      lengths: list[int]) -> torch.Tensor | None:
        """Packed sequences held on the host through their bucket's graph, with no host sync: checked on
        the host, copied in (from pinned memory, asynchronously) and replayed, so the host can prepare
        the next batch while the GPU runs this one. ``input_ids``, ``token_type_ids``: 1-D CPU integer
        tensors of the tokens, sequence after sequence; ``lengths``: each sequence's token count (its
        positions count from 0). Returns the last hidden state ``[tokens, hidden]`` on the device (a copy of
        the bucket's static output, made on the device inside the call, so calls from several threads
        stay apart). None where the graphs do not take the batch (see :meth:`__call__`) or a value is out
        of range: the model, called on the same input, runs it or names the value."""
        tokens, sequences = input_ids.numel(), len(lengths)
        for t in (input_ids, token_type_ids):
            if t.device.type != "cpu" or t.dim() != 1 or t.numel() != tokens or t.dtype not in ID_DTYPES:
                raise ValueError("replay_packed takes 1-D int64 or int32 CPU tensors of input_ids and token_type_ids, "
                                 f"one entry per token, got {input_ids.dtype} {tuple(input_ids.shape)} on "
                                 f"{input_ids.device} and {token_type_ids.dtype} {tuple(token_type_ids.shape)} on "
                                 f"{token_type_ids.device}")
        given = torch.as_tensor(lengths)  # as given: 6.5 or True is not a token count, and is not rounded to one
        lengths = given.long()
        if (given.dtype == torch.bool or given.is_floating_point() or given.is_complex() or given.dim() != 1
                or not sequences or int(lengths.sum()) != tokens or int(lengths.min()) < 0):
            raise ValueError(f"lengths must be integer token counts that add up to the {tokens} tokens, "
                             f"got {given.tolist()}")
        if not (_plain_call(self.model, {}) and not self.model.first_token_only and tokens > 0
                and max(tokens, sequences) <= self.buckets[-1] and sequences <= self.max_sequences):
            return None
        sizes = table_sizes(self.model.config, self.model.embeddings)
        extremes = [int(v) for t in (input_ids, token_type_ids) for v in torch.aminmax(t)]
        if (int(lengths.max()) > min(self.max_seqlen, sizes.max_position_embeddings)
                or validation.refused(extremes, [sizes.vocab_size, sizes.type_vocab_size])):
            return None
        offsets = torch.zeros(sequences + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=offsets[1:])
        positions = torch.arange(tokens) - torch.repeat_interleave(offsets[:-1].long(), lengths, output_size=tokens)
        with torch.no_grad(), _on_device(self.device, self.capture), self._serialized():
            bucket = self._bucket(max(tokens, sequences))
            host = torch.zeros(3, bucket.tokens, dtype=torch.long)  # past `tokens`: index 0, always in range
            host[:, :tokens] = torch.stack([input_ids, positions, token_type_ids])
            cu_seqlens = torch.cat([offsets, self._tail_offsets(tokens, sequences, bucket)])
            for static, value in ((bucket.indices, host), (bucket.cu_seqlens, cu_seqlens)):
                static.copy_(value.pin_memory() if self.capture else value, non_blocking=True)
            if bucket.graph is None:
                return self._encode(bucket)[:tokens]
            bucket.graph.replay()
            return bucket.output[:tokens].clone()  # the next replay overwrites the static output

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *args,
                 **kwargs) -> BaseModelOutputWithPoolingAndCrossAttentions:
        # What the graphs cannot take runs as a plain model call (autograd and all; the model's further
        # positional arguments, inputs_embeds first); the replay path runs without autograd, and its
        # outputs are ordinary tensors (not inference tensors).
        eager = functools.partial(self.model, input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
        # first_token_only set on the model: its last layer and output shape differ from the graphs'.
        if (args or not _plain_call(self.model, kwargs, ("cu_seq_lens_q", "max_length_q"))
                or self.model.first_token_only):
            return eager()
        with torch.no_grad(), _on_device(self.device, self.capture), self._serialized():
            output = self._replay(input_ids, attention_mask, token_type_ids, position_ids, kwargs)
        return eager() if output is None else output

    def _unpad_in_one_op(self, input_ids, attention_mask, token_type_ids, sizes):
        """A padded batch with an integer or bool mask (what a tokenizer gives), unpadded and checked by
        ``pack_padded_batch`` (two launches on a GPU) and one read-back, where check_inputs' packing and
        checks take a composition of small launches (which small batches wait on) and the same one sync.
        None where it does not apply or a value is out of range (check_inputs then takes the batch, and
        raises)."""
        if (attention_mask is None or not _integer_padded_batch(input_ids, attention_mask, token_type_ids)
                or input_ids.numel() > ONE_OP_UNPAD_POSITIONS
                or input_ids.shape[1] > sizes.max_position_embeddings):
            return None
        batch, seqlen = input_ids.shape
        packed, limits = validation.pack_padded_ids(sizes, input_ids, attention_mask, token_type_ids)
        real = packed.packing.cu_seqlens[:batch + 1]  # then the padding's pieces, which a replay has its own of
        tokens, longest, *extremes = torch.cat([real[-1:], real.diff().amax(0, keepdim=True), packed.extremes]).tolist()
        if validation.refused(extremes, limits):
            return None
        packing = ops.Packing(packed.packing.indices[:tokens], real, longest, batch, seqlen)
        return validation.ModelInputs(packed.input_ids[:tokens], None, packed.position_ids[:tokens],
                                      packed.token_type_ids[:tokens], packing)

    def _replay(self, input_ids, attention_mask, token_type_ids, position_ids, kwargs):
        """The output through a bucket's graph, or None when the batch fits no bucket."""
        sizes = table_sizes(self.model.config, self.model.embeddings)
        inputs = None
        if position_ids is None and not kwargs:
            inputs = self._unpad_in_one_op(input_ids, attention_mask, token_type_ids, sizes)
        if inputs is None:
            inputs = check_inputs(sizes, input_ids, attention_mask, token_type_ids, position_ids, None,
                                  kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
        packing = inputs.packing
        tokens, sequences = packing.num_tokens, packing.cu_seqlens.numel() - 1
        fits = (max(tokens, sequences) <= self.buckets[-1] and sequences <= self.max_sequences
                and packing.max_seqlen <= self.max_seqlen)
        if not fits or tokens == 0:
            return None
        bucket = self._bucket(max(tokens, sequences))  # its sequence slots: min(max_sequences, its tokens)
        # Checked above, so copying into the static buffers is all that is left: no host sync. The rows
        # past `tokens` keep indices already validated (their outputs are never read). One launch for
        # the three rows where their dtypes match (a foreach copy), as the padded runner copies.
        torch._foreach_copy_([bucket.input_ids[:tokens], bucket.position_ids[:tokens], bucket.token_type_ids[:tokens]],
                             [inputs.input_ids, inputs.position_ids, inputs.token_type_ids])
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


class _PaddedBucket:
    """Static padded buffers of one (batch, seqlen) bucket, and its graph once captured."""

    @torch.inference_mode(False)  # as _Bucket's
    def __init__(self, batch: int, seqlen: int, device):
        self.shape = (batch, seqlen)
        self.input_ids = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        self.attention_mask = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        self.token_type_ids = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        self.outputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.storages: list = []  # what the graph reads besides the weights (fused_storages)


class PaddedCUDAGraphRunner(_GraphRunner):
    """Runs ``model`` (a fastbert.BertModel in eval mode) through CUDA graphs of the whole forward on
    padded batches: one graph per (batch, seqlen) bucket, taking ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` as they come.

    :class:`CUDAGraphRunner` validates and unpads each batch eagerly with a host sync before its
    replay (about 30 small launches until it unpadded a tokenizer's batch in one op): on the H200
    run (2026-11-26) that work, not the replay, set the 1x128 time (0.99 ms). Here the graph holds it
    all: the sync-free static-size unpadding that torch.compile uses (the padding is computed on,
    never read), the value checks (read back after the replay, one sync; a bad value re-runs the
    batch eagerly, which raises the model's own error), re-padding and
    the pooler. A call copies three tensors in and slices two out. The price: the padding positions of
    a bucket are computed on, so batches with much padding are cheaper through CUDAGraphRunner.

    ``batch_buckets``: batch sizes with a graph (a batch takes the smallest that holds it; its extra rows
    are fully masked). Sequence lengths are rounded up to a multiple of ``seqlen_step``, up to
    ``max_seqlen`` (default: the model's max_position_embeddings). Anything else (larger batches,
    ``position_ids``, ``output_attentions``, float masks, ...) runs the model eagerly. Weights: as for
    :class:`CUDAGraphRunner`; what else a graph fixes at capture (the vocabulary sizes its checks use,
    ``first_token_only``, ``FASTBERT_BACKEND``) also needs a new runner when it changes.
    """

    def __init__(self, model, batch_buckets=(1, 2, 4, 8, 16, 32, 64), seqlen_step: int = 32,
                 max_seqlen: int | None = None, capture: bool | None = None):
        super().__init__(model, capture)
        self.batch_buckets = sorted(batch_buckets)
        self.seqlen_step = seqlen_step
        # A bucket never outgrows the position table (longer input runs eagerly, and fails there).
        positions = model.config.max_position_embeddings
        self.max_seqlen = min(int(max_seqlen or positions), positions)

    def _forward(self, bucket: _PaddedBucket):
        """The captured work: the value checks of what the static buffers hold, and the model on them
        in its static forms (which clamp every lookup into its table: a batch that fails a check is
        thrown away, but its lookups must not read outside a table)."""
        with validation.static_forms() as checks:
            out = self.model(bucket.input_ids, attention_mask=bucket.attention_mask,
                             token_type_ids=bucket.token_type_ids)
        if checks.extremes is None:  # the bucket's integer mask always has them
            raise RuntimeError("the model's forward left no value checks for the graph to read back")
        return out.last_hidden_state, out.pooler_output, checks.extremes, checks.limits

    def _bucket(self, batch: int, seqlen: int) -> _PaddedBucket:
        shape = (self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch)],
                 min(-(-seqlen // self.seqlen_step) * self.seqlen_step, self.max_seqlen))
        bucket = self._buckets.get(shape)
        if bucket is None:
            bucket = _PaddedBucket(*shape, self.device)
            if self.capture:
                bucket.graph, bucket.outputs = capture_graph(lambda: self._forward(bucket), self._pool)
                bucket.storages = self._keep_storages(self.model)
            self._buckets[shape] = bucket  # only once captured: a failed capture is retried, not run eagerly
        return bucket

    def _takes(self, input_ids, attention_mask, token_type_ids, kwargs) -> bool:
        """Whether the graphs take this call (else the model runs it eagerly, and raises what it raises)."""
        if not _plain_call(self.model, kwargs) or not _integer_padded_batch(input_ids, attention_mask, token_type_ids,
                                                                             self.device):
            return False
        batch, seqlen = input_ids.shape
        return batch <= self.batch_buckets[-1] and seqlen <= self.max_seqlen

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *args,
                 **kwargs) -> BaseModelOutputWithPoolingAndCrossAttentions:
        # The graphs count positions by column: position_ids, like the model's further positional
        # arguments (inputs_embeds first), run the model eagerly.
        if args or position_ids is not None or not self._takes(input_ids, attention_mask, token_type_ids, kwargs):
            return self.model(input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
        # Ordinary tensors, not inference tensors; one call at a time (see _GraphRunner).
        with torch.no_grad(), _on_device(self.device, self.capture), self._serialized():
            return self._replay(input_ids, attention_mask, token_type_ids)

    def _replay(self, input_ids, attention_mask, token_type_ids) -> BaseModelOutputWithPoolingAndCrossAttentions:
        batch, seqlen = input_ids.shape
        bucket = self._bucket(batch, seqlen)
        # The mask is rewritten whole (positions past this batch are padding); ids and token types only
        # where the mask is 1, since padding is never looked up. A batch of the bucket's shape writes
        # every position anyway, and its copies are one launch where their dtypes match (a foreach copy
        # of contiguous tensors): at batch 1 each launch is a few percent of the call.
        if (batch, seqlen) != bucket.shape:
            bucket.attention_mask.zero_()
        mask, types = bucket.attention_mask[:batch, :seqlen], bucket.token_type_ids[:batch, :seqlen]
        targets, sources = [bucket.input_ids[:batch, :seqlen]], [input_ids]
        if attention_mask is None:
            mask.fill_(1)
        else:
            targets.append(mask)
            sources.append(attention_mask)
        if token_type_ids is None:
            types.zero_()
        else:
            targets.append(types)
            sources.append(token_type_ids.expand(batch, seqlen))
        torch._foreach_copy_(targets, sources)
        if bucket.graph is not None:
            bucket.graph.replay()
            hidden, pooled, extremes, limits = bucket.outputs
        else:
            hidden, pooled, extremes, limits = self._forward(bucket)
        # The copies out (the next replay overwrites the static outputs) are queued before the read-back
        # waits for the replay, so that the host launches them while the GPU runs the graph.
        hidden = (hidden[:batch, :seqlen] if hidden.shape[1] == bucket.shape[1] else hidden[:batch]).clone()
        pooled = None if pooled is None else pooled[:batch].clone()
        if validation.refused(extremes.tolist(), limits):  # one sync: a value is out of range; the model says which
            self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            raise RuntimeError("a value check failed in the CUDA graph but not in the eager model")
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)
