"""Embeddings over packed tokens: word[id] + token_type[type] + position[pos], then LayerNorm.

The PyTorch reference adds in the order transformers' BertEmbeddings does, so fp32 results match it
to the last bits. Two fast backends compute the same thing in one pass over memory, sum and
statistics in fp32:

- ``cuda-extension``: ``torch.ops.fastbert.embedding_layer_norm`` from the C++/CUDA extension
  ``fastbert._C`` (csrc/; it also has a CPU kernel, used by tests), when it is built;
- ``triton``: ``torch.ops.fastbert.embedding_layer_norm_triton`` (kernels/embeddings.py), a
  ``torch.library.triton_op``.

Choice (``FASTBERT_BACKEND``, see backend.py): ``torch`` -> the reference; ``triton`` -> the Triton
kernel (CPU tensors only under ``TRITON_INTERPRET=1``); ``auto`` -> the extension on CUDA tensors if
it is built for this GPU, else the Triton kernel on CUDA tensors, else the reference. Calls that
record autograd history, use dropout, pass ``inputs_embeds``, or mix dtypes/devices the kernels do not
take, run the reference.

Indices outside their tables raise ``IndexError`` naming the value and the limit, never a device-side
assert. The kernels never read outside the tables whatever they are given (such rows come out NaN) and
flag them in a device int: on CUDA the check costs one 4-byte device-to-host copy after the kernel (a
sync). The reference is checked before it runs: on the host for CPU tensors, with one small reduction
(and a sync) for CUDA tensors. No check reads back while ``torch.compile`` traces, inside CUDA-graph
capture or on fake tensors: there bad indices give NaN rows (fast paths) instead of an exception.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension
from . import backend

OP = "fastbert::embedding_layer_norm"
TRITON_OP = "fastbert::embedding_layer_norm_triton"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TABLES = (("input_ids", "word embedding table"), ("position_ids", "position embedding table"),
           ("token_type_ids", "token type embedding table"))


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
    # A Python test: a SymFloat's comparison is no bool argument under dynamic shapes.
    return F.dropout(x, dropout_p) if dropout_p > 0 else x


# ------------------------------------------------------------------------------------------------
# The Triton op. Defined when triton is importable; TRITON_INTERPRET must be set before this module is
# imported for the kernel to run on CPU tensors (triton.jit reads it when the kernel is defined).

if backend.triton_available():
    from fastbert.kernels import embeddings as _kernels

    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def _embedding_layer_norm_triton(
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        word_weight: torch.Tensor,
        position_weight: torch.Tensor,
        token_type_weight: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [tokens, hidden], error_flag [1] int32)``: inputs as for the C++ op, contiguous;
        ``error_flag`` is 1 when some index was out of range (those rows of ``out`` are NaN). Shapes
        are checked as the function checks them (a short token-type row read past its end)."""
        _check_shapes(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                      ln_weight, ln_bias)
        out = word_weight.new_empty((input_ids.shape[0], word_weight.shape[1]))
        error_flag = torch.zeros(1, dtype=torch.int32, device=word_weight.device)
        # An interpreted kernel runs as it is (torch 2.11's wrap_triton refuses one, as the other ops know).
        interpreted = backend.is_interpreted(_kernels._embeddings_fwd_kernel)
        with backend.device_guard(word_weight):
            _kernels.embeddings_fwd(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                                    token_type_weight, ln_weight, ln_bias, eps, out, error_flag,
                                    launch=None if interpreted else torch.library.wrap_triton)
        return out, error_flag


# ------------------------------------------------------------------------------------------------
# Checks shared by the fast paths.

