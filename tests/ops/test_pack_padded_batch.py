"""The static packing of a padded batch with its value checks: the Triton kernel against
``pack_padded_batch_reference`` (the PyTorch composition the padded CUDA-graph runner ran before).

- Under ``TRITON_INTERPRET=1`` on CPU tensors, in a child pytest process: every output equal to the
  reference's, element for element, with the launch helper's outputs pre-filled with a sentinel (an
  unwritten element fails): right / left padding, holes, fully masked rows, no padding, one position,
  batches of several blocks and of more blocks (and rows) than the second launch reads a step, int32
  ids, bool masks, masks of other integers, broadcast and strided inputs, out-of-range ids and token
  types at real tokens and at padding, int64's limits; nothing written past an output's end.
- On a GPU (skipped without one): the same cases.
- Here: the reference's own meaning (the static unpadding, the lookups and the extremes), the input
  checks, the backend choice and the registered schema.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastbert.ops import backend
from fastbert.ops.padding import static_unpad_input, unpad_input
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.helpers import interpreted_kernel_fixture, interpreter_parent_test, registered_schema_test
from tests.model_utils import make_mask

P = importlib.import_module("fastbert.ops.pack_padded_batch")
VOCAB, TYPES = 100, 3
NAMES = ("indices", "valid", "packed_ids", "packed_types", "positions", "cu_seqlens", "extremes")
MASK_KINDS = ["right", "left", "holes", "fully_masked_row", "none"]
# (4, 300) on: several blocks of positions; (300, 3): more rows than the kernel's padding-piece step.
SHAPES = [(1, 1), (1, 128), (3, 7), (4, 300), (2, 1100), (5, 1030), (300, 3)]
MANY_BLOCKS = (70, 1000)  # more blocks than the second launch reads counts a step (137 of 512 positions)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def make_batch(kind, batch, seqlen, seed=0, mask_dtype=torch.long, id_dtype=torch.long, out_of_range=False):
    """Random ids and token types (fresh each seed), a mask of ``kind``. ``out_of_range``: ids and types
    past both ends of their tables, at real tokens and at padding."""
    gen = torch.Generator().manual_seed(seed)
    low, high = (-5, VOCAB + 5) if out_of_range else (0, VOCAB)
    ids = torch.randint(low, high, (batch, seqlen), generator=gen).to(id_dtype)
    types = torch.randint(-1 if out_of_range else 0, TYPES + (2 if out_of_range else 0), (batch, seqlen),
                          generator=gen).to(id_dtype)
    return ids, make_mask(kind, batch, seqlen, gen).to(mask_dtype), types


GUARD = 3  # sentinel elements past each output's end, which the kernels must leave alone


def launch(ids, mask, types, device="cpu"):
    """The launch helper on outputs pre-filled with a sentinel: any element it does not write fails,
    and so does any it writes past an output's end (each is the head of a longer buffer)."""
    from fastbert.kernels.pack_padded_batch import pack_padded_batch_fwd

    n, batch = ids.numel(), ids.shape[0]
    buffers = (torch.full((n + GUARD,), -7, dtype=torch.int64, device=device),
               torch.ones(n + GUARD, dtype=torch.bool, device=device),
               *(torch.full((n + GUARD,), -7, dtype=torch.int64, device=device) for _ in range(3)),
               torch.full((2 * batch + 1 + GUARD,), -7, dtype=torch.int32, device=device),
               torch.full((6 + GUARD,), -7, dtype=torch.int64, device=device))
    outputs = tuple(b[:-GUARD] for b in buffers)
    valid = outputs[1]
    valid[: n // 2] = False  # a bool output cannot hold a sentinel: start it opposite to the answer's halves
    valid[n // 2:] = True
    pack_padded_batch_fwd(ids, mask, types, VOCAB, TYPES, outputs)
    for name, b in zip(NAMES, buffers):
        assert (b[-GUARD:] == (True if b.dtype == torch.bool else -7)).all(), f"{name} written past its end"
    return outputs


def assert_same(got, want, what):
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g.cpu(), w.cpu()), (what, name, g.cpu()[:16], w.cpu()[:16])


# ---------------------------------------------------------------------------------------------------
# Checks shared by the interpreter (CPU) and the GPU.

def case_matches_reference(device, kind, shape, mask_dtype, id_dtype, out_of_range):
    ids, mask, types = (t.to(device) for t in make_batch(kind, *shape, seed=sum(shape), mask_dtype=mask_dtype,
                                                         id_dtype=id_dtype, out_of_range=out_of_range))
    want = P.pack_padded_batch_reference(ids, mask, types, VOCAB, TYPES)
    assert_same(launch(ids, mask, types, device), want, f"{kind} {shape} {mask_dtype} {id_dtype}")
    with backend.use_backend("triton"):
        packed = P.pack_padded_batch(ids, mask, types, VOCAB, TYPES)
    got = packed.outputs()
    assert_same(got, want, f"op {kind} {shape}")


def case_more_blocks_than_a_step(device, kind):
    """A batch of more blocks than the second launch reads counts a step, its extremes only in the last
    block (past that step): an id, a token type and a mask value out of range at its last real tokens."""
    ids, mask, types = make_batch(kind, *MANY_BLOCKS, seed=5)
    mask[-1, -2:] = torch.tensor([1, 3])  # a mask of 3 counts as a real token, and as its largest value
    ids[-1, -1], types[-1, -2] = VOCAB + 7, -3
    ids, mask, types = ids.to(device), mask.to(device), types.to(device)
    want = P.pack_padded_batch_reference(ids, mask, types, VOCAB, TYPES)
    assert want[-1].tolist()[1::2] == [VOCAB + 7, TYPES - 1, 3]
    assert_same(launch(ids, mask, types, device), want, f"{kind} {MANY_BLOCKS}")


def case_extreme_values(device):
    """Masks of any integer (negative and large values count as real tokens, as in the reference) and
    ids, token types and mask values at int64's limits, at real tokens and at padding: the extremes
    come back exact, the lookups clamped."""
    ids, mask, types = make_batch("holes", 3, 600, seed=6)
    gen = torch.Generator().manual_seed(7)
    mask = mask * torch.randint(-3, 4, mask.shape, generator=gen)  # zeros stay padding
    least, most = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    ids[0, :2], types[1, :2], mask[2, 5] = torch.tensor([least, most]), torch.tensor([most, least]), most
    mask[0, :2] = mask[1, :2] = 1
    ids, mask, types = ids.to(device), mask.to(device), types.to(device)
    want = P.pack_padded_batch_reference(ids, mask, types, VOCAB, TYPES)
    assert want[-1].tolist()[:4] == [least, most, least, most] and want[-1].tolist()[5] == most
    assert_same(launch(ids, mask, types, device), want, "int64 limits, mask values -3 to 3")
    only_least = torch.full((2, 3), least, device=device)  # every value at the lowest: the highest is it too
    want = P.pack_padded_batch_reference(only_least, only_least, only_least, VOCAB, TYPES)
    assert want[-1].tolist() == [least] * 6
    assert_same(launch(only_least, only_least, only_least, device), want, "every value int64's lowest")


def case_broadcast_and_strided(device):
    """Token types broadcast from one row (row stride 0) and ids read from a wider buffer (row stride
    past the row's end) go to the kernel as they are; views whose columns are not adjacent (transposed,
    sliced every other column, broadcast from a column or from one element) through the op, which
    copies them first."""
    ids, mask, types = make_batch("holes", 4, 40, seed=3)
    wide = torch.randint(0, VOCAB, (4, 64))
    wide[:, :40] = ids
    strided, types_row = wide.to(device)[:, :40], types[:1].to(device).expand(4, 40)
    mask = mask.to(device)
    want = P.pack_padded_batch_reference(strided.contiguous(), mask, types_row.contiguous(), VOCAB, TYPES)
    assert_same(launch(strided, mask, types_row, device), want, "broadcast types, strided ids")
    ids, mask, types = (t.to(device) for t in make_batch("right", 4, 40, seed=4))
    for what, views in {
            "transposed ids and mask": (ids.t().contiguous().t(), mask.t().contiguous().t(), types),
            "every other column": (torch.cat([ids, ids], 1)[:, ::2], mask, types),
            "types from a column, mask from one element": (ids, mask[:1, :1].expand(4, 40), types[:, :1].expand(4, 40)),
    }.items():
        want = P.pack_padded_batch_reference(*(v.contiguous() for v in views), VOCAB, TYPES)
        with backend.use_backend("triton"):
            packed = P.pack_padded_batch(*views, VOCAB, TYPES)
        got = packed.outputs()
        assert_same(got, want, what)


# ---------------------------------------------------------------------------------------------------
# Without Triton running (this process): what the reference means, checks, backend choice.

@pytest.mark.parametrize("kind", MASK_KINDS)
def test_reference_is_the_static_unpadding_with_clamped_lookups_and_extremes(kind):
    batch, seqlen = 4, 33
    ids, mask, types = make_batch(kind, batch, seqlen, seed=1, out_of_range=True)
    indices, valid, packed_ids, packed_types, positions, cu_seqlens, extremes = P.pack_padded_batch_reference(
        ids, mask, types, VOCAB, TYPES)
    static = static_unpad_input(mask, batch, seqlen)
    assert torch.equal(indices, static.indices) and torch.equal(valid, static.valid)
    assert torch.equal(cu_seqlens, static.cu_seqlens)
    total = int(mask.bool().sum())
    exact = unpad_input(mask, batch, seqlen, "cpu")
    real = exact.indices if exact.indices is not None else torch.arange(batch * seqlen)
    assert torch.equal(indices[:total], real)  # the real tokens in the exact form's order
    assert torch.equal(packed_ids, ids.flatten()[indices].clamp(0, VOCAB - 1))
    assert torch.equal(packed_types, types.flatten()[indices].clamp(0, TYPES - 1))
    assert torch.equal(positions, indices % seqlen)
    keep = mask.bool()
    real_ids, real_types = torch.where(keep, ids, 0), torch.where(keep, types, 0)
    assert extremes.tolist() == [int(real_ids.min()), int(real_ids.max()), int(real_types.min()),
                                 int(real_types.max()), int(mask.min()), int(mask.max())]


def test_bad_inputs_are_refused():
    ids, mask, types = make_batch("right", 2, 5)
    with pytest.raises(ValueError, match=r"attention_mask \(2, 4\) does not match input_ids \(2, 5\)"):
        P.pack_padded_batch(ids, mask[:, :4], types, VOCAB, TYPES)
    with pytest.raises(ValueError, match=r"token_type_ids \(1, 5\) does not match"):
        P.pack_padded_batch(ids, mask, types[:1], VOCAB, TYPES)
    with pytest.raises(ValueError, match="non-empty"):
        P.pack_padded_batch(ids[:0], mask[:0], types[:0], VOCAB, TYPES)
    with pytest.raises(TypeError, match="integer token_type_ids"):
        P.pack_padded_batch(ids, mask, types.float(), VOCAB, TYPES)
    with pytest.raises(TypeError, match="integer input_ids"):
        P.pack_padded_batch(ids.bool(), mask, types, VOCAB, TYPES)
    for vocab, types_vocab in ((0, TYPES), (VOCAB, 0), (VOCAB, -1)):  # a clamp into no row would give -1
        with pytest.raises(ValueError, match="tables of at least one row"):
            P.pack_padded_batch(ids, mask, types, vocab, types_vocab)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.complex64], ids=str)
