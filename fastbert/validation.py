"""Checks at the model's boundary: a bad config or input raises an exception that names the problem,
before any kernel could crash, assert on the device, or quietly compute garbage."""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch

from . import ops


def check_config(config) -> None:
    """Refuse what fastbert.BertModel does not implement, naming the feature."""
    model_type = getattr(config, "model_type", None)
    if model_type != "bert":
        raise ValueError(f"fastbert.BertModel runs BERT models (model_type 'bert'); this config is {model_type!r}")
    if getattr(config, "is_decoder", False):
        raise NotImplementedError("fastbert.BertModel is an encoder: is_decoder=True (decoder use) is not supported")
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("fastbert.BertModel is an encoder: add_cross_attention=True is not supported")
    if getattr(config, "is_causal", False):  # transformers' SDPA attention then masks future tokens
        raise NotImplementedError("fastbert.BertModel is a bidirectional encoder: is_causal=True (causal "
                                  "attention) is not supported")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise NotImplementedError(
            f"position_embedding_type={position_type!r} is not supported; fastbert implements 'absolute'"
        )
    ops.activation_kind(config.hidden_act)


class TableSizes(NamedTuple):
    """What check_inputs holds a batch to (it takes this or the config): the rows of the embedding
    tables the model looks up, which ``set_input_embeddings`` can make differ from the config's sizes
    (an id the table has is valid; one it lacks must be refused, never read past the table on a GPU),
    and the hidden size."""

    vocab_size: int
    type_vocab_size: int
    max_position_embeddings: int
    hidden_size: int


def table_sizes(config, embeddings) -> TableSizes:
    """The :class:`TableSizes` of a model's ``embeddings`` module: each table's rows (its 2-D
    ``weight``; through a wrapper, the ``get_base_layer()`` it wraps, as PEFT's do, or its
    ``num_embeddings``), else the config's size."""
    def rows(module, default: int) -> int:
        for _ in range(4):  # a wrapper of a wrapper at most a few deep
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return weight.shape[0]
            get_base_layer = getattr(module, "get_base_layer", None)
            inner = get_base_layer() if callable(get_base_layer) else None
            if inner is None or inner is module:
                break
            module = inner
        count = getattr(module, "num_embeddings", None)
        return count if isinstance(count, int) else default

    return TableSizes(rows(embeddings.word_embeddings, config.vocab_size),
                      rows(embeddings.token_type_embeddings, config.type_vocab_size),
                      rows(embeddings.position_embeddings, config.max_position_embeddings), config.hidden_size)


class StaticChecks:
    """What check_inputs leaves inside :func:`static_forms`, for the caller to read back after the work
    (the last forward's, if several ran inside): ``extremes``, an int64 tensor of the smallest and
    largest value of each range check (ids, token types and any given positions at real tokens, then
    the mask's values), and each pair's exclusive upper bound (``limits``); :func:`refused` says from
    them whether check_inputs would refuse the batch. ``extremes`` stays None for a float mask (a 0.5
    has no extreme outside [0, 1])."""

    def __init__(self):
        self.extremes: torch.Tensor | None = None
        self.limits: list[int] = []


# Per thread (and task): another thread's eager calls keep their value checks.
_STATIC_FORMS: contextvars.ContextVar[StaticChecks | None] = contextvars.ContextVar("fastbert_static_forms",
                                                                                   default=None)


@contextlib.contextmanager
def static_forms():
    """Inside, check_inputs takes the static-size, sync-free forms it takes under torch.compile and
    leaves the value checks (they need a host sync) to the caller: what capturing a whole forward in a
    CUDA graph needs. It yields a :class:`StaticChecks` that the forward fills with the batch's value
    extremes, for the caller to read back after the work; every lookup is clamped into its table
    meanwhile (a batch that fails the check is thrown away, but must read nothing outside a table)."""
    checks = StaticChecks()
    token = _STATIC_FORMS.set(checks)
    try:
        yield checks
    finally:
        _STATIC_FORMS.reset(token)


def _static() -> bool:
    return torch.compiler.is_compiling() or _STATIC_FORMS.get() is not None


