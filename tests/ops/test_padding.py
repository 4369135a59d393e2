"""Unpadding and re-padding (fastbert/ops/padding.py): the static-size form that torch.compile and the
padded CUDA-graph runner use, checked against the exact (host-synced) form it stands in for."""

import pytest
import torch

from fastbert.ops.padding import Packing, pack, pad, static_unpad_input, unpad_input
from tests.model_utils import make_mask

MASK_KINDS = ["right", "left", "holes", "fully_masked_row", "none"]
SHAPES = [(1, 1), (1, 128), (3, 7), (4, 33), (2, 2500)]  # the last: past the small-sort path on a GPU


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_static_unpad_carries_the_real_tokens_first_then_padding_in_short_sequences(kind, shape, mask_dtype):
    batch, seqlen = shape
    mask = make_mask(kind, batch, seqlen, torch.Generator().manual_seed(batch * seqlen)).to(mask_dtype)
    exact = unpad_input(mask, batch, seqlen, "cpu")
    static = static_unpad_input(mask, batch, seqlen)
    total = int(mask.bool().sum())
    # Every position once; the real ones first, in the exact form's order.
    assert static.indices.shape == (batch * seqlen,)
    assert torch.equal(static.indices.sort().values, torch.arange(batch * seqlen))
    real = exact.indices if exact.indices is not None else torch.arange(batch * seqlen)
    assert torch.equal(static.indices[:total], real)
    assert static.valid.dtype == torch.bool and torch.equal(static.valid, torch.arange(batch * seqlen) < total)
    # The real sequences as in the exact form, then the padding in pieces of at most seqlen tokens.
    cu = static.cu_seqlens
    assert cu.dtype == torch.int32 and cu.shape == (2 * batch + 1,)
    assert torch.equal(cu[: batch + 1], exact.cu_seqlens)
    pieces = cu[batch:].diff()
    assert int(cu[-1]) == batch * seqlen and bool((pieces >= 0).all()) and bool((pieces <= seqlen).all())
    assert static.max_seqlen == seqlen and static.num_tokens == batch * seqlen


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_pad_of_the_static_form_restores_the_input_with_zeros_at_padding(kind):
    batch, seqlen, hidden = 4, 9, 5
    mask = make_mask(kind, batch, seqlen)
    x = torch.randn(batch, seqlen, hidden)
    packing = static_unpad_input(mask, batch, seqlen)
    packed = pack(x, packing)
    packed[~packing.valid] = float("nan")  # what the encoder computes at padding is never read
    out = pad(packed, packing)
    keep = mask.bool()[..., None]
    assert torch.equal(out, torch.where(keep, x, 0.0))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_pad_of_the_static_form_passes_gradients_to_real_tokens_only(kind):
    """The static form's re-padding writes each position once into a new tensor (no zero fill):
    gradients still reach the packed rows, real ones only."""
    batch, seqlen, hidden = 3, 6, 4
    mask = make_mask(kind, batch, seqlen)
    packing = static_unpad_input(mask, batch, seqlen)
    packed = torch.randn(batch * seqlen, hidden, requires_grad=True)
    weight = torch.randn(batch, seqlen, hidden)
    (pad(packed, packing) * weight).sum().backward()
    want = torch.where(packing.valid[:, None], weight.reshape(-1, hidden)[packing.indices], 0.0)
    assert torch.equal(packed.grad, want)


def test_shapes_that_do_not_match_the_packing_are_refused():
    """A mask of another shape than the batch, an input of another [batch, seqlen], packed rows of
    another count: each would put tokens in the wrong places (or index past the input)."""
    mask = make_mask("right", 2, 4)
    with pytest.raises(ValueError, match=r"attention_mask \(2, 4\) is not the \[batch, seqlen\] = \[2, 3\]"):
        unpad_input(mask, 2, 3, "cpu")
    with pytest.raises(ValueError, match=r"attention_mask \(2, 4\) is not the"):
        static_unpad_input(mask, 3, 4)
    packing = unpad_input(mask, 2, 4, "cpu")
    with pytest.raises(ValueError, match=r"pack: x \(4, 2\) does not start with the packing's \[batch, seqlen\]"):
        pack(torch.randn(4, 2), packing)
    with pytest.raises(ValueError, match=f"pad: packed \\(1, 3\\) must have one row per packed token \\({packing.num_tokens}\\)"):
        pad(torch.randn(1, 3), packing)
    with pytest.raises(ValueError, match=r"pad: packed \(\) must have one row per packed token"):
        pad(torch.tensor(1.0), packing)  # a 0-d tensor has no rows at all


@pytest.mark.parametrize("lengths", [[4, 5, 0], [4, 0, 5], [0, 9], [9, 0, 0]], ids=str)
def test_first_tokens_of_caller_packed_sequences_stay_inside_the_rows(lengths):
    """One input row packed by the caller into several sequences (no indices): the first token of each
    sequence, and whether it has one. An empty sequence at the end starts at the number of rows,
    past the last: its start must still index a row (its pooled vector is zeroed, never read)."""
    seqlen, hidden = sum(lengths), 4
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packing = Packing(None, cu, max(lengths), 1, seqlen)
    starts, real = packing.first_tokens()
    assert real.tolist() == [n > 0 for n in lengths]
    assert starts.dtype == torch.long and bool(((starts >= 0) & (starts < packing.num_tokens)).all()), starts
    assert torch.equal(starts[real], cu[:-1].long()[real])
    x = torch.randn(seqlen, hidden)
    pooled = torch.where(real[:, None], x[starts], 0.0)  # what the pooler gathers
    want = torch.stack([x[int(s)] if n else torch.zeros(hidden) for s, n in zip(cu[:-1], lengths)])
    assert torch.equal(pooled, want)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("seqlen", [0, 1, 5])
def test_an_empty_batch_with_a_mask_packs_no_tokens(seqlen, mask_dtype):
    """A batch of 0 rows with its (empty) mask: the same packing as without one (no token, one offset,
    every token kept), and pack / pad pass the empty tensors through."""
    mask = torch.ones(0, seqlen, dtype=mask_dtype)
    packing = unpad_input(mask, 0, seqlen, "cpu")
    plain = unpad_input(None, 0, seqlen, "cpu")
    assert packing.indices is None and packing.num_tokens == 0 and packing.max_seqlen == plain.max_seqlen == 0
    assert (packing.batch, packing.seqlen) == (0, seqlen)
    assert packing.cu_seqlens.dtype == torch.int32 and packing.cu_seqlens.tolist() == plain.cu_seqlens.tolist() == [0]
    assert pack(torch.randn(0, seqlen, 3), packing).shape == (0, 3)
    assert pad(torch.randn(0, 3), packing).shape == (0, seqlen, 3)


def test_rows_of_no_positions_pack_no_tokens():
    """Rows of seqlen 0, exact and static forms: every offset is 0 (the offsets of full rows and of the
    static form's padding step by seqlen)."""
    for packing in (unpad_input(None, 3, 0, "cpu"), static_unpad_input(torch.zeros(3, 0), 3, 0)):
        assert packing.num_tokens == 0 and set(packing.cu_seqlens.tolist()) == {0}
        assert packing.cu_seqlens.dtype == torch.int32