def test_a_mask_that_is_not_integer_is_refused(mask_dtype):
    """A float mask of fractions (0.5) would be read as 0 by the kernel (cast to int64) and as 1 by
    the reference (cast to bool): two different packings. It is refused by name instead, on either
    backend, before anything runs."""
    ids, mask, types = make_batch("holes", 3, 9)
    fractional = (mask * 0.5).to(mask_dtype)
    for name in ("torch", "triton"):
        if name == "triton" and not backend.triton_available():
            continue
        with backend.use_backend(name), pytest.raises(TypeError, match=r"integer attention_mask .*got torch\."):
            P.pack_padded_batch(ids, fractional, types, VOCAB, TYPES)


@pytest.mark.parametrize("which", ["attention_mask", "token_type_ids"])
def test_a_tensor_on_another_device_is_refused_by_name(which):
    """The mask or token types on another device than the ids (here: ``meta``, the other device this
    machine has) would be read through the wrong device's pointers by the kernel: refused by name."""
    ids, mask, types = make_batch("right", 2, 5)
    args = {"attention_mask": mask, "token_type_ids": types}
    args[which] = args[which].to("meta")
    for name in ("torch", "triton"):
        if name == "triton" and not backend.triton_available():
            continue
        with backend.use_backend(name), pytest.raises(ValueError, match=f"{which} is on meta, input_ids on cpu"):
            P.pack_padded_batch(ids, args["attention_mask"], args["token_type_ids"], VOCAB, TYPES)