def raise_out_of_range(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                       token_type_weight) -> None:
    """Raise IndexError for the first index outside its table (host-side search: the error path).
    A None index tensor or table is skipped."""
    for (name, what), values, table in zip(_TABLES, (input_ids, position_ids, token_type_ids),
                                           (word_weight, position_weight, token_type_weight)):
        if values is None or table is None:
            continue
        limit = table.shape[0]
        values = values.detach().cpu()
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise IndexError(f"{OP}: {name}[{', '.join(map(str, where))}] = {int(values[where])} is out of "
                             f"range [0, {limit}) (the {what} has {limit} rows)")


def check_indices(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight) -> None:
    """IndexError for an index outside its table, before the reference runs (on CUDA an out-of-range
    F.embedding is a device-side assert that takes the CUDA context down). Host-side on CPU tensors; one
    small reduction and a sync on CUDA tensors; skipped where no sync is allowed. ``input_ids`` may be
    None (``inputs_embeds`` given); non-integer indices are left for the reference to refuse."""
    pairs = [(t, table) for t, table in ((input_ids, word_weight), (position_ids, position_weight),
                                         (token_type_ids, token_type_weight))
             if t is not None and table is not None
             and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)]
    if not pairs or not backend.may_read_back(pairs[0][0]):
        return
    bad = torch.stack([((t < 0) | (t >= table.shape[0])).any() for t, table in pairs])
    if bool(bad.any()):
        raise_out_of_range(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight)


def _reference_checked(*args) -> torch.Tensor:
    check_indices(*args[:6])
    return embeddings_reference(*args)


