"""Attention over packed variable-length sequences: the Triton kernel against
``varlen_attention_reference`` (one masked SDPA call over the batch padded to ``max_seqlen``).

- Under ``TRITON_INTERPRET=1`` on CPU tensors, in a child pytest process (Triton reads the variable
  when the kernel is defined, so it must be set before fastbert is imported, and must not leak into
  this process, whose fake-CUDA and compile tests need real JIT kernels): fp32 and fp16, every head
  dim BERT models use (16, 26, 32, 48, 64, 80, 96, 128) and a few more, sequence lengths 1 to 130 with
  an empty sequence in the batch, a 600-token sequence, NaN-filled outputs, a strided QKV, a loose
  ``max_seqlen`` bound, large scores, zero tokens, gradients.
- On a GPU (skipped without one): the same checks, bf16 too, and longer sequences.
- Here, without Triton running: the backend choice and the input checks.

Budgets (DESIGN.md): fp32 1e-5 (the op); fp16 / bf16: error against the fp32 reference <= 2x
PyTorch's own error at that dtype + 1e-3.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from fastbert.ops import backend
from tests import helpers
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.helpers import interpreter_parent_test, interpreted_kernel_fixture, registered_schema_test
from tests.helpers import FP32_OP, assert_close, assert_low_precision_within_budget, max_abs_diff, nan_like

A = importlib.import_module("fastbert.ops.attention")  # the module (fastbert.ops.attention is not a function)

HEAD_DIMS = [16, 26, 32, 48, 64, 80, 96, 128]
LENGTHS = [1, 0, 130, 17, 64, 2, 65]  # one token, an empty sequence, > 2 blocks, block edges +-1
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def cu_seqlens_of(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_qkv(tokens, heads, head_dim, dtype=torch.float32, device="cpu", scale=1.0):
    """Fresh random fused QKV ``[tokens, 3 * heads * head_dim]`` (never zeros)."""
    return (scale * torch.randn(tokens, 3 * heads * head_dim, device=device)).to(dtype)


def check(out, qkv, cu_seqlens, max_seqlen, heads, what, scale=None):
    """fp32: 1e-5 against the reference; 16-bit: the low-precision budget against the fp32 reference
    computed from the same (rounded) inputs."""
    fp32 = A.varlen_attention_reference(qkv.float(), cu_seqlens, max_seqlen, heads, scale)
    assert out.shape == fp32.shape and out.dtype == qkv.dtype, (out.shape, out.dtype)
    if qkv.dtype == torch.float32:
        assert_close(out, fp32, FP32_OP, what)
    else:
        same = A.varlen_attention_reference(qkv, cu_seqlens, max_seqlen, heads, scale)
        assert_low_precision_within_budget(out.float(), fp32, same.float(), what)


# Counts the op's launches (a quiet fallback to the reference cannot pass as a kernel run).
LaunchCounter = functools.partial(helpers.LaunchCounter, module=A, name="attention_fwd")


def launch(qkv, cu_seqlens, max_seqlen, heads, scale=None, compact=False):
    """The launch helper on a NaN-filled output: any element it does not write fails the check."""
    from fastbert.kernels.attention import attention_fwd

    head_dim = qkv.shape[1] // 3 // heads
    out = nan_like((qkv.shape[0], qkv.shape[1] // 3), qkv.dtype, qkv.device)
    attention_fwd(qkv, cu_seqlens, max_seqlen, heads, head_dim**-0.5 if scale is None else scale, out,
                  compact=compact)
    return out


# ---------------------------------------------------------------------------------------------------
# Checks shared by the interpreter (CPU) and the GPU.

def case_launch_helper(device, dtype, head_dim, lengths, heads=2):
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, head_dim, dtype, device)
    out = launch(qkv, cu, max(lengths), heads)
    check(out, qkv, cu, max(lengths), heads, f"{device} {dtype} head_dim={head_dim} lengths={lengths}")


# Sequence lengths for the compact grid: CUDAGraphRunner's layout (real sequences, then padding
# pieces of 64, then empty slots), empty sequences between long ones, one sequence past a query block.
COMPACT_LENGTHS = [[70, 5, 64, 64, 11] + [0] * 40, [0, 130, 0, 0, 1, 65, 0], [1], [257, 0], [64] * 5,
                   [3] * 128]  # 128: as many sequences as the smallest slot count (4 warps x 32)


def case_compact_grid(device, dtype, head_dim, lengths, max_seqlen=512):
    """The compact grid (only the query blocks that hold rows) writes every row, the same values as
    the plain grid (the same program on the same block), within budget of the reference; here with a
    loose ``max_seqlen`` as a graph's static bound."""
    heads = 2
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, head_dim, dtype, device)
    compact = launch(qkv, cu, max_seqlen, heads, compact=True)
    assert torch.equal(compact, launch(qkv, cu, max_seqlen, heads)), f"compact grid {lengths}"
    check(compact, qkv, cu, max(lengths), heads, f"compact grid {device} {dtype} head_dim={head_dim} {lengths}")


