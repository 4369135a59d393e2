"""Embeddings over packed tokens: word[id] + token_type[type] + position[pos], then LayerNorm.

The PyTorch reference adds in the order transformers' BertEmbeddings does, so fp32 results match it
to the last bits. Fast backends (the CUDA extension, a Triton kernel) plug in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def embeddings_reference(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    if inputs_embeds is None:
        inputs_embeds = F.embedding(input_ids, word_weight)
    x = inputs_embeds + F.embedding(token_type_ids, token_type_weight)
    x = x + F.embedding(position_ids, position_weight)
    x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return F.dropout(x, dropout_p, training=dropout_p > 0)


def embeddings(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[tokens]`` ids, positions and token types -> ``[tokens, hidden]`` normalized embeddings.

    Ids must already be validated (the model does it once per batch, on the host where it can);
    ``inputs_embeds`` (``[tokens, hidden]``) replaces the word lookup.
    """
    args = (input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
            ln_weight, ln_bias, eps, dropout_p, inputs_embeds)
    return embeddings_reference(*args)


def active_backend(device: torch.device | str) -> str:
    """What ``embeddings`` runs on tensors of ``device`` under the current backend setting."""
    return "torch"