class ModelInputs(NamedTuple):
    """A batch after validation, packed: every tensor has one row per kept token."""

    input_ids: torch.Tensor | None  # [tokens]
    inputs_embeds: torch.Tensor | None  # [tokens, hidden]
    position_ids: torch.Tensor  # [tokens]
    token_type_ids: torch.Tensor  # [tokens]
    packing: ops.Packing


# The lookups take int64 or int32 (what tokenizers give): uint8 or int16 ids would pass an "is
# integer" check and then fail inside the embedding with a message that names no tensor.
ID_DTYPES = (torch.int64, torch.int32)


def _check_integer(name: str, t: torch.Tensor) -> None:
    if t.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must hold integer ids (int64 or int32), got dtype {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, int], allow_broadcast_batch=False) -> None:
    ok = tuple(t.shape) == shape or (allow_broadcast_batch and tuple(t.shape) == (1, shape[1]))
    if not ok:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, but the input is {shape} (batch, seqlen)")


def _raise_out_of_range(name: str, packed: torch.Tensor, bad: torch.Tensor, limit: int, packing, what: str):
    token = int(torch.nonzero(bad)[0])
    flat = int(packing.indices[token]) if packing.indices is not None else token
    row, column = divmod(flat, packing.seqlen)
    raise ValueError(f"{name}[{row}, {column}] = {int(packed[token])} is out of range: {what} [0, {limit})")


def _packed_sequences(shape, attention_mask, position_ids, cu_seq_lens_q, max_length_q, device):
    """Packing of a ``[1, total]`` row that holds several sequences, the form of transformers'
    ``DataCollatorWithFlattening``: sequences given by ``cu_seq_lens_q`` or, as flash-attention
    models read it, by ``position_ids`` restarting at 0. None for an ordinary batch.

    Only positions of exactly that form are read as packed: starting at 0, each step +1 or back to 0,
    with at least one restart (and no attention_mask). Other positions with a 0 past column 0 (say
    ``[3, 2, 1, 0, 1, 2]``, or offsets of a window) are an ordinary row, as transformers' eager and
    SDPA attention compute it."""
    batch, total = shape
    compiling = _static()
    if cu_seq_lens_q is None:
        if batch != 1 or position_ids is None or attention_mask is not None or compiling or total < 2:
            return None
        positions = position_ids[0]
        restart = positions[1:] == 0
        other_step = ~(restart | (positions[1:] == positions[:-1] + 1))
        starts_at_0, restarts, other_steps = torch.stack(
            [positions[0] == 0, restart.any(), other_step.any()]).tolist()  # one sync
        if not starts_at_0 or not restarts or other_steps:
            return None
        restarts = torch.nonzero(restart).flatten() + 1
        cu_seq_lens_q = torch.cat([restarts.new_zeros(1), restarts, restarts.new_full((1,), total)])
    if batch != 1:
        raise ValueError(f"cu_seq_lens_q describes packed sequences in one row; input_ids must be [1, total], "
                         f"got {shape}")
    if cu_seq_lens_q.dim() != 1 or cu_seq_lens_q.is_floating_point() or cu_seq_lens_q.numel() < 2:
        raise ValueError(f"cu_seq_lens_q must be a 1-D integer tensor of offsets [0, ..., total], got "
                         f"{cu_seq_lens_q.dtype} of shape {tuple(cu_seq_lens_q.shape)}")
    cu_seqlens = cu_seq_lens_q.to(device=device, dtype=torch.int32)
    if compiling:  # no host sync while tracing: max_length_q is the static bound, trusted
        if max_length_q is None:
            raise ValueError("under torch.compile, packed input needs max_length_q (a static bound)")
        return ops.Packing(None, cu_seqlens, int(max_length_q), batch, total)
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("packed sequences (cu_seq_lens_q) take no padding: attention_mask must be all ones")
    longest = ops.padding.check_offsets(cu_seqlens, total, "cu_seq_lens_q", "tokens")
    if max_length_q is not None and int(max_length_q) < longest:
        raise ValueError(f"max_length_q={int(max_length_q)} is shorter than the longest packed sequence ({longest})")
    return ops.Packing(None, cu_seqlens, longest, batch, total)


