"""fastbert's fused ops: one module per op, each with its PyTorch reference beside the fast path."""

from .attention import varlen_attention, varlen_attention_reference, varlen_attention_with_probs
from .backend import backend_setting, gemm_setting, use_backend, use_gemm
from .bias_activation import activation_kind, bias_activation, bias_activation_reference
from .bias_residual_layer_norm import bias_residual_layer_norm, bias_residual_layer_norm_reference
from .embeddings import embeddings, embeddings_reference
from .linear_activation import linear_activation, linear_activation_reference
from .pack_padded_batch import PackedBatch, pack_padded_batch, pack_padded_batch_reference
from .padding import Packing, pack, pad, static_unpad_input, unpad_input

__all__ = [
    "Packing", "activation_kind", "backend_setting", "bias_activation", "bias_activation_reference",
    "bias_residual_layer_norm", "bias_residual_layer_norm_reference", "embeddings", "embeddings_reference",
    "PackedBatch", "gemm_setting", "linear_activation", "linear_activation_reference", "pack", "pack_padded_batch",
    "pack_padded_batch_reference", "pad", "static_unpad_input",
    "unpad_input", "use_backend", "use_gemm", "varlen_attention", "varlen_attention_reference",
    "varlen_attention_with_probs",
]
