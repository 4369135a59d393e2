"""``fastbert.optimize``: put fastbert's encoder into an existing transformers or
sentence-transformers model, sharing its weights."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from .modeling_bert import BertModel


def to_fastbert(hf_model: transformers.BertModel) -> BertModel:
    """A fastbert.BertModel that shares every module (and so every weight) of a transformers one.

    Modules are shared, not copied: optimizers, tied weights, PEFT adapters on query / value and
    later ``.to()`` calls keep working on the same parameters.
    """
    with torch.device("meta"):  # the skeleton only; its leaves are replaced below
        model = BertModel(hf_model.config, add_pooling_layer=hf_model.pooler is not None)
    for name, leaf in list(model.named_modules()):
        if name and not any(True for _ in leaf.children()):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, hf_model.get_submodule(name))
    for name in ("position_ids", "token_type_ids"):
        buffer = getattr(hf_model.embeddings, name, None)
        if buffer is None:  # versions of transformers without these buffers
            buffer = getattr(_fresh_buffers(hf_model), name)
        model.embeddings.register_buffer(name, buffer, persistent=False)
    model.train(hf_model.training)
    return model


def _fresh_buffers(hf_model) -> nn.Module:
    device = hf_model.embeddings.word_embeddings.weight.device
    holder = nn.Module()
    positions = torch.arange(hf_model.config.max_position_embeddings, device=device).expand((1, -1))
    holder.position_ids, holder.token_type_ids = positions, torch.zeros_like(positions)
    return holder


# Heads that read only the pooled [CLS] output: their encoder's last layer computes only [CLS] rows.
_POOLED_HEADS = ("BertForSequenceClassification", "BertForMultipleChoice", "BertForNextSentencePrediction")


def _is_transformers_bert(module) -> bool:
    return isinstance(module, transformers.BertModel) and not isinstance(module, BertModel)


def optimize(model: nn.Module) -> nn.Module:
    """Swap fastbert's BertModel into ``model`` in place and return it.

    Takes a ``sentence_transformers.SentenceTransformer`` (the encoder sits at ``model[0].model``
    in sentence-transformers 6, where ``auto_model`` is a read-only property, and at
    ``model[0].auto_model`` before), a transformers ``BertFor*`` model (at ``.bert``), or anything
    else holding a transformers ``BertModel`` as a submodule. A bare transformers ``BertModel``
    cannot change class in place: the fastbert model sharing its weights is returned instead.
    """
    if _is_transformers_bert(model):
        return to_fastbert(model)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if _is_transformers_bert(child):
                parent._modules[name] = to_fastbert(child)
                parent._modules[name].first_token_only = type(parent).__name__ in _POOLED_HEADS
                swapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not swapped:
        if any(isinstance(m, BertModel) for m in model.modules()):
            return model  # already optimized
        raise ValueError(f"fastbert.optimize found no transformers BertModel inside {type(model).__name__}")
    return model