def _range_checks(config, input_ids, token_type_ids, position_ids):
    """The range checks of a padded batch: [(name, values, limit, what)], one per given tensor."""
    return [(name, values, limit, what) for name, values, limit, what in (
        ("input_ids", input_ids, config.vocab_size, "the vocabulary is"),
        ("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings is"),
        ("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size is")) if values is not None]


def _mask_not_0_1(attention_mask: torch.Tensor) -> torch.Tensor:
    """True where an integer mask holds something other than 0 and 1 (a 0-dim tensor: no sync)."""
    return ((attention_mask != 0) & (attention_mask != 1)).any()


def _extremes(checks, keep: torch.Tensor | None) -> list[torch.Tensor]:
    """The smallest and largest value of each check's tensor at real tokens (padding read as 0, which
    every range takes), 0-dim: two kernels a check, where comparing with both bounds, masking and
    reducing take five (each launch costs an eager small batch host time)."""
    return [e for _, values, _, _ in checks
            for e in torch.aminmax(values if keep is None else torch.where(keep, values, 0))]


def _refused_at(extremes: list[int], limits: list[int]) -> int | None:
    """The index of the first read-back (smallest, largest) pair outside its ``[0, limit)``, or None."""
    for i, limit in enumerate(limits):
        if extremes[2 * i] < 0 or extremes[2 * i + 1] >= limit:
            return i
    return None


def _stacked(stats: list[torch.Tensor]) -> torch.Tensor:
    """0-dim integer tensors as one int64 tensor (read back, or kept in a graph, as one)."""
    return torch.stack([t.to(torch.int64) for t in stats])


def _host(stats: list[torch.Tensor]) -> list[int]:
    """0-dim tensors read back in one sync."""
    return _stacked(stats).tolist() if stats else []


def value_extremes(config, input_ids, attention_mask, token_type_ids=None,
                   position_ids=None) -> tuple[torch.Tensor, list[int]]:
    """Without a host sync, for a CUDA graph of the whole forward (which reads them back after the
    replay): an int64 tensor of the smallest and largest id, position and token type at real tokens
    and of the mask's values, and each pair's exclusive upper bound (the mask's: 2). ``refused`` says
    from them whether check_inputs would refuse the batch. Integer or bool masks only (a float mask's
    0.5 has no extreme outside [0, 1])."""
    if attention_mask is not None and attention_mask.is_floating_point():
        raise TypeError("value_extremes takes an integer or bool attention_mask")
    keep = attention_mask.bool() if attention_mask is not None else None
    checks = _range_checks(config, input_ids, token_type_ids, position_ids)
    stats, limits = _extremes(checks, keep), [limit for _, _, limit, _ in checks]
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        stats += torch.aminmax(attention_mask)
        limits.append(2)
    return _stacked(stats), limits


def refused(extremes: list[int], limits: list[int]) -> bool:
    """Whether ``value_extremes``' read-back values hold one outside its range."""
    return _refused_at(extremes, limits) is not None


def pack_padded_ids(sizes, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None) -> tuple[ops.PackedBatch, list[int]]:
    """``ops.pack_padded_batch`` of a padded batch of ids with an integer or bool mask (token types:
    none for zeros, or one row for every row), and the limits its extremes are read against
    (:func:`refused`): the vocabulary, the token types and the 0/1 mask."""
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    packed = ops.pack_padded_batch(input_ids, attention_mask, token_type_ids.expand(input_ids.shape),
                                   sizes.vocab_size, sizes.type_vocab_size)
    return packed, [sizes.vocab_size, sizes.type_vocab_size, 2]