def case_op(device, dtype, monkeypatch):
    counter = LaunchCounter(monkeypatch)
    lengths, heads, head_dim = [5, 0, 33], 3, 48
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, head_dim, dtype, device)
    with backend.use_backend("triton"):
        assert A.active_backend(device) == "triton"
        out = A.varlen_attention(qkv, cu, max(lengths), heads)
        scaled = A.varlen_attention(qkv, cu, max(lengths), heads, scale=0.3)
    assert counter.count == 2
    check(out, qkv, cu, max(lengths), heads, f"op {dtype}")
    check(scaled, qkv, cu, max(lengths), heads, f"op {dtype} scale=0.3", scale=0.3)


def case_strided_qkv_and_loose_bound(device):
    """QKV as a column slice of a wider buffer (row stride 3 * hidden + 24, read in place), and a
    ``max_seqlen`` larger than the longest sequence (a bound, as CUDA graphs use)."""
    lengths, heads, head_dim = [9, 40, 1], 2, 32
    cu = cu_seqlens_of(lengths, device)
    wide = torch.randn(sum(lengths), 3 * heads * head_dim + 24, device=device)
    qkv = wide[:, 8:8 + 3 * heads * head_dim]
    out = launch(qkv, cu, 100, heads)
    check(out, qkv, cu, 40, heads, "strided qkv, max_seqlen bound 100")


def case_zero_tokens(device):
    for lengths in ([0], [0, 0, 0]):
        cu = cu_seqlens_of(lengths, device)
        qkv = make_qkv(0, 2, 16, device=device)
        with backend.use_backend("triton"):
            out = A.varlen_attention(qkv, cu, 0, 2)
        assert out.shape == (0, 32)


def case_large_scores(device, dtype):
    """Scores of order 1e3 (queries and keys of magnitude ~30): the online softmax subtracts the
    running maximum in fp32, so nothing overflows, in fp16 too."""
    lengths, heads, head_dim = [70, 3], 2, 64
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, head_dim, torch.float32, device, scale=6.0).to(dtype)
    out = launch(qkv, cu, max(lengths), heads)
    assert torch.isfinite(out).all()
    if dtype != torch.float32:
        check(out, qkv, cu, max(lengths), heads, f"large scores {dtype}")
        return
    # Scores of 1e3 are ill-conditioned in fp32 (PyTorch's own fp32 result is ~1e-4 off): the fp32
    # budget becomes the low-precision rule against an fp64 reference, with 1e-5 of slack.
    fp64 = A.varlen_attention_reference(qkv.double(), cu, max(lengths), heads)
    torch_fp32 = A.varlen_attention_reference(qkv, cu, max(lengths), heads)
    err, base = max_abs_diff(out, fp64), max_abs_diff(torch_fp32, fp64)
    assert err <= 2 * base + FP32_OP, f"large scores fp32: error {err:.3g} > 2 x {base:.3g} + {FP32_OP}"


