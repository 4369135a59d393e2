"""Bias + residual + LayerNorm on ``[tokens, hidden]``: the end of each BERT sub-layer,
``LayerNorm(dropout(x + bias) + residual)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def bias_residual_layer_norm_reference(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    if bias is not None:
        x = x + bias
    x = F.dropout(x, dropout_p, training=dropout_p > 0)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, ln_bias, eps)


def bias_residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``LayerNorm(dropout(x + bias) + residual)`` over the last dimension, statistics in fp32."""
    if residual.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"x {tuple(x.shape)}, residual {tuple(residual.shape)} and LayerNorm weight "
                         f"{tuple(weight.shape)} do not match")
    return bias_residual_layer_norm_reference(x, bias, residual, weight, ln_bias, eps, dropout_p)


def active_backend(device: torch.device | str) -> str:
    """What ``bias_residual_layer_norm`` runs on tensors of ``device`` under the current backend setting."""
    return "torch"