def _checked_unpad(config, shape, device, attention_mask, input_ids, token_type_ids, position_ids) -> ops.Packing:
    """Validate a padded batch's values and unpad it with one host sync (on CUDA tensors every
    sync stalls the launch queue): the mask's 0/1 values, the ranges of ids, positions and token
    types at real tokens (padding is never looked up, so its ids do not matter), and the mask's
    statistics all come back in one ``tolist()``; only a batch that fails is searched for where."""
    batch, seqlen = shape
    if batch == 0:
        return ops.unpad_input(None, 0, seqlen, device)
    keep = attention_mask.bool() if attention_mask is not None else None
    checks = _range_checks(config, input_ids, token_type_ids, position_ids)
    stats = _extremes(checks, keep)
    if keep is not None:
        seqlens = keep.sum(dim=1)
        stats += [seqlens.max(), seqlens.sum()]
        if attention_mask.is_floating_point():
            stats.append(_mask_not_0_1(attention_mask))
        elif attention_mask.dtype != torch.bool:
            stats += torch.aminmax(attention_mask)  # an integer mask outside [0, 1] holds another value
    host = _host(stats)
    n = 2 * len(checks)
    if keep is not None and attention_mask.dtype != torch.bool:
        mask_stats = host[n + 2:]  # [found a value not 0 or 1] for a float mask, [smallest, largest] else
        if mask_stats[0] if len(mask_stats) == 1 else _refused_at(mask_stats, [2]) is not None:
            raise ValueError("attention_mask must hold only 0 and 1 (1 = a real token, 0 = padding)")
    failed = _refused_at(host, [limit for _, _, limit, _ in checks])
    if failed is not None:
        name, values, limit, what = checks[failed]
        bad = (values < 0) | (values >= limit)
        row, column = torch.nonzero(bad if keep is None else bad & keep)[0].tolist()
        raise ValueError(f"{name}[{row}, {column}] = {int(values[row, column])} is out of range: "
                         f"{what} [0, {limit})")
    if keep is None:
        return ops.unpad_input(None, batch, seqlen, device)
    longest, total = host[n:n + 2]
    return ops.padding.packing_of(keep, seqlens, longest, total, batch, seqlen, device)