def case_gradients(device, head_dim=26):
    lengths, heads = [3, 0, 20], 2
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, head_dim, device=device)
    weight = torch.randn(sum(lengths), heads * head_dim, device=device)
    grads = []
    for name in ("triton", "torch"):
        leaf = qkv.clone().requires_grad_()
        with backend.use_backend(name):
            (A.varlen_attention(leaf, cu, max(lengths), heads) * weight).sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1], FP32_OP, "grad qkv")


def case_column_strided_qkv(device, dtype, monkeypatch):
    """QKV whose columns are not adjacent (every other column of a wider buffer, column stride 2):
    the kernel reads columns at unit stride, so the op copies such a view first."""
    counter = LaunchCounter(monkeypatch)
    lengths, heads, head_dim = [9, 0, 40], 2, 32
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, 2 * head_dim, dtype, device)[:, ::2]
    assert qkv.stride(1) == 2
    with backend.use_backend("triton"):
        out = A.varlen_attention(qkv, cu, max(lengths), heads)
    assert counter.count == 1
    check(out, qkv.contiguous(), cu, max(lengths), heads, f"column stride 2 {dtype}")


def case_strided_cu_seqlens(device, monkeypatch):
    """Offsets read through a view with stride 2 (every other element of a longer tensor whose other
    elements, read in place, would be valid offsets of other sequences): the op makes them contiguous."""
    counter = LaunchCounter(monkeypatch)
    lengths, heads = [5, 0, 33], 2
    cu = torch.tensor([0, 38, 5, 38, 5, 38, 38], dtype=torch.int32, device=device)[::2]
    assert cu.tolist() == cu_seqlens_of(lengths).tolist() and not cu.is_contiguous()
    qkv = make_qkv(sum(lengths), heads, 16, device=device)
    with backend.use_backend("triton"):
        out = A.varlen_attention(qkv, cu, max(lengths), heads)
    assert counter.count == 1
    check(out, qkv, cu.contiguous(), max(lengths), heads, "non-contiguous cu_seqlens")


def case_head_dim_above_the_kernel(device, dtype, head_dim, monkeypatch):
    """Head dims past MAX_HEAD_DIM (256) are valid attention the kernel has no tile for: under the
    Triton backend they take the reference, launch nothing and raise nothing."""
    assert head_dim > A.MAX_HEAD_DIM
    counter = LaunchCounter(monkeypatch)
    lengths, heads = [5, 0, 9], 1
    cu = cu_seqlens_of(lengths, device)
    qkv = make_qkv(sum(lengths), heads, head_dim, dtype, device)
    with backend.use_backend("triton"):
        out = A.varlen_attention(qkv, cu, max(lengths), heads)
    assert counter.count == 0
    assert torch.equal(out, A.varlen_attention_reference(qkv, cu, max(lengths), heads))


# ---------------------------------------------------------------------------------------------------
# Without Triton running (this process): backend choice and checks.