def test_cpu_defaults_to_the_reference(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert P.active_backend("cpu") == "torch"
    ids, mask, types = make_batch("holes", 3, 9)
    packed = P.pack_padded_batch(ids, mask, types, VOCAB, TYPES)
    want = P.pack_padded_batch_reference(ids, mask, types, VOCAB, TYPES)
    assert_same(packed.outputs(), want, "cpu")
    assert packed.packing.max_seqlen == 9 and (packed.packing.batch, packed.packing.seqlen) == (3, 9)


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        P.pack_padded_batch(*make_batch("right", 2, 5), VOCAB, TYPES)


test_fused_op_is_registered = registered_schema_test(
    "pack_padded_batch",
    "fastbert::pack_padded_batch(Tensor input_ids, Tensor attention_mask, Tensor token_type_ids, "
    "SymInt vocab_size, SymInt type_vocab_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)


# ---------------------------------------------------------------------------------------------------
# The interpreter: these cases are defined only in the child process.

test_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 83)


if IN_CHILD:
    _kernel_is_interpreted = interpreted_kernel_fixture(
        "fastbert.kernels.pack_padded_batch", "_pack_padded_batch_fwd_kernel")

    @pytest.mark.parametrize("out_of_range", [False, True], ids=["in-range", "out-of-range"])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
    @pytest.mark.parametrize("kind", MASK_KINDS)
    def test_interpreter_case_matches_reference(kind, shape, out_of_range):
        case_matches_reference("cpu", kind, shape, torch.long, torch.long, out_of_range)

    @pytest.mark.parametrize("mask_dtype, id_dtype", [(torch.bool, torch.long), (torch.int32, torch.int32),
                                                      (torch.long, torch.int32)], ids=str)
    @pytest.mark.parametrize("kind", ["holes", "fully_masked_row"])
    def test_interpreter_case_other_dtypes(kind, mask_dtype, id_dtype):
        case_matches_reference("cpu", kind, (3, 70), mask_dtype, id_dtype, True)

    @pytest.mark.parametrize("kind", ["holes", "fully_masked_row"])
    def test_interpreter_case_more_blocks_than_a_step(kind):
        case_more_blocks_than_a_step("cpu", kind)

    def test_interpreter_case_past_the_kernels_bound_takes_the_reference(monkeypatch):
        """From MAX_POSITIONS on (the second launch's reads grow as the square of the blocks), the op
        takes its PyTorch composition, with the same outputs; below it, the kernels."""
        def refuse(*args, **kwargs):
            raise AssertionError("the kernels were launched")

        monkeypatch.setattr(P, "pack_padded_batch_fwd", refuse)
        ids, mask, types = make_batch("holes", 3, 4, out_of_range=True)
        monkeypatch.setattr(P, "MAX_POSITIONS", 12)
        with backend.use_backend("triton"):
            packed = P.pack_padded_batch(ids, mask, types, VOCAB, TYPES)
        assert_same(packed.outputs(), P.pack_padded_batch_reference(ids, mask, types, VOCAB, TYPES), "past the bound")
        monkeypatch.setattr(P, "MAX_POSITIONS", 13)
        with backend.use_backend("triton"), pytest.raises(AssertionError, match="the kernels were launched"):
            P.pack_padded_batch(ids, mask, types, VOCAB, TYPES)

    def test_interpreter_case_broadcast_and_strided():
        case_broadcast_and_strided("cpu")

    def test_interpreter_case_extreme_values():
        case_extreme_values("cpu")

    def test_interpreter_case_launcher_refuses_column_strides():
        ids, mask, types = make_batch("right", 4, 6)
        with pytest.raises(ValueError, match=r"unit column strides, got input_ids strides \(1, 4\)"):
            launch(ids.t().contiguous().t(), mask, types)

    def test_interpreter_case_opcheck():
        ids, mask, types = make_batch("holes", 3, 9)
        torch.library.opcheck(torch.ops.fastbert.pack_padded_batch.default, (ids, mask, types, VOCAB, TYPES),
                              test_utils=("test_schema",))


# ---------------------------------------------------------------------------------------------------
# GPU (compiled kernels; skipped without one).

@needs_cuda
@pytest.mark.skipif(IN_CHILD, reason="GPU cases run in the parent process")
class TestCuda:
    @pytest.mark.parametrize("out_of_range", [False, True], ids=["in-range", "out-of-range"])
    @pytest.mark.parametrize("shape", SHAPES + [(64, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
    @pytest.mark.parametrize("kind", MASK_KINDS)
    def test_matches_reference(self, kind, shape, out_of_range):
        case_matches_reference("cuda", kind, shape, torch.long, torch.long, out_of_range)

    @pytest.mark.parametrize("mask_dtype, id_dtype", [(torch.bool, torch.long), (torch.int32, torch.int32)], ids=str)
    def test_other_dtypes_broadcast_and_strided(self, mask_dtype, id_dtype):
        case_matches_reference("cuda", "holes", (3, 70), mask_dtype, id_dtype, True)
        case_broadcast_and_strided("cuda")
        case_extreme_values("cuda")

    @pytest.mark.parametrize("kind", ["holes", "fully_masked_row"])
    def test_more_blocks_than_a_step(self, kind):
        case_more_blocks_than_a_step("cuda", kind)