def _check_shapes(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                  ln_weight, ln_bias, inputs_embeds=None) -> None:
    """The shape rules of the C++ op, checked in Python before any path runs (the reference would
    broadcast some of them into a wrong answer): a ValueError naming the tensor. ``inputs_embeds``
    (``[tokens, hidden]``) stands in for the ids and the word table."""
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 2:
            raise ValueError(f"{OP}: inputs_embeds must be [tokens, hidden], got shape {tuple(inputs_embeds.shape)}")
        tokens, what = inputs_embeds.shape[:1], "inputs_embeds' rows"
    else:
        if input_ids is None or input_ids.dim() != 1:
            raise ValueError(f"{OP}: input_ids must be a 1-D tensor of packed tokens, got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        tokens, what = input_ids.shape, "input_ids"
    if position_ids.shape != tokens or token_type_ids.shape != tokens:
        raise ValueError(f"{OP}: {what}, position_ids and token_type_ids must have one entry per token, got "
                         f"shapes {tuple(tokens)}, {tuple(position_ids.shape)}, {tuple(token_type_ids.shape)}")
    sized = [("inputs_embeds", inputs_embeds, 2)] if inputs_embeds is not None else [("word_weight", word_weight, 2)]
    sized += [("position_weight", position_weight, 2), ("token_type_weight", token_type_weight, 2),
              ("ln_weight", ln_weight, 1), ("ln_bias", ln_bias, 1)]
    first, table, _ = sized[0]
    if table.dim() != 2:
        raise ValueError(f"{OP}: {first} must be 2-D with the hidden size last, got shape {tuple(table.shape)}")
    hidden = table.shape[1]
    for name, t, dim in sized[1:]:
        if t.dim() != dim or t.shape[-1] != hidden:
            raise ValueError(f"{OP}: {name} has shape {tuple(t.shape)} but the hidden size "
                             f"({first}.shape[1]) is {hidden}")
    if tokens[0]:  # a table without rows has nothing any index could look up
        tables = [("position_weight", position_weight), ("token_type_weight", token_type_weight)]
        for name, t in tables if inputs_embeds is not None else [("word_weight", word_weight), *tables]:
            if t.shape[0] == 0:
                raise ValueError(f"{OP}: {name} has no rows, so none of the {tokens[0]} tokens can be "
                                 f"looked up in it")


def _kernels_take(indices, floats) -> bool:
    """Whether the fast kernels take these tensors (else the reference runs and raises or promotes as
    PyTorch does): one float dtype they support, integer indices, one device."""
    dtype, device = floats[0].dtype, floats[0].device
    if dtype not in _KERNEL_DTYPES or any(t.dtype != dtype for t in floats):
        return False
    if any(t.is_floating_point() or t.is_complex() or t.dtype == torch.bool for t in indices):
        return False
    return all(t.device == device for t in (*indices, *floats))


# ------------------------------------------------------------------------------------------------
# Backend choice.

@torch.compiler.assume_constant_result
def _extension_usable_on(device_type: str, device_index: int) -> bool:
    """``_extension.usable_on``, a constant for torch.compile (it asks the CUDA runtime, once per GPU)."""
    return _extension.usable_on(torch.device(device_type, device_index) if device_index >= 0 else device_type)


def _choose(device: torch.device) -> str:
    name = backend.backend_setting()
    if name == "torch":
        return "torch"
    if name == "triton":
        return "triton"
    if device.type == "cuda":
        if _extension_usable_on("cuda", -1 if device.index is None else device.index):
            return "cuda-extension"
        if backend.triton_available():
            return "triton"
    return "torch"


def active_backend(device: torch.device | str) -> str:
    """What ``embeddings`` runs on tensors of ``device`` under the current backend setting (for an
    inference call: autograd, dropout and ``inputs_embeds`` always take the reference): ``"cuda-extension"``,
    ``"triton"`` or ``"torch"``. Under ``FASTBERT_BACKEND=triton`` it says ``"triton"`` even on CPU
    without ``TRITON_INTERPRET=1``, where ``embeddings`` raises and says so."""
    return _choose(torch.device(device))


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
    validate_indices: bool = True,
) -> torch.Tensor:
    """``[tokens]`` ids, positions and token types -> ``[tokens, hidden]`` normalized embeddings.

    The op is safe on its own: an index outside its table raises IndexError naming it (see the module
    docstring). ``validate_indices=False`` skips that check and its host sync, for callers that validated
    the indices already (the model does, once per batch); the kernels still never read outside a table.
    ``inputs_embeds`` (``[tokens, hidden]``) replaces the word lookup.
    """
    eps = backend.check_eps(eps, OP)
    backend.check_dropout(dropout_p, OP)
    _check_shapes(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                  ln_weight, ln_bias, inputs_embeds)
    args = (input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
            ln_weight, ln_bias, eps, dropout_p, inputs_embeds)
    reference = _reference_checked if validate_indices else embeddings_reference
    if dropout_p > 0 or inputs_embeds is not None or input_ids is None:
        return reference(*args)
    indices = (input_ids, position_ids, token_type_ids)
    floats = (word_weight, position_weight, token_type_weight, ln_weight, ln_bias)
    if backend.needs_autograd(*floats) or not _kernels_take(indices, floats):
        return reference(*args)
    choice = _choose(word_weight.device)
    if choice == "torch":
        return reference(*args)
    indices = tuple(t.long() for t in indices)
    if choice == "cuda-extension":
        # Bad input raises here, in Python, rather than from the C++ op: on one GPU image (issue 6) an
        # exception thrown by the extension crashed the process. The op checks again only where Python
        # could not read the indices back (torch.compile tracing).
        checked = validate_indices and backend.may_read_back(indices[0])
        if checked:
            check_indices(*indices, *floats[:3])
        return torch.ops.fastbert.embedding_layer_norm(*indices, *floats, float(eps), validate_indices and not checked)

    backend.use_triton(*floats)  # raises when the Triton path cannot run here (CPU without the interpreter)
    backend.check_kernel_runs_here(_kernels._embeddings_fwd_kernel, word_weight.device, word_weight.dtype)
    indices = tuple(t.contiguous() for t in indices)
    floats = tuple(t.contiguous() for t in floats)
    out, error_flag = torch.ops.fastbert.embedding_layer_norm_triton(*indices, *floats, float(eps))
    if validate_indices and backend.may_read_back(error_flag) and bool(error_flag.item()):
        raise_out_of_range(*indices, *floats[:3])
    return out
