"""fastbert's BertModel: transformers' module tree and state-dict keys, computed on packed tokens.

The classes and attribute names follow transformers' ``modeling_bert.py`` so that checkpoints,
PEFT adapters and ``load_state_dict`` work unchanged; the fused ops in ``fastbert.ops`` do the work.
Padding is removed once after the input and restored once at the output: no matmul or attention
ever runs on a padded position.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
from torch import nn
from transformers import BertConfig, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.bert.modeling_bert import BertPreTrainedModel
from transformers.utils import logging

from . import ops
from .loading import check_loading_info, check_model_type
from .ops.encoder_layer import EncoderLayerWeights, encoder_layer, fast_path_ready, weights_ready
from .validation import check_config, check_inputs, table_sizes


def _called_as_defined(module: nn.Module) -> bool:
    """Whether calling ``module`` would just run its class's ``forward``: no forward hook or pre-hook,
    no ``forward`` replaced on the instance (accelerate's offloading hooks do that), no
    ``module.compile()``."""
    return (not module._forward_pre_hooks and not module._forward_hooks and "forward" not in module.__dict__
            and module._compiled_call_impl is None)


def _plain(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly a ``cls`` whose weight the fused ops may read directly: a
    registered weight parameter, called as defined. Anything else (an adapter's wrapper, pruning or the
    old weight_norm, whose pre-hook recomputes ``weight``, a hook that reads or changes the output, an
    instance whose ``forward`` was replaced) is called as a module, so it behaves as it does in
    transformers."""
    return type(module) is cls and _called_as_defined(module) and module._parameters.get("weight") is not None


def _linear_without_bias(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(x)`` split as (matmul, bias) so that the bias joins the next fused op; any other module
    (``_plain``) is called as it is, with no bias left over."""
    if _plain(module, nn.Linear):
        return nn.functional.linear(x, module._parameters["weight"]), module._parameters.get("bias")
    return module(x), None


class FusedQKV(NamedTuple):
    """Storage for one QKV GEMM's operands: the weight ``[3 * hidden, hidden]``, the bias
    ``[3 * hidden]``, and their six row blocks (query, key, value weight, then bias) that the modules'
    parameters are copied into."""

    weight: torch.Tensor
    bias: torch.Tensor
    blocks: list[torch.Tensor]

    @classmethod
    def like(cls, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> FusedQKV:
        """Storage shaped and typed as ``torch.cat(weights)`` and ``torch.cat(biases)``. Never an
        inference tensor (calls outside torch.inference_mode write into it too)."""
        rows = [w.shape[0] for w in weights]
        with torch.inference_mode(False):
            weight = weights[0].new_empty((sum(rows), *weights[0].shape[1:]), dtype=_promoted(weights))
            bias = biases[0].new_empty((sum(rows),), dtype=_promoted(biases))
        return cls(weight, bias, [*weight.split(rows), *bias.split(rows)])

    def fits(self, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> bool:
        """Whether this storage takes these parameters (same shapes, dtypes and device)."""
        return (all(b.shape == t.shape for b, t in zip(self.blocks, weights + biases))
                and self.weight.dtype == _promoted(weights) and self.bias.dtype == _promoted(biases)
                and self.weight.device == weights[0].device)


_capturing = ops.backend.capturing  # looked up at each call (tests stand in for a capture)


def _needs_autograd_or_tracing(tensors: list[torch.Tensor]) -> bool:
    """Autograd on (backward or forward mode), torch.compile tracing, or a tensor subclass among
    ``tensors`` (fake tensors, functional wrappers): where parameters must be used through ops, not
    copied into storage."""
    plain = ops.backend.PLAIN_TENSOR_TYPES
    return (torch.is_grad_enabled() or ops.backend.forward_ad_active() or torch.compiler.is_compiling()
            or any(type(t) not in plain for t in tensors))


def _cpu_inference(x: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """A 2-D plain CPU input and parameters of its dtype, without autograd, tracing or autocast (which
    casts F.linear's inputs, not those of a GEMM with ``out=``)."""
    return (x.device.type == "cpu" and x.dim() == 2 and type(x) in ops.backend.PLAIN_TENSOR_TYPES
            and not _needs_autograd_or_tracing(tensors) and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors))


def _promoted(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype ``torch.cat(tensors)`` returns."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _dropout_p(module: nn.Module) -> float:
    """The drop probability a fused op applies in place of calling ``module``: an ``nn.Dropout``'s
    (0 in eval mode), 0 for an ``nn.Identity`` (a dropout removed by replacing it)."""
    if type(module) is nn.Identity:
        return 0.0
    return module.p if module.training else 0.0


def _fusable_dropout(module: nn.Module) -> bool:
    """Whether a fused op may apply ``module``'s dropout itself (``_dropout_p``) rather than call it: an
    ``nn.Dropout`` or ``nn.Identity`` called as defined. Anything else (another class, a hook) is called
    as a module, as transformers calls it."""
    return type(module) in (nn.Dropout, nn.Identity) and _called_as_defined(module)


def _fusable_embedding(module: nn.Module) -> bool:
    """Whether the fused embeddings op may read ``module``'s table directly: a ``_plain`` nn.Embedding
    without the options that change a lookup or its gradient (``max_norm`` renormalizes rows in place,
    ``scale_grad_by_freq`` and ``sparse`` change the gradient), whose ``padding_idx`` row needs no
    gradient kept at zero (the op's backward would give it one: with autograd on its table, the
    lookup runs as ``nn.Embedding``). Looked up as a module, a table sees the packed tokens: its
    ``scale_grad_by_freq`` counts real tokens only (transformers' also counts padded positions)."""
    return (_plain(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq
            and not module.sparse
            and (module.padding_idx is None or not ops.backend.needs_autograd(module._parameters["weight"])))


def _no_global_hooks() -> bool:
    """No forward hook registered for every module (``register_module_forward_hook``): the module path
    calls BertAttention, BertSelfAttention, ... as modules, so such hooks see them."""
    hooks = nn.modules.module
    return not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm, over packed tokens."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # transformers' non-persistent buffers, kept so that code reading them works and checkpoints
        # that still store position_ids load as they do in transformers.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(self.position_ids.size(), dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids, position_ids, token_type_ids, inputs_embeds=None) -> torch.Tensor:
        if inputs_embeds is not None:
            _check_embeds_dtype(inputs_embeds, getattr(self.position_embeddings, "weight", None))
        if inputs_embeds is None and not _fusable_embedding(self.word_embeddings):
            # A wrapped, resized or hooked table, one with lookup options, or a padding row to keep
            # without gradient (training): looked up as a module.
            inputs_embeds = self.word_embeddings(input_ids)
        if not (_fusable_embedding(self.position_embeddings) and _fusable_embedding(self.token_type_embeddings)
                and _plain(self.LayerNorm, nn.LayerNorm)):
            # As transformers computes it, module by module, so that their hooks and wrappers run.
            if inputs_embeds is None:
                inputs_embeds = self.word_embeddings(input_ids)
            x = inputs_embeds + self.token_type_embeddings(token_type_ids)
            return self.dropout(self.LayerNorm(x + self.position_embeddings(position_ids)))
        fused_dropout = _fusable_dropout(self.dropout)
        out = ops.embeddings(
            input_ids, position_ids, token_type_ids,
            self.word_embeddings.weight if inputs_embeds is None else None,
            self.position_embeddings.weight, self.token_type_embeddings.weight,
            self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
            _dropout_p(self.dropout) if fused_dropout else 0.0, inputs_embeds=inputs_embeds,
            validate_indices=False,  # the model validated them at its boundary, once per batch
        )
        return out if fused_dropout else self.dropout(out)


def _check_embeds_dtype(inputs_embeds: torch.Tensor, table) -> None:
    """Refuse embeddings wider than the model's tables: added to them, they would promote the sum
    past the LayerNorm's dtype (a bare "mixed dtype" error from inside it, in transformers too)."""
    if isinstance(table, torch.Tensor) and torch.promote_types(inputs_embeds.dtype, table.dtype) != table.dtype:
        raise TypeError(f"inputs_embeds of dtype {inputs_embeds.dtype} are wider than the model's "
                        f"{table.dtype} embeddings: cast them to {table.dtype}, or the model to theirs")


class BertSelfAttention(nn.Module):
    _qkv_fused = None  # also for instances pickled before the attribute existed

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self._qkv_fused: FusedQKV | None = None  # not a buffer, so state-dict keys stay HF's

    def _qkv_parameters(self) -> list[torch.Tensor] | None:
        """The query, key and value weights, then their biases, or None when query / key / value are
        not plain Linear modules with a bias (wrapped by an adapter, say).

        Called once per layer and forward, so its host time counts for small eager batches: the
        modules and parameters are read from ``_modules`` and ``_parameters`` (``module.weight`` goes
        through nn.Module's Python ``__getattr__``)."""
        modules = self._modules  # self.query etc. go through nn.Module.__getattr__: ~1.2 us each
        linears = (modules["query"], modules["key"], modules["value"])
        for m in linears:
            if not _plain(m, nn.Linear) or m._parameters.get("bias") is None:
                return None
        return [m._parameters["weight"] for m in linears] + [m._parameters["bias"] for m in linears]

    def _fused_qkv_parameters(self, tensors: list[torch.Tensor] | None = None, copies: list | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``[3 * hidden, hidden]`` weight and ``[3 * hidden]`` bias of one QKV GEMM, or None where
        ``_qkv_parameters`` is None (``tensors``: what it returned, if the caller has it).

        Without autograd, the parameters are copied into this module's fused storage at every call:
        one launch (a foreach copy) where concatenating takes two. Nothing is cached across calls:
        fused optimizer steps (AdamW(fused=True), the transformers Trainer's default) and in-place
        writes through ``.data`` (PEFT's merge) change weights without bumping their version counters,
        so a cache keyed on them served stale weights. The storage keeps its address, so a CUDA graph
        records the copy and every replay reads the live weights. ``copies``: a list to append the copy
        to, as ``(storage blocks, parameters)``, for the caller to make with others in one launch."""
        tensors = self._qkv_parameters() if tensors is None else tensors
        if tensors is None:
            return None
        weights, biases = tensors[:3], tensors[3:]
        device = weights[0].device
        if _needs_autograd_or_tracing(tensors) or any(t.device != device for t in tensors):
            # Concatenate: with autograd on, so that gradients reach the three weights (and nothing a
            # backward saved is overwritten by a later call); under tracing and for tensor subclasses
            # (fake tensors, functional wrappers), as ops on them; across devices, to raise as the
            # module path does.
            return torch.cat(weights), torch.cat(biases)
        fused = self._qkv_fused
        if fused is None or not fused.fits(weights, biases):
            fused = self._qkv_fused = FusedQKV.like(weights, biases)
        if copies is None:
            torch._foreach_copy_(fused.blocks, tensors)
        else:
            copies.append((fused.blocks, tensors))
        return fused.weight, fused.bias

    def _apply(self, fn, recurse=True):
        # .to(), .half() and the like: the fused storage is made again for the converted weights
        # (a CUDA-graph runner keeps what its graphs read).
        self._qkv_fused = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # Pickling would turn the storage's blocks (views of its weight) into separate tensors: the
        # copies would then miss the weight the GEMM reads. It is made again at the next call.
        return {**super().__getstate__(), "_qkv_fused": None}

    def qkv_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]`` -> ``[tokens, 3 * hidden]`` (queries | keys | values)."""
        tensors = self._qkv_parameters()
        if tensors is None:
            return torch.cat([self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)], dim=-1)
        if _cpu_inference(hidden_states, tensors):
            # On a CPU, three GEMMs write the column blocks of one output: copying the weights into a
            # fused one at every call costs there as much as a small batch's GEMM.
            out = hidden_states.new_empty((hidden_states.shape[0], sum(w.shape[0] for w in tensors[:3])))
            start = 0
            for weight, bias in zip(tensors[:3], tensors[3:]):
                torch.addmm(bias, hidden_states, weight.t(), out=out[:, start:start + weight.shape[0]])
                start += weight.shape[0]
            return out
        return nn.functional.linear(hidden_states, *self._fused_qkv_parameters(tensors))

    def forward(self, hidden_states, packing: ops.Packing, output_attentions: bool = False):
        qkv = self.qkv_projection(hidden_states)
        args = (qkv, packing.cu_seqlens, packing.max_seqlen, self.num_attention_heads, self.scaling,
                _dropout_p(self.dropout))
        if output_attentions:  # offsets built and checked by the model
            return ops.varlen_attention_with_probs(*args, validate=False)
        return ops.varlen_attention(*args, validate=False), None


class BertSelfOutput(nn.Module):
    def __init__(self, config, input_size: int | None = None):
        super().__init__()
        self.dense = nn.Linear(input_size or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        x, bias = _linear_without_bias(self.dense, hidden_states)
        if not (_plain(self.LayerNorm, nn.LayerNorm) and _fusable_dropout(self.dropout)):
            # Wrapped, hooked or replaced: called as modules.
            return self.LayerNorm(self.dropout(x if bias is None else x + bias) + input_tensor)
        return ops.bias_residual_layer_norm(x, bias, input_tensor, self.LayerNorm.weight, self.LayerNorm.bias,
                                            self.LayerNorm.eps, _dropout_p(self.dropout))


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, packing, output_attentions=False, rows=None):
        context, probs = self.self(hidden_states, packing, output_attentions)
        if rows is not None:  # only these rows go on (every row was needed as a key and value)
            context, hidden_states = context[rows], hidden_states[rows]
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ops.activation_kind(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dense = self.dense
        if _plain(dense, nn.Linear):  # the matmul and its epilogue, fused or not (FASTBERT_GEMM)
            return ops.linear_activation(hidden_states, dense._parameters["weight"], dense._parameters.get("bias"),
                                         self.activation)
        return ops.bias_activation(dense(hidden_states), None, self.activation)  # wrapped, pruned or hooked


class BertOutput(BertSelfOutput):
    """The FFN's second matmul, then bias + residual + LayerNorm (as in BertSelfOutput)."""

    def __init__(self, config):
        super().__init__(config, input_size=config.intermediate_size)


class BertLayer(GradientCheckpointingLayer):
    """transformers' checkpointing layer: ``model.gradient_checkpointing_enable()`` recomputes each
    layer in backward instead of keeping its activations, as in transformers."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, packing, output_attentions=False, rows=None, fast_path=None, weights=None):
        """``fast_path``: the GEMM setting (``ops.backend.GEMMS``) when the encoder found the call eligible
        (``fast_path_ready``), saying which GEMM the FFN uses (anything else: off); the layer then
        launches its kernels from one function (``ops.encoder_layer``) if its own modules allow.
        ``weights``: what ``_fast_path_weights`` returned, when the encoder already read every layer's
        and checked them against its input (each layer's output has the layout of its input)."""
        if fast_path in ops.backend.GEMMS and not output_attentions:
            if weights is None:  # else read and checked by the encoder, against its input's layout
                weights = self._fast_path_weights()
                weights = weights if weights is not None and weights_ready(weights, hidden_states) else None
            if weights is not None:
                return encoder_layer(hidden_states, packing, weights, fast_path, rows), None
        attention_output, probs = self.attention(hidden_states, packing, output_attentions, rows)
        return self.output(self.intermediate(attention_output), attention_output), probs

    def _fast_path_weights(self, copies: list | None = None) -> EncoderLayerWeights | None:
        """What ``encoder_layer`` reads, or None where the module path must run: a sub-module of another
        class (a subclass, an adapter's wrapper), a sub-module not ``_called_as_defined`` (a hook, a
        replaced ``forward``), a Linear or LayerNorm that is not ``_plain``, a missing bias or
        LayerNorm affine, a hidden dropout that is not a ``_fusable_dropout``, or an active dropout.
        Reads ``_modules`` and ``_parameters`` directly (host time: this runs per layer and forward). ``copies``: as for
        ``_fused_qkv_parameters`` (the QKV weights' copy left to the caller)."""
        attention, intermediate, output = (self._modules[k] for k in ("attention", "intermediate", "output"))
        if type(attention) is not BertAttention or type(intermediate) is not BertIntermediate \
                or type(output) is not BertOutput:
            return None
        self_attention, self_output = attention._modules["self"], attention._modules["output"]
        if type(self_attention) is not BertSelfAttention or type(self_output) is not BertSelfOutput:
            return None
        for module in (attention, self_attention, self_output, intermediate, output):
            if not _called_as_defined(module):
                return None
        for module in (self_output, output):
            if not _fusable_dropout(module._modules["dropout"]) or _dropout_p(module._modules["dropout"]):
                return None
        if _dropout_p(self_attention._modules["dropout"]):
            return None
        linears = (self_output._modules["dense"], intermediate._modules["dense"], output._modules["dense"])
        norms = (self_output._modules["LayerNorm"], output._modules["LayerNorm"])
        for linear in linears:
            if not _plain(linear, nn.Linear) or linear._parameters.get("bias") is None:
                return None
        for norm in norms:
            if not _plain(norm, nn.LayerNorm) or norm._parameters.get("bias") is None:
                return None
        qkv = self_attention._fused_qkv_parameters(copies=copies)  # last: it copies (or queues a copy)
        if qkv is None:
            return None
        (attention_out, ffn_in, ffn_out), (norm1, norm2) = [m._parameters for m in linears], norms
        return EncoderLayerWeights(
            *qkv, self_attention.num_attention_heads, self_attention.scaling,
            attention_out["weight"], attention_out["bias"],
            (norm1._parameters["weight"], norm1._parameters["bias"], float(norm1.eps)),
            ffn_in["weight"], ffn_in["bias"], intermediate.activation,
            ffn_out["weight"], ffn_out["bias"],
            (norm2._parameters["weight"], norm2._parameters["bias"], float(norm2.eps)),
        )


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, packing, output_attentions=False, output_hidden_states=False,
                last_layer_rows=None):
        """``last_layer_rows``: packed indices of the only rows the caller reads; the last layer then
        computes just those after attention (which needs every row as a key and value)."""
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        # Checked once per forward; each layer then checks its own modules (BertLayer.forward).
        fast_path = None if output_attentions or not _no_global_hooks() else fast_path_ready(hidden_states, packing)
        # In CUDA-graph capture, every layer's QKV copy in one launch (replays run one kernel, not
        # twelve). Not in eager calls: reading every layer's weights first would hold back the first
        # launch by all layers' host work (measured on the H200: 32x512 took 8.5 ms against 7.8 ms
        # for the module path, whose host work overlaps the kernels).
        prepared = self._fast_path_weights(hidden_states) if fast_path and _capturing(hidden_states) else None
        for i, layer in enumerate(self.layer):
            rows = last_layer_rows if i == len(self.layer) - 1 else None
            if fast_path and type(layer) is BertLayer:  # a subclass keeps its own forward's signature
                hidden_states, probs = layer(hidden_states, packing, output_attentions, rows, fast_path=fast_path,
                                             weights=None if prepared is None else prepared[i])
            else:
                hidden_states, probs = layer(hidden_states, packing, output_attentions, rows)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)
        return hidden_states, all_hidden_states, all_attentions

    def _fast_path_weights(self, hidden_states: torch.Tensor) -> list[EncoderLayerWeights] | None:
        """Every layer's fast-path weights, their QKV copies made in one launch (a graph replay then
        runs one copy kernel, not one a layer), or None unless every layer takes the
        fast path with no hook of its own: nothing of the caller's can run between this copy and the
        layers' reads (a layer that may not runs the per-layer path, where each copies its own)."""
        prepared, copies = [], []
        for layer in self.layer:
            if type(layer) is not BertLayer or not _called_as_defined(layer):
                return None
            weights = layer._fast_path_weights(copies)
            if weights is None or not weights_ready(weights, hidden_states):
                return None
            prepared.append(weights)
        if copies:
            torch._foreach_copy_([b for blocks, _ in copies for b in blocks], [t for _, ts in copies for t in ts])
        return prepared


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


_silenced_loads = 0  # strict loads in flight, in any thread
_silenced_lock = threading.Lock()
_verbosity_before = None


@contextlib.contextmanager
def _transformers_report_silenced():
    """transformers' logging at ERROR while any strict load runs. Its level is global: the first load
    in saves it and the last one out restores it, so that loads in several threads never leave it at
    ERROR (each restoring what it saw on entry could restore another's ERROR last)."""
    global _silenced_loads, _verbosity_before
    with _silenced_lock:
        if _silenced_loads == 0:
            _verbosity_before = logging.get_verbosity()
            logging.set_verbosity_error()
        _silenced_loads += 1
    try:
        yield
    finally:
        with _silenced_lock:
            _silenced_loads -= 1
            if _silenced_loads == 0:
                logging.set_verbosity(_verbosity_before)


def _selected_hidden_states(output_hidden_states, count: int) -> set[int] | None:
    """The hidden states an ``output_hidden_states`` of an index or indices selects, as transformers
    reads it (negative ones from the end, those out of range select nothing; the others are None in
    the output), or None for a flag (all of them)."""
    if isinstance(output_hidden_states, bool) or output_hidden_states is None:
        return None
    picks = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {i % count for i in picks if -count <= i < count}


def _attentions_to_input_layout(probs: torch.Tensor, packing: ops.Packing) -> torch.Tensor:
    """``[sequences, heads, max_seqlen, max_seqlen]`` over packed positions -> ``[batch, heads, seqlen,
    seqlen]`` over the input's columns (holes, left padding and packed rows are spread back out)."""
    tokens = packing.num_tokens
    seq_idx, offset = ops.padding.sequence_positions(packing.cu_seqlens, tokens)
    token_at = torch.full(probs.shape[:1] + probs.shape[2:3], -1, dtype=torch.long, device=probs.device)
    token_at[seq_idx, offset] = torch.arange(tokens, device=probs.device)
    flat = packing.indices if packing.indices is not None else torch.arange(tokens, device=probs.device)
    row, column = flat // packing.seqlen, flat % packing.seqlen
    seq, i, j = torch.nonzero((token_at[:, :, None] >= 0) & (token_at[:, None, :] >= 0), as_tuple=True)
    query, key = token_at[seq, i], token_at[seq, j]
    out = probs.new_zeros(packing.batch, probs.shape[1], packing.seqlen, packing.seqlen)
    out[row[query], :, column[query], column[key]] = probs[seq, :, i, j]
    return out


class BertModel(BertPreTrainedModel):
    """Drop-in for ``transformers.BertModel`` (encoder use): same constructor, weights, forward
    arguments and outputs. Padded positions of ``last_hidden_state`` are zeros."""

    _no_split_modules = ["BertEmbeddings", "BertLayer"]
    _can_record_outputs = {}
    # The default of forward's first_token_only. A head that reads only the pooled [CLS] output
    # (sequence classification, multiple choice, next sentence) may set it on its encoder
    # (``head.bert.first_token_only = True``): the encoder then returns [batch, 1, hidden] to every
    # caller, which is why nothing sets it for the user.
    first_token_only = False

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        check_config(config)
        super().__init__(config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BertEmbeddings):  # transformers' version knows only its own class
            with torch.no_grad():
                module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
                module.token_type_ids.zero_()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        """transformers' ``from_pretrained``, stricter: a checkpoint of another model type is refused,
        and (with ``strict``, the default) weights missing from it or unknown to the model raise an
        error that names them instead of a warning."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):  # a config given as a path is the one to check
            check_model_type(pretrained_model_name_or_path if config is None else config, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        if strict:
            # Weights of another shape come back in the loading info (named, with both shapes, below)
            # instead of transformers' error, which points to the report silenced here.
            kwargs["ignore_mismatched_sizes"] = True  # strict raises on a mismatch anyway, naming it
        # With strict, the check below names every key; transformers' report would only repeat it.
        with _transformers_report_silenced() if strict else contextlib.nullcontext():
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        if strict:
            check_loading_info(model, info, pretrained_model_name_or_path)
        return (model, info) if want_info else model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        cache=None,
        first_token_only: bool | None = None,
        **kwargs,
    ):
        """transformers' BertModel.forward. Also takes packed input (``input_ids`` [1, total] with
        ``position_ids`` restarting at 0 per sequence, optionally ``cu_seq_lens_q`` / ``max_length_q``:
        what ``DataCollatorWithFlattening`` produces) and ``first_token_only``: the last layer then
        computes only the first token of each row (of each sequence, for packed input), and
        ``last_hidden_state`` is ``[batch, 1, hidden]`` (``[1, sequences, hidden]``)."""
        # encoder_hidden_states, encoder_attention_mask and use_cache are ignored, as transformers ignores
        # them without is_decoder / add_cross_attention (which check_config refuses). A cache would
        # shift transformers' positions: refused.
        for name, value in (("past_key_values", past_key_values), ("cache", cache)):
            if value is not None:
                raise NotImplementedError(f"fastbert.BertModel is an encoder: {name} (decoder use) is not supported")
        if kwargs.get("is_causal"):
            raise NotImplementedError("fastbert.BertModel is a bidirectional encoder: is_causal=True (causal "
                                      "attention) is not supported")
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "fastbert.BertModel cannot be traced with torch.jit.trace: it unpads each batch by its mask "
                "on the host, and a trace would freeze that (another mask or length would then give wrong "
                "numbers, silently). Use torch.compile or torch.export, or CUDAGraphRunner for graphs.")
        ops.backend_setting()  # an unknown FASTBERT_BACKEND fails here, before any work
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict

        first_token_only = self.first_token_only if first_token_only is None else first_token_only
        if output_attentions and torch.compiler.is_compiling():
            raise NotImplementedError("output_attentions=True is not supported under torch.compile")

        inputs = check_inputs(table_sizes(config, self.embeddings), input_ids, attention_mask, token_type_ids,
                              position_ids, inputs_embeds,
                              kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
        packing = inputs.packing
        # A batch without a real token has no first token to select: every row's is padding (zeros).
        select_first = first_token_only and packing.num_tokens > 0
        first_rows, first_is_real = packing.first_tokens() if select_first else (None, None)
        # With hidden states or attentions requested the last layer must compute every row anyway.
        last_layer_rows = None if output_hidden_states or output_attentions else first_rows
        hidden_states = self.embeddings(inputs.input_ids, inputs.position_ids, inputs.token_type_ids,
                                        inputs.inputs_embeds)
        hidden_states, all_hidden, all_probs = self.encoder(hidden_states, packing, output_attentions,
                                                            output_hidden_states, last_layer_rows)

        if first_token_only:
            if first_rows is None:
                first = hidden_states.new_zeros(packing.batch, hidden_states.shape[-1])
            else:
                first = hidden_states if last_layer_rows is not None else hidden_states[first_rows]
                first = torch.where(first_is_real[:, None], first, 0)  # a padded first position: zeros
            sequence_output = first.view(packing.batch, -1, first.shape[-1])
            pooled_output = self.pooler(first[:, None]) if self.pooler is not None else None
        else:
            sequence_output = ops.pad(hidden_states, packing)
            pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        if all_hidden is not None:
            selected = _selected_hidden_states(output_hidden_states, len(all_hidden))
            all_hidden = tuple(ops.pad(h, packing) if selected is None or i in selected else None
                               for i, h in enumerate(all_hidden))
        if all_probs is not None:
            all_probs = tuple(_attentions_to_input_layout(p, packing) for p in all_probs)
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden,
            attentions=all_probs,
            # transformers fills cross_attentions with () whenever attentions are requested, so its
            # tuple output has that element too; keep the same tuple length and order.
            cross_attentions=() if all_probs is not None else None,
        )
        return output if return_dict else output.to_tuple()
