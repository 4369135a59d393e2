"""Bias + activation on ``[tokens, intermediate]``, the epilogue of BERT's first FFN matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend

# transformers' hidden_act name -> the activation the kernels compute. "gelu_new" and
# "gelu_pytorch_tanh" are the same tanh approximation, written two ways in transformers.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def activation_kind(hidden_act) -> str:
    """The kernel activation for a config's ``hidden_act``; a clear error for anything else."""
    if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS:
        raise NotImplementedError(
            f"hidden_act={hidden_act!r} is not supported by fastbert; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[hidden_act]


def bias_activation_reference(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    if bias is not None:
        x = x + bias
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; expected gelu, gelu_tanh or relu")


def bias_activation(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``activation(x + bias)``; ``activation`` is one of ``gelu`` (erf), ``gelu_tanh``, ``relu``."""
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match x of shape {tuple(x.shape)}")
    return bias_activation_reference(x, bias, activation)


def active_backend(device: torch.device | str) -> str:
    """What ``bias_activation`` runs on tensors of ``device`` under the current backend setting."""
    return "torch"