def test_cpu_defaults_to_the_reference(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert A.active_backend("cpu") == "torch"
    assert A.active_backend("cuda") == ("triton" if backend.triton_available() else "torch")
    cu = cu_seqlens_of([3, 4])
    qkv = make_qkv(7, 2, 16)
    assert torch.equal(A.varlen_attention(qkv, cu, 4, 2), A.varlen_attention_reference(qkv, cu, 4, 2))


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        A.varlen_attention(make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible by 5 heads"):
        A.varlen_attention(make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 5)
    with pytest.raises(ValueError, match="int32"):
        A.varlen_attention(make_qkv(7, 2, 16), cu_seqlens_of([3, 4]).long(), 4, 2)


@pytest.mark.parametrize("qkv, cu, message", [
    (lambda: make_qkv(7, 2, 16), lambda: torch.empty(0, dtype=torch.int32),
     r"cu_seqlens must be a 1-D int32 tensor of batch \+ 1 offsets, got torch.int32 of shape \(0,\)"),
    (lambda: make_qkv(7, 2, 16), lambda: cu_seqlens_of([3, 4])[None],
     r"cu_seqlens must be a 1-D int32 tensor .* of shape \(1, 3\)"),
    (lambda: make_qkv(7, 2, 16).view(7, 6, 16), lambda: cu_seqlens_of([3, 4]),
     r"qkv must be \[tokens, 3 \* hidden\] .*, got \(7, 6, 16\)"),
    (lambda: make_qkv(6, 2, 16)[None], lambda: cu_seqlens_of([6]),
     r"qkv must be \[tokens, 3 \* hidden\] .*, got \(1, 6, 96\)"),
], ids=["empty cu_seqlens", "2-D cu_seqlens", "3-D qkv", "batched qkv"])
def test_malformed_qkv_and_cu_seqlens_are_refused_by_name(qkv, cu, message):
    """An empty or 2-D cu_seqlens, a qkv that is not 2-D (its second dim divisible by 3 * heads, so
    only the rank is wrong): a ValueError names the tensor, on every entry point and backend, before
    any offset is read (without it: an IndexError, a stack of rows, or a silent reshape)."""
    qkv, cu = qkv(), cu()
    for fn in (A.varlen_attention_reference, A.varlen_attention_with_probs):
        with pytest.raises(ValueError, match=message):
            fn(qkv, cu, 7, 2)
    for name in ("torch", "triton"):
        if name == "triton" and not backend.triton_available():
            continue
        with backend.use_backend(name), pytest.raises(ValueError, match=message):
            A.varlen_attention(qkv, cu, 7, 2)


def test_dropout_takes_the_reference(monkeypatch):
    counter = LaunchCounter(monkeypatch)
    with backend.use_backend("triton"):
        out = A.varlen_attention(make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 2, dropout_p=0.5)
    assert counter.count == 0 and out.shape == (7, 32)


@pytest.mark.parametrize("cu, max_seqlen, message", [
    ([0, 4, 14], 10, r"rise from 0 to the number of rows of qkv \(10\); it goes from 0 to 14"),
    ([-3, 4, 10], 10, "it goes from -3 to 10"),
    ([2, 4, 10], 10, "it goes from 2 to 10"),
    ([0, 4, 8], 10, "it goes from 0 to 8"),
    ([0, 6, 4, 10], 10, "and decreases"),
    ([0], 10, "holds no sequence"),
    ([0, 200 - 10, 200], 16, r"max_seqlen=16 is shorter than the longest sequence \(190 rows\)"),
    ([0, 4, 10], 0, "max_seqlen must be at least 1"),
])
def test_offsets_that_leave_the_rows_are_refused(cu, max_seqlen, message):
    """Offsets outside qkv's rows, rows outside every sequence, or a max_seqlen below the longest
    sequence: the kernel would read or write past the tensors, or leave rows unwritten. A ValueError
    names the problem, on either path; validate=False (the model's own offsets) skips the read-back."""
    tokens = cu[-1] if cu[-1] > 0 and max_seqlen == 16 else 10
    qkv = make_qkv(tokens, 2, 16)
    for name in ("torch", "triton"):
        if name == "triton" and not backend.triton_available():
            continue
        with backend.use_backend(name), pytest.raises(ValueError, match=message):
            A.varlen_attention(qkv, torch.tensor(cu, dtype=torch.int32), max_seqlen, 2)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_a_scale_that_is_not_finite_is_refused(scale):
    """Every probability would be NaN: a ValueError says why instead, with or without probabilities."""
    for fn in (A.varlen_attention, A.varlen_attention_with_probs):
        with pytest.raises(ValueError, match="attention scale must be finite"):
            fn(make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 2, scale=scale)


@pytest.mark.parametrize("what, args, error, message", [
    ("no heads", lambda: (make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 0), ValueError,
     "num_heads must be at least 1, got 0"),
    ("negative heads", lambda: (make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, -1), ValueError,
     "num_heads must be at least 1, got -1"),
    ("no hidden size", lambda: (torch.randn(7, 0), cu_seqlens_of([3, 4]), 4, 2), ValueError,
     r"qkv must be \[tokens, 3 \* hidden\] .*, got \(7, 0\)"),
    ("integer qkv", lambda: (make_qkv(7, 2, 16).long(), cu_seqlens_of([3, 4]), 4, 2), TypeError,
     "qkv must be a floating-point tensor, got dtype torch.int64"),
    ("negative dropout", lambda: (make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 2, None, -0.1), ValueError,
     r"dropout_p must be in \[0, 1\], got -0.1"),
    ("NaN dropout", lambda: (make_qkv(7, 2, 16), cu_seqlens_of([3, 4]), 4, 2, None, float("nan")), ValueError,
     r"dropout_p must be in \[0, 1\], got nan"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_heads_dtypes_and_dropout_are_refused_by_name(what, args, error, message):
    """On both entry points and both backends (were a ZeroDivisionError, a complex scale, an int64
    overflow message, dropout ignored on the kernels' path but refused by flash attention's name)."""
    for fn in (A.varlen_attention, A.varlen_attention_with_probs):
        for name in ("torch", "triton"):
            if name == "triton" and not backend.triton_available():
                continue
            with backend.use_backend(name), pytest.raises(error, match=message):
                fn(*args())


@pytest.mark.parametrize("cu, max_seqlen, message", [
    ([1, 3, 7], 4, "it goes from 1 to 7"),
    ([0, 3, 7], 2, r"max_seqlen=2 is shorter than the longest sequence \(4 rows\)"),
])
def test_offsets_with_probabilities_are_checked(cu, max_seqlen, message):
    """varlen_attention_with_probs checks its offsets as varlen_attention does (were a size mismatch
    and an IndexError from inside); validate=False, the model's own offsets, skips the read-back."""
    with pytest.raises(ValueError, match=message):
        A.varlen_attention_with_probs(make_qkv(7, 2, 16), torch.tensor(cu, dtype=torch.int32), max_seqlen, 2)


@pytest.mark.parametrize("scale", [-0.5, 0.0, 1e-46, 1e-300, 1e39])
def test_scale_the_kernel_cannot_take_runs_the_reference(monkeypatch, scale):
    """The kernel keeps the running maximum of unscaled scores, right only for a positive scale, and
    multiplies the -inf of masked keys by scale * log2(e), NaN if that is 0 in fp32: any scale whose
    product with log2(e) is not a normal fp32 number takes the reference, and the launch helper
    refuses it."""
    counter = LaunchCounter(monkeypatch)
    qkv, cu = make_qkv(7, 2, 16), cu_seqlens_of([3, 4])
    with backend.use_backend("triton"):
        out = A.varlen_attention(qkv, cu, 4, 2, scale=scale)
    assert counter.count == 0
    torch.testing.assert_close(out, A.varlen_attention_reference(qkv, cu, 4, 2, scale), equal_nan=True)
    if backend.triton_available():
        from fastbert.kernels.attention import attention_fwd

        with pytest.raises(ValueError, match="normal positive fp32"):
            attention_fwd(qkv, cu, 4, 2, scale, nan_like((7, 32), qkv.dtype, "cpu"))


def test_block_sizes_cover_every_head_dim():
    if not backend.triton_available():
        pytest.skip("triton is not installed")
    from fastbert.kernels import attention as K

    for head_dim in range(1, K.MAX_HEAD_DIM + 1):
        for fp32 in (True, False):
            cfg = K.attention_config(head_dim, fp32)
            assert cfg["BLOCK_D"] >= max(16, head_dim) and cfg["BLOCK_D"] & (cfg["BLOCK_D"] - 1) == 0
    with pytest.raises(ValueError, match="head dims"):
        K.attention_config(K.MAX_HEAD_DIM + 1, True)


def test_long_sequences_take_the_long_tile_at_head_dim_64_in_16_bit(monkeypatch):
    """Past LONG_SEQLEN (128) rows, 16-bit head dim 64 launches 128 rows on 8 warps with 3 stages (the
    H200 sweep's best at seqlen <= 512); up to it, and for fp32 or other head dims, the tile stays."""
    if not backend.triton_available():
        pytest.skip("triton is not installed")
    from fastbert.kernels import attention as K

    short, long = K.attention_config(64, False), K.attention_config(64, False, True)
    assert (short["BLOCK_M"], long["BLOCK_M"], long["BLOCK_N"], long["num_warps"], long["num_stages"]) == \
        (64, 128, 64, 8, 3)
    for head_dim, fp32 in ((64, True), (48, False), (32, False), (128, False)):
        assert K.attention_config(head_dim, fp32, True) == K.attention_config(head_dim, fp32)
    grids = []

    class Kernel:  # records the grid and options a launch would use
        def __getitem__(self, grid):
            return lambda *args, **options: grids.append((grid, options["BLOCK_M"], options["num_stages"]))

    qkv = torch.randn(300, 3 * 128, dtype=torch.float16)
    for max_seqlen in (128, 129, 300):
        cu = torch.tensor([0, max_seqlen], dtype=torch.int32)
        K.attention_fwd(qkv[:max_seqlen], cu, max_seqlen, 2, 0.125, torch.empty(max_seqlen, 128, dtype=qkv.dtype),
                        kernel=Kernel())
    assert grids == [((2, 1, 2), 64, 2), ((2, 1, 2), 128, 3), ((3, 1, 2), 128, 3)], grids


def test_compact_grid_launches_a_program_per_query_block_with_rows():
    """The compact grid's program count bounds the query blocks that hold rows (every one gets a
    program), never exceeds the plain grid's, and is refused past MAX_COMPACT_SLOTS sequences; the
    launch takes ``(programs, 1, heads)`` with a power-of-two slot count covering the sequences and
    the program's threads, at head dim 64 only."""
    if not backend.triton_available():
        pytest.skip("triton is not installed")
    from fastbert.kernels import attention as K

    gen = torch.Generator().manual_seed(5)
    for batch in (1, 3, 17, 300, K.MAX_COMPACT_SLOTS):
        for block_m in (32, 64, 128):
            lengths = torch.randint(0, 200, (batch,), generator=gen) * torch.randint(0, 2, (batch,), generator=gen)
            tokens, longest = int(lengths.sum()), max(1, int(lengths.max()))
            needed = int(((lengths + block_m - 1) // block_m).sum())
            programs = K.compact_grid_programs(tokens, batch, longest + 7, block_m)
            assert needed <= programs <= -(-(longest + 7) // block_m) * batch, (batch, block_m)
    assert K.compact_grid_programs(100, K.MAX_COMPACT_SLOTS + 1, 64, 64) is None

    launches = []

    class Kernel:  # records the grid and slot count a launch would use
        def __getitem__(self, grid):
            return lambda *args, **options: launches.append((grid, options["SLOTS"]))

    lengths = [128] + [0] * 257  # CUDAGraphRunner's 1x128 bucket: one sequence, then empty slots
    qkv = torch.randn(128, 3 * 128, dtype=torch.float16)
    for compact in (False, True):
        K.attention_fwd(qkv, cu_seqlens_of(lengths), 512, 2, 0.125, torch.empty(128, 128, dtype=qkv.dtype),
                        kernel=Kernel(), compact=compact)
    assert launches == [((4, 258, 2), 0), ((1 + 128, 1, 2), 512)], launches  # the 128-row tile past 128
    launches.clear()  # head dim 48: the compact grid is not launched there (it spilled on sm_80)
    K.attention_fwd(torch.randn(128, 3 * 96, dtype=torch.float16), cu_seqlens_of(lengths), 512, 2, 0.125,
                    torch.empty(128, 96, dtype=torch.float16), kernel=Kernel(), compact=True)
    assert launches == [((8, 258, 2), 0)], launches


test_fused_op_is_registered = registered_schema_test(
    "varlen_attention",
    "fastbert::varlen_attention(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, "
    "SymInt num_heads, float scale) -> Tensor",
)


# ---------------------------------------------------------------------------------------------------
# The interpreter: these cases are defined only in the child process.

test_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 37)


if IN_CHILD:
    _kernel_is_interpreted = interpreted_kernel_fixture(
        "fastbert.kernels.attention", "_attention_fwd_kernel")

    @pytest.mark.parametrize("head_dim", HEAD_DIMS + [8, 40, 200])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_every_head_dim(dtype, head_dim):
        case_launch_helper("cpu", dtype, head_dim, LENGTHS)

    @pytest.mark.parametrize("lengths", [[1], [130], [0, 5, 0], [600, 7]], ids=str)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_lengths(dtype, lengths):
        case_launch_helper("cpu", dtype, 64, lengths, heads=1 if max(lengths) > 130 else 3)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_op(dtype, monkeypatch):
        case_op("cpu", dtype, monkeypatch)

    def test_interpreter_case_tiny_scale(monkeypatch):
        """A scale far below 1 that fp32 still holds as a normal number runs the kernel."""
        counter = LaunchCounter(monkeypatch)
        lengths, heads = [5, 64, 70], 2
        cu = cu_seqlens_of(lengths)
        qkv = make_qkv(sum(lengths), heads, 32, torch.float16)
        with backend.use_backend("triton"):
            out = A.varlen_attention(qkv, cu, max(lengths), heads, scale=1e-30)
        assert counter.count == 1
        check(out, qkv, cu, max(lengths), heads, "scale 1e-30", scale=1e-30)

    def test_interpreter_case_strided_qkv_and_loose_bound():
        case_strided_qkv_and_loose_bound("cpu")

    @pytest.mark.parametrize("lengths", COMPACT_LENGTHS, ids=lambda x: f"{len(x)}-sequences")
    @pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 64), (torch.float16, 64)], ids=str)
    def test_interpreter_case_compact_grid(dtype, head_dim, lengths):
        case_compact_grid("cpu", dtype, head_dim, lengths)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_column_strided_qkv(dtype, monkeypatch):
        case_column_strided_qkv("cpu", dtype, monkeypatch)

    def test_interpreter_case_strided_cu_seqlens(monkeypatch):
        case_strided_cu_seqlens("cpu", monkeypatch)

    @pytest.mark.parametrize("head_dim", [257, 320])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_head_dim_above_the_kernel(dtype, head_dim, monkeypatch):
        case_head_dim_above_the_kernel("cpu", dtype, head_dim, monkeypatch)

    def test_interpreter_case_zero_tokens(monkeypatch):
        counter = LaunchCounter(monkeypatch)
        case_zero_tokens("cpu")
        assert counter.count == 2  # called, and launches nothing for an empty grid

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_large_scores(dtype):
        case_large_scores("cpu", dtype)

    def test_interpreter_case_gradients(monkeypatch):
        counter = LaunchCounter(monkeypatch)
        case_gradients("cpu")
        assert counter.count == 1  # the Triton forward ran under autograd; the backward is the reference's

    def test_interpreter_case_opcheck():
        cu = cu_seqlens_of([3, 0, 6])
        qkv = make_qkv(9, 2, 16)
        for args in ((qkv, cu, 6, 2, 0.25), (qkv.requires_grad_(), cu, 6, 2, 0.25)):
            torch.library.opcheck(torch.ops.fastbert.varlen_attention.default, args,
                                  test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------------
# GPU (compiled kernels; skipped without one).

@needs_cuda
@pytest.mark.skipif(IN_CHILD, reason="GPU cases run in the parent process")
class TestCuda:
    DTYPES = [torch.float32, torch.float16, torch.bfloat16]

    @pytest.mark.parametrize("head_dim", HEAD_DIMS + [8, 40, 200, 256])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_every_head_dim(self, dtype, head_dim):
        case_launch_helper("cuda", dtype, head_dim, LENGTHS + [512, 513, 1000], heads=4)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_op_and_large_scores(self, dtype, monkeypatch):
        case_op("cuda", dtype, monkeypatch)
        case_large_scores("cuda", dtype)

    @pytest.mark.parametrize("lengths", COMPACT_LENGTHS, ids=lambda x: f"{len(x)}-sequences")
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_compact_grid(self, dtype, lengths):
        case_compact_grid("cuda", dtype, 64, lengths)

    def test_strided_zero_tokens_and_gradients(self):
        case_strided_qkv_and_loose_bound("cuda")
        case_zero_tokens("cuda")
        case_gradients("cuda", head_dim=64)

    def test_torch_compile_fullgraph(self):
        lengths = [100, 3, 0, 128]
        cu = cu_seqlens_of(lengths, "cuda")
        qkv = make_qkv(sum(lengths), 12, 64, torch.float16, "cuda")
        compiled = torch.compile(lambda q, c: A.varlen_attention(q, c, 128, 12), fullgraph=True)
        check(compiled(qkv, cu), qkv, cu, 128, 12, "torch.compile")


def test_probabilities_are_returned_after_dropout():
    """``output_attentions`` in training with attention dropout: the returned weights are those the
    values were summed with (dropped and rescaled), as transformers returns them."""
    from fastbert.ops.attention import varlen_attention_with_probs

    torch.manual_seed(0)
    heads, head_dim, cu = 2, 8, torch.tensor([0, 4, 10], dtype=torch.int32)
    qkv = torch.randn(10, 3 * heads * head_dim)
    _, exact = varlen_attention_with_probs(qkv, cu, 6, heads)
    out, probs = varlen_attention_with_probs(qkv, cu, 6, heads, dropout_p=0.5)
    dropped = (probs == 0) & (exact != 0)
    assert dropped.any() and (~dropped & (exact != 0)).any()
    assert_close(probs[~dropped], 2 * exact[~dropped], 1e-6, "kept weights scaled by 1 / (1 - p)")
    v = qkv[:, 2 * heads * head_dim:].view(10, heads, head_dim)
    for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        length = end - start
        want = torch.einsum("hqk,khd->qhd", probs[b, :, :length, :length], v[start:end]).reshape(length, -1)
        assert_close(out[start:end], want, 1e-6, f"sequence {b}: the values summed with the returned weights")


@pytest.mark.parametrize("lengths", [[4, 6], [3, 0, 7], [5]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_probabilities_are_zero_at_padded_queries_and_keys(dtype, lengths):
    """``varlen_attention_with_probs``'s contract: ``[batch, heads, max_seqlen, max_seqlen]``, exactly
    zero at every padded query row (an empty sequence's too) and padded key column, and each real
    query's row sums to 1 over its sequence's keys; the output is the reference's."""
    from fastbert.ops.attention import varlen_attention_with_probs

    heads, head_dim, max_seqlen = 2, 16, max(lengths) + 2  # a loose bound: the longest is padded too
    cu = cu_seqlens_of(lengths)
    qkv = make_qkv(sum(lengths), heads, head_dim, dtype)
    out, probs = varlen_attention_with_probs(qkv, cu, max_seqlen, heads)
    assert probs.shape == (len(lengths), heads, max_seqlen, max_seqlen) and probs.dtype == dtype
    rounding = 1e-6 if dtype == torch.float32 else 1e-2  # each probability rounded to 16 bits
    for b, n in enumerate(lengths):
        assert not probs[b, :, n:, :].any(), f"sequence {b}: padded query rows are not zero"
        assert not probs[b, :, :n, n:].any(), f"sequence {b}: padded key columns are not zero"
        sums = probs[b, :, :n, :n].float().sum(-1)
        assert_close(sums, torch.ones_like(sums), rounding, f"sequence {b}: rows sum to 1")
    check(out, qkv, cu, max_seqlen, heads, f"with_probs {dtype}")


def test_probabilities_in_fp64_are_computed_in_fp64():
    """fp64 input keeps fp64 scores and softmax (transformers' eager attention does): the output is the
    fp64 reference's to fp64 rounding, not fp32's (~1e-8 off)."""
    from fastbert.ops.attention import varlen_attention_with_probs

    lengths, heads = [5, 9], 2
    cu = cu_seqlens_of(lengths)
    qkv = make_qkv(sum(lengths), heads, 16, torch.float64, scale=3.0)
    out, probs = varlen_attention_with_probs(qkv, cu, 9, heads)
    assert out.dtype == probs.dtype == torch.float64
    assert_close(out, A.varlen_attention_reference(qkv, cu, 9, heads), 1e-13, "fp64 with probabilities")