def check_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                 cu_seq_lens_q=None, max_length_q=None) -> ModelInputs:
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("token_type_ids", token_type_ids), ("position_ids", position_ids),
                        ("inputs_embeds", inputs_embeds), ("cu_seq_lens_q", cu_seq_lens_q)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__} (torch.as_tensor makes one)")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        _check_integer("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seqlen], got shape {tuple(input_ids.shape)}")
        shape, device = tuple(input_ids.shape), input_ids.device
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seqlen, {config.hidden_size}], "
                             f"got shape {tuple(inputs_embeds.shape)}")
        if not inputs_embeds.is_floating_point():
            raise TypeError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}")
        shape, device = tuple(inputs_embeds.shape[:2]), inputs_embeds.device
    batch, seqlen = shape
    if seqlen == 0:  # batch 0 included: the pooler's first column does not exist either
        raise ValueError(f"the input has shape {shape}: every sequence is empty (seqlen 0)")

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 0/1 [batch, seqlen] mask, got shape "
                             f"{tuple(attention_mask.shape)}")
        _check_shape("attention_mask", attention_mask, shape)
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must be a 0/1 mask (bool, integer or floating point), got dtype "
                            f"{attention_mask.dtype}")
    if token_type_ids is not None:
        _check_integer("token_type_ids", token_type_ids)
        _check_shape("token_type_ids", token_type_ids, shape, allow_broadcast_batch=True)
        token_type_ids = token_type_ids.expand(shape)
    elif config.type_vocab_size < 1 and batch * seqlen:  # the default type 0 is looked up unchecked
        raise ValueError("token_type_ids default to 0, but the token type embedding table has no rows "
                         "(type_vocab_size 0)")
    if position_ids is not None:
        _check_integer("position_ids", position_ids)
        _check_shape("position_ids", position_ids, shape, allow_broadcast_batch=True)
        position_ids = position_ids.expand(shape)
    elif seqlen > config.max_position_embeddings:
        # Packed rows included: without position_ids, transformers counts positions by column across
        # the whole row, cu_seq_lens_q or not (each sequence restarting at 0 needs position_ids).
        raise ValueError(f"sequence length {seqlen} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings} of this model"
                         + (" (packed sequences restart at position 0 only with position_ids)"
                            if cu_seq_lens_q is not None else ""))

    packing = _packed_sequences(shape, attention_mask, position_ids, cu_seq_lens_q, max_length_q, device)
    checks = None if torch.compiler.is_compiling() else _STATIC_FORMS.get()
    if checks is not None:
        if (packing is None and input_ids is not None and attention_mask is not None and position_ids is None
                and not attention_mask.is_floating_point() and input_ids.numel() > 0):
            # A padded batch of ids (what PaddedCUDAGraphRunner captures): packing, lookups clamped and
            # value extremes in one op (two launches on a GPU, where the composition below is ~19).
            packed, checks.limits = pack_padded_ids(config, input_ids, attention_mask, token_type_ids)
            checks.extremes = packed.extremes
            return ModelInputs(packed.input_ids, None, packed.position_ids, packed.token_type_ids, packed.packing)
        if batch * seqlen == 0:  # nothing to look up, nothing to check
            checks.extremes, checks.limits = torch.zeros(0, dtype=torch.int64, device=device), []
        elif attention_mask is None or not attention_mask.is_floating_point():
            checks.extremes, checks.limits = value_extremes(config, input_ids, attention_mask, token_type_ids,
                                                            position_ids)
    ranges_checked = False
    if packing is None and _static():
        packing = (ops.static_unpad_input(attention_mask, batch, seqlen) if attention_mask is not None
                   else ops.unpad_input(None, batch, seqlen, device))
    elif packing is None:
        packing = _checked_unpad(config, shape, device, attention_mask, input_ids, token_type_ids, position_ids)
        ranges_checked = True
    tokens = packing.num_tokens
    columns = position_ids is None  # positions are the column indices: in range (seqlen was checked)
    if not columns:
        packed_positions = ops.pack(position_ids, packing)
    elif packing.indices is not None:
        packed_positions = packing.indices % seqlen  # one kernel, where gathering an arange takes two
    else:
        packed_positions = torch.arange(seqlen, device=device).repeat(batch)
    packed_types = (ops.pack(token_type_ids, packing) if token_type_ids is not None
                    else torch.zeros(tokens, dtype=torch.long, device=device))
    packed_ids = ops.pack(input_ids, packing) if input_ids is not None else None
    packed_embeds = ops.pack(inputs_embeds, packing) if inputs_embeds is not None else None
    if _static():
        # Range checks need a host sync. Inside static_forms (the padded CUDA-graph runner, which reads
        # value_extremes back after its replay) every lookup is clamped into its table. Under
        # torch.compile only the padding the static form carries is looked up as 0 (its ids never
        # matter): a bad value at a real token still fails the lookup's bounds check, as in compiled
        # transformers, rather than being clamped into a silently wrong answer.
        if checks is not None:  # inside static_forms (never under torch.compile: see above)
            if packed_ids is not None:
                packed_ids = packed_ids.clamp(0, config.vocab_size - 1)
            packed_types = packed_types.clamp(0, config.type_vocab_size - 1)
            if not columns:
                packed_positions = packed_positions.clamp(0, config.max_position_embeddings - 1)
        elif packing.valid is not None:
            packed_ids, packed_types = (None if t is None else torch.where(packing.valid, t, 0)
                                        for t in (packed_ids, packed_types))
            if not columns:
                packed_positions = torch.where(packing.valid, packed_positions, 0)
        return ModelInputs(packed_ids, packed_embeds, packed_positions, packed_types, packing)

    if ranges_checked:
        return ModelInputs(packed_ids, packed_embeds, packed_positions, packed_types, packing)
    # Packed input: one host sync for all range checks (each tensor's extremes); the search runs only
    # when something is wrong.
    checks = [("position_ids", packed_positions, config.max_position_embeddings, "max_position_embeddings is"),
              ("token_type_ids", packed_types, config.type_vocab_size, "type_vocab_size is")]
    if packed_ids is not None:
        checks.insert(0, ("input_ids", packed_ids, config.vocab_size, "the vocabulary is"))
    failed = _refused_at(_host(_extremes(checks, None)), [limit for _, _, limit, _ in checks]) if tokens else None
    if failed is not None:
        name, values, limit, what = checks[failed]
        _raise_out_of_range(name, values, (values < 0) | (values >= limit), limit, packing, what)
    return ModelInputs(packed_ids, packed_embeds, packed_positions, packed_types, packing)
