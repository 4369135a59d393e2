"""Embeddings + LayerNorm over packed tokens: every implementation against ``embeddings_reference``.

- the C++ CPU kernel of the extension (``torch.ops.fastbert.embedding_layer_norm`` on CPU tensors);
- the Triton kernel under ``TRITON_INTERPRET=1``, in a child pytest process (the variable must be set
  before the kernel is defined, and must not leak into this process);
- the CUDA kernel and the Triton kernel on a GPU (skipped without one);
- the backend choice of ``fastbert.ops.embeddings`` and its index checks.

Budgets from DESIGN.md: fp32 op 1e-5 (1e-4 under the interpreter); fp16/bf16: error against the fp32
reference <= 2x PyTorch's own error at that dtype + 1e-3.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from fastbert import _extension
from fastbert.ops import backend
from tests import helpers
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.helpers import interpreter_parent_test
from tests.helpers import (FP32_INTERPRETER, FP32_OP, assert_close, assert_low_precision_within_budget,
                           max_abs_diff, nan_like)

E = importlib.import_module("fastbert.ops.embeddings")  # the module (fastbert.ops.embeddings is the function)

HIDDEN = [312, 384, 768, 1024, 97, 4096]
TOKENS = [1, 7, 33]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VOCAB, MAX_POSITIONS, TYPE_VOCAB = 1000, 512, 2
EPS = 1e-12

needs_cpu_op = pytest.mark.skipif(not _extension.is_built(),
                                  reason=f"fastbert._C is not built here ({_extension.extension_status()})")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
needs_cuda_extension = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.usable_on("cuda")),
    reason="needs a CUDA GPU and fastbert._C built with a kernel for it")


def make_inputs(tokens, hidden, dtype=torch.float32, device="cpu", scale=1.0, vocab=VOCAB):
    """Fresh random ids/positions/types and tables; LayerNorm weight and bias random (never 0 or 1)."""
    ids = torch.randint(0, vocab, (tokens,), device=device)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device=device)
    types = torch.randint(0, TYPE_VOCAB, (tokens,), device=device)
    word = torch.randn(vocab, hidden, device=device) * scale
    position = torch.randn(MAX_POSITIONS, hidden, device=device) * scale
    token_type = torch.randn(TYPE_VOCAB, hidden, device=device) * scale
    ln_weight = 1 + 0.5 * torch.randn(hidden, device=device)
    ln_bias = 0.5 * torch.randn(hidden, device=device)
    floats = tuple(t.to(dtype) for t in (word, position, token_type, ln_weight, ln_bias))
    return (ids, positions, types) + floats


def references(inputs, eps=EPS):
    """(fp32 reference from the same low-precision values, PyTorch's reference at the inputs' dtype)."""
    indices, floats = inputs[:3], inputs[3:]
    fp32 = E.embeddings_reference(*indices, *(t.float() for t in floats), eps)
    same = E.embeddings_reference(*indices, *floats, eps)
    return fp32, same


def check_against_reference(out, inputs, what, fp32_atol=FP32_OP, eps=EPS):
    fp32, same = references(inputs, eps)
    assert out.shape == fp32.shape and out.dtype == inputs[3].dtype, (out.shape, out.dtype)
    if out.dtype == torch.float32:
        assert_close(out, fp32, fp32_atol, what)
    else:
        assert_low_precision_within_budget(out.float(), fp32, same.float(), what)


def poisoned_call(fn, shape, dtype, device):
    """Call ``fn`` right after freeing a NaN-filled buffer of the output's size, so that an allocator
    that hands the same block back (CUDA's caching allocator does; the CPU one often does for small
    blocks) gives the op a poisoned output: any element it does not write stays NaN."""
    poison = nan_like(shape, dtype, device)
    del poison
    return fn()


# Counts the op's launches (a quiet fallback to the reference cannot pass as a kernel run).
LaunchCounter = functools.partial(helpers.LaunchCounter, module="fastbert.kernels.embeddings",
                                  name="embeddings_fwd")


def outcome(fn):
    """``fn()``'s result, or ``(type, message)`` of the exception it raises."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 -- compared as a value
        return type(error), str(error)


# ---------------------------------------------------------------------------------------------------
# The C++ CPU kernel.

@needs_cpu_op
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_op_matches_reference(dtype, hidden, tokens):
    inputs = make_inputs(tokens, hidden, dtype)
    out = poisoned_call(lambda: torch.ops.fastbert.embedding_layer_norm(*inputs, EPS), (tokens, hidden), dtype, "cpu")
    check_against_reference(out, inputs, f"C++ CPU {dtype} hidden={hidden} tokens={tokens}")


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_op_large_activations_low_precision(dtype):
    """Sums in the thousands: fp16 squares would overflow; the statistics are fp32."""
    inputs = make_inputs(9, 768, dtype, scale=600.0)
    out = torch.ops.fastbert.embedding_layer_norm(*inputs, EPS)
    check_against_reference(out, inputs, f"C++ CPU {dtype} large activations")


@needs_cpu_op
def test_cpu_op_no_tokens_and_non_contiguous_inputs():
    inputs = make_inputs(0, 64)
    out = torch.ops.fastbert.embedding_layer_norm(*inputs, EPS)
    assert out.shape == (0, 64)
    # Strided ids (every other element) and a transposed-back table view.
    inputs = list(make_inputs(12, 64))
    inputs[0] = torch.randint(0, VOCAB, (24,))[::2]
    inputs[3] = inputs[3].t().contiguous().t()
    out = torch.ops.fastbert.embedding_layer_norm(*inputs, EPS)
    check_against_reference(out, inputs, "strided inputs")


@needs_cpu_op
def test_cpu_op_backward_is_the_reference_backward():
    """The op registers a backward that differentiates the reference: same gradients."""
    inputs = list(make_inputs(7, 97))
    grad_out = torch.randn(7, 97)
    grads = []
    for fn in (lambda *a: torch.ops.fastbert.embedding_layer_norm(*a, EPS), lambda *a: E.embeddings_reference(*a, EPS)):
        leaves = [t.clone().requires_grad_() for t in inputs[3:]]
        fn(*inputs[:3], *leaves).backward(grad_out)
        grads.append([leaf.grad for leaf in leaves])
    for mine, reference in zip(*grads):
        assert_close(mine, reference, FP32_OP, "gradient")


OUT_OF_RANGE = [("input_ids", 0, -1, VOCAB), ("input_ids", 0, VOCAB, VOCAB),
                ("position_ids", 1, -3, MAX_POSITIONS), ("position_ids", 1, MAX_POSITIONS, MAX_POSITIONS),
                ("token_type_ids", 2, -1, TYPE_VOCAB), ("token_type_ids", 2, TYPE_VOCAB, TYPE_VOCAB)]


def with_bad_index(inputs, which, value, at=4):
    inputs = list(inputs)
    bad = inputs[which].clone()
    bad[at] = value
    inputs[which] = bad
    return inputs


# Makes the C++ op raise in a fresh process (also run under cuda-gdb by benchmarks/gpu_session.sh).
RAISE_PROBE = Path(__file__).parent.parent / "extension_raise_probe.py"


@pytest.fixture(scope="session")
def op_errors_reach_python():
    """Tests that make the C++ op raise first check, in a child process, that its exceptions reach Python:
    where they crash the process, such a test fails with the child's report instead of taking its pytest
    worker down."""
    child = subprocess.run([sys.executable, "-X", "faulthandler", str(RAISE_PROBE)], capture_output=True,
                           text=True, timeout=300)
    if child.returncode != 0:
        pytest.fail(f"an exception thrown by fastbert._C does not reach Python in a fresh process (exit status "
                    f"{child.returncode}):\n{child.stdout}{child.stderr[-3000:]}", pytrace=False)


@needs_cpu_op
@pytest.mark.parametrize("name,which,value,limit", OUT_OF_RANGE)
def test_cpu_op_out_of_range_raises_naming_value_and_limit(op_errors_reach_python, name, which, value, limit):
    inputs = with_bad_index(make_inputs(7, 97), which, value)
    with pytest.raises(IndexError, match=rf"{name}\[4\] = {value} is out of range \[0, {limit}\)"):
        torch.ops.fastbert.embedding_layer_norm(*inputs, EPS)


@needs_cpu_op
def test_cpu_op_rejects_bad_arguments(op_errors_reach_python):
    inputs = make_inputs(5, 32)
    with pytest.raises(TypeError, match="ln_weight is Half but word_weight is Float"):
        torch.ops.fastbert.embedding_layer_norm(*inputs[:6], inputs[6].half(), inputs[7], EPS)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.fastbert.embedding_layer_norm(inputs[0].int(), *inputs[1:], EPS)
    with pytest.raises(ValueError, match="one entry per token"):
        torch.ops.fastbert.embedding_layer_norm(inputs[0][:3], *inputs[1:], EPS)
    with pytest.raises(ValueError, match="hidden size"):
        torch.ops.fastbert.embedding_layer_norm(*inputs[:6], inputs[6][:16], inputs[7], EPS)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        torch.ops.fastbert.embedding_layer_norm(*inputs[:3], *(t.double() for t in inputs[3:]), EPS)


# ---------------------------------------------------------------------------------------------------
# fastbert.ops.embeddings: backend choice and index checks (CPU).

def test_auto_on_cpu_runs_the_reference_bit_for_bit():
    inputs = make_inputs(7, 97)
    with backend.use_backend("auto"):
        assert E.active_backend("cpu") == "torch"
        out = E.embeddings(*inputs, EPS)
    assert torch.equal(out, E.embeddings_reference(*inputs, EPS))


def test_active_backend_follows_the_setting(monkeypatch):
    with backend.use_backend("torch"):
        assert E.active_backend("cpu") == E.active_backend("cuda") == "torch"
    with backend.use_backend("triton"):
        assert E.active_backend("cuda") == "triton"
    with backend.use_backend("auto"):
        monkeypatch.setattr(E, "_extension_usable_on", lambda device_type, index: True)
        assert E.active_backend("cuda") == "cuda-extension"
        assert E.active_backend("cpu") == "torch"
        monkeypatch.setattr(E, "_extension_usable_on", lambda device_type, index: False)
        assert E.active_backend("cuda") == ("triton" if backend.triton_available() else "torch")


def test_triton_setting_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        E.embeddings(*make_inputs(3, 64), EPS)


def test_reference_cases_dropout_inputs_embeds_autograd():
    inputs = make_inputs(6, 64)
    ids, rest = inputs[0], inputs[1:]
    # inputs_embeds replaces the word lookup (the model passes word_weight=None then).
    embeds = torch.randn(6, 64)
    out = E.embeddings(None, inputs[1], inputs[2], None, *inputs[4:], EPS, inputs_embeds=embeds)
    assert torch.equal(out, E.embeddings_reference(None, inputs[1], inputs[2], None, *inputs[4:], EPS,
                                                   inputs_embeds=embeds))
    # Autograd: gradients flow (the kernels have no backward; the reference runs).
    weight = inputs[3].clone().requires_grad_()
    E.embeddings(ids, *rest[:2], weight, *rest[3:], EPS).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    # Dropout: training-mode reference, so output differs from the dropout-free result.
    torch.manual_seed(0)
    dropped = E.embeddings(*inputs, EPS, dropout_p=0.5)
    assert (dropped == 0).any()


@pytest.mark.parametrize("name,which,value,limit", OUT_OF_RANGE)
def test_embeddings_out_of_range_on_cpu_names_value_and_limit(name, which, value, limit):
    inputs = with_bad_index(make_inputs(7, 64), which, value, at=5)
    with pytest.raises(IndexError, match=rf"{name}\[5\] = {value} is out of range \[0, {limit}\)"):
        E.embeddings(*inputs, EPS)


@needs_cpu_op
@pytest.mark.parametrize("name,which,value,limit", OUT_OF_RANGE)
def test_extension_path_raises_from_python_not_from_the_op(monkeypatch, name, which, value, limit):
    """On the extension path (forced here onto the op's CPU kernel) bad input raises in Python before the
    op runs: an exception thrown by the C++ op crashed the process on one GPU image (issue 6)."""
    monkeypatch.setattr(E, "_choose", lambda device: "cuda-extension")
    inputs = with_bad_index(make_inputs(7, 64), which, value, at=5)
    with pytest.raises(IndexError, match=rf"{name}\[5\] = {value} is out of range \[0, {limit}\)") as error:
        E.embeddings(*inputs, EPS)
    assert Path(str(error.traceback[-1].path)).name == "embeddings.py"  # raised by fastbert.ops.embeddings
    good = make_inputs(7, 64)
    with pytest.raises(ValueError, match="ln_weight has shape") as error:
        E.embeddings(*good[:6], good[6][:32], good[7], EPS)
    assert Path(str(error.traceback[-1].path)).name == "embeddings.py"
    check_against_reference(E.embeddings(*good, EPS), good, "extension path")


@pytest.mark.parametrize("setting", ["auto", "torch"])
def test_embeddings_on_fake_cuda_tensors(setting):
    """What torch.compile and CUDA-graph capture trace, without a GPU: the CUDA path (the extension or
    the Triton op under auto, the reference under torch) gives the right shape, dtype and device and
    skips the host-side index check (fake tensors hold no values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with backend.use_backend(setting), FakeTensorMode():
        inputs = make_inputs(9, 96, torch.float16, device="cuda")
        out = E.embeddings(*inputs, EPS)
    assert out.shape == (9, 96) and out.dtype == torch.float16 and out.device.type == "cuda"


def test_compiled_embeddings_on_cpu_has_no_graph_break():
    inputs = make_inputs(5, 64)
    compiled = torch.compile(E.embeddings, fullgraph=True, backend="aot_eager")
    assert_close(compiled(*inputs, EPS), E.embeddings_reference(*inputs, EPS), FP32_OP, "compiled")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [-1e-12, float("nan")])
def test_a_bad_eps_is_refused(eps):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        E.embeddings(*make_inputs(5, 64), eps)


def _shape_case(case):
    ids, positions, types, word, position, token_type, ln_weight, ln_bias = make_inputs(4, 8)
    embeds = None
    if case == "one token type for four ids":
        types = types[:1]
    elif case == "2-D ids":
        ids, positions, types = ids[None], positions[None], types[None]
    elif case == "0-D ids":
        ids, positions, types = ids[0], positions[0], types[0]
    elif case == "inputs_embeds of another width":
        word, embeds = None, torch.randn(4, 7)
    elif case == "inputs_embeds of other rows":
        word, embeds = None, torch.randn(3, 8)
    return (ids, positions, types, word, position, token_type, ln_weight, ln_bias, EPS), {"inputs_embeds": embeds}


@pytest.mark.parametrize("case, message", [
    ("one token type for four ids", r"input_ids, position_ids and token_type_ids must have one entry per token, "
                                    r"got shapes \(4,\), \(4,\), \(1,\)"),
    ("2-D ids", r"input_ids must be a 1-D tensor of packed tokens, got \(1, 4\)"),
    ("0-D ids", r"input_ids must be a 1-D tensor of packed tokens, got \(\)"),
    ("inputs_embeds of another width", r"position_weight has shape \(\d+, 8\) but the hidden size "
                                       r"\(inputs_embeds.shape\[1\]\) is 7"),
    ("inputs_embeds of other rows", r"inputs_embeds' rows, position_ids and token_type_ids must have one entry"),
])
def test_shapes_are_refused_by_name_on_every_path(case, message):
    """The reference (the CPU's path, and autograd's, dropout's, inputs_embeds') checks the shapes the
    kernels' paths check: one token type for four ids was broadcast (a wrong answer), 2-D ids gave a
    batch, 0-D ids one row."""
    args, kwargs = _shape_case(case)
    for dropout_p in (0.0, 0.1):
        with pytest.raises(ValueError, match=message):
            E.embeddings(*args, dropout_p=dropout_p, **kwargs)


@pytest.mark.parametrize("dropout_p", [-0.1, float("nan"), 1.5])
def test_a_bad_dropout_is_refused(dropout_p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        E.embeddings(*make_inputs(5, 64), EPS, dropout_p=dropout_p)


# The Triton kernel under the interpreter: the cases below run only in a child pytest process started
# with TRITON_INTERPRET=1 (test_triton_interpreter_in_subprocess).



test_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 75)


if IN_CHILD:  # collected only in the child, so the parent's report does not list them as skipped
    @pytest.mark.parametrize("table", [3, 4, 5])
    def test_interpreter_case_a_table_without_rows_is_refused_by_name(table):
        """Every index would be out of range, and the kernel's out-of-range rows still read row 0 (there
        is none): refused before the launch, naming the table."""
        inputs = list(make_inputs(5, 64))
        inputs[table] = inputs[table][:0]
        name = ("word_weight", "position_weight", "token_type_weight")[table - 3]
        for validate in (True, False):
            with backend.use_backend("triton"), pytest.raises(ValueError, match=f"{name} has no rows"):
                E.embeddings(*inputs, EPS, validate_indices=validate)

    @pytest.mark.parametrize("tokens", [1, 7, 33])
    @pytest.mark.parametrize("hidden", [97, 312, 768, 1024])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_triton_op_matches_reference(dtype, hidden, tokens):
        assert backend.triton_interpreter()
        inputs = make_inputs(tokens, hidden, dtype)
        with backend.use_backend("triton"):
            assert E.active_backend("cpu") == "triton"
            out = E.embeddings(*inputs, EPS)
        check_against_reference(out, inputs, f"triton interpreter {dtype} hidden={hidden} tokens={tokens}",
                                fp32_atol=FP32_INTERPRETER)

    @pytest.mark.parametrize("hidden", [97, 768, 8200])  # 8200: wider than one block, the LOOP variant
    def test_interpreter_case_launch_helper_writes_every_element(hidden):
        from fastbert.kernels import embeddings as kernels

        inputs = make_inputs(5, hidden, vocab=50)
        out = nan_like((5, hidden), torch.float32)
        flag = torch.zeros(1, dtype=torch.int32)
        kernels.embeddings_fwd(*inputs, EPS, out, flag)
        assert flag.item() == 0
        check_against_reference(out, inputs, f"launch helper hidden={hidden}", fp32_atol=FP32_INTERPRETER)

    @pytest.mark.parametrize("hidden", [97, 8200])  # one block; the LOOP variant
    @pytest.mark.parametrize("name,which,value,limit", OUT_OF_RANGE)
    def test_interpreter_case_out_of_range(name, which, value, limit, hidden):
        from fastbert.kernels import embeddings as kernels

        inputs = with_bad_index(make_inputs(7, hidden), which, value, at=3)
        with backend.use_backend("triton"), pytest.raises(IndexError, match=rf"{name}\[3\] = {value} .*\[0, {limit}\)"):
            E.embeddings(*inputs, EPS)
        # The kernel itself: never reads outside the tables, flags the row and writes it as NaN.
        out = nan_like((7, hidden), torch.float32)
        flag = torch.zeros(1, dtype=torch.int32)
        kernels.embeddings_fwd(*inputs, EPS, out, flag)
        assert flag.item() == 1
        assert torch.isnan(out[3]).all() and torch.isfinite(out[torch.arange(7) != 3]).all()


    @pytest.mark.parametrize("hidden", [97, 8200])  # one block; the LOOP variant
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_eps_is_added_to_the_variance(dtype, hidden):
        """eps = 1e-2 on rows of variance ~0.03 (tables scaled by 0.1): the kernel must add eps where the
        reference does (the 1e-12 of the other cases is below fp32 resolution of the variance)."""
        from fastbert.kernels import embeddings as kernels

        eps = 1e-2
        inputs = make_inputs(5, hidden, dtype, scale=0.1, vocab=50)
        out = nan_like((5, hidden), dtype)
        flag = torch.zeros(1, dtype=torch.int32)
        kernels.embeddings_fwd(*inputs, eps, out, flag)
        assert flag.item() == 0
        check_against_reference(out, inputs, f"eps={eps} {dtype} hidden={hidden}", fp32_atol=FP32_INTERPRETER,
                                eps=eps)
        # eps matters here: without it the result is well outside the budget.
        assert max_abs_diff(references(inputs, eps)[0], references(inputs, 0.0)[0]) > 0.1

    @pytest.mark.parametrize("hidden", [97, 8200])  # one block; the LOOP variant
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_constant_rows_give_ln_bias(dtype, hidden, monkeypatch):
        """Tables whose rows are constant (small integers, so every sum and mean is exact): each token's
        sum has variance 0, so LayerNorm gives ln_bias exactly, finite; only eps keeps 0 * 1/sqrt(0) from NaN."""
        counter = LaunchCounter(monkeypatch)
        inputs = list(make_inputs(7, hidden, dtype, vocab=50))
        for which, rows in ((3, 50), (4, MAX_POSITIONS), (5, TYPE_VOCAB)):
            values = (torch.arange(rows) % 7 - 3).to(dtype)
            inputs[which] = values[:, None].expand(rows, hidden).contiguous()
        with backend.use_backend("triton"):
            out = E.embeddings(*inputs, EPS)
        assert counter.count == 1
        assert torch.isfinite(out).all()
        assert torch.equal(out, inputs[7].expand(7, hidden)), (out - inputs[7]).abs().max()
        assert torch.equal(out, E.embeddings_reference(*inputs, EPS))

    @pytest.mark.parametrize("layout", ["every-other", "column"])
    @pytest.mark.parametrize("which", [0, 1, 2], ids=["input_ids", "position_ids", "token_type_ids"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_strided_indices(dtype, which, layout, monkeypatch):
        """Non-contiguous int64 ids, positions or types (the kernel indexes ``ptr + token``): the op
        copies them, and the result is the reference's on the same values."""
        counter = LaunchCounter(monkeypatch)
        inputs = list(make_inputs(33, 97, dtype))
        limit = (VOCAB, MAX_POSITIONS, TYPE_VOCAB)[which]
        if layout == "every-other":
            strided = torch.randint(0, limit, (66,))[::2]
        else:  # a column of a row-major [tokens, 3] tensor
            strided = torch.randint(0, limit, (33, 3))[:, 1]
        assert not strided.is_contiguous() and strided.dtype == torch.int64
        inputs[which] = strided
        with backend.use_backend("triton"):
            out = E.embeddings(*inputs, EPS)
        assert counter.count == 1
        check_against_reference(out, inputs, f"strided {layout} index {which} {dtype}", fp32_atol=FP32_INTERPRETER)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_autograd_takes_the_reference(dtype, monkeypatch):
        """Tables that require gradients under the Triton backend: the Triton op has no backward, so
        the reference runs; same output and gradients as the reference's, and no launch."""
        counter = LaunchCounter(monkeypatch)
        inputs = make_inputs(9, 97, dtype)
        grad_out = torch.randn(9, 97).to(dtype)
        results = []
        for name in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in inputs[3:]]
            with backend.use_backend(name):
                out = E.embeddings(*inputs[:3], *leaves, EPS)
            assert out.grad_fn is not None, name
            out.backward(grad_out)
            results.append((out.detach(), [leaf.grad for leaf in leaves]))
        assert counter.count == 0
        (out, grads), (ref_out, ref_grads) = results
        assert torch.equal(out, ref_out)
        for what, mine, reference in zip(("word", "position", "token_type", "ln_weight", "ln_bias"), grads, ref_grads):
            assert mine is not None and torch.equal(mine, reference), what

    @pytest.mark.parametrize("tables,dtype", [
        ((3,), torch.float16), ((4,), torch.float16), ((5,), torch.float16), ((6,), torch.float16),
        ((7,), torch.float16), ((3, 4, 5, 6, 7), torch.float64), ((4,), torch.float64)],
        ids=["fp16-word", "fp16-position", "fp16-token_type", "fp16-ln_weight", "fp16-ln_bias", "fp64-all",
             "fp64-position"])
    def test_interpreter_case_mixed_or_float64_tables_take_the_reference(tables, dtype, monkeypatch):
        """Some fp32 tables made fp16 (mixed dtypes), or float64 tables (which the kernels do not
        compute): the op runs the reference, which promotes or raises as PyTorch does; the result (or
        the error) is the reference's exactly, and no kernel is launched."""
        counter = LaunchCounter(monkeypatch)
        inputs = list(make_inputs(7, 97))
        for i in tables:
            inputs[i] = inputs[i].to(dtype)
        with backend.use_backend("triton"):
            got = outcome(lambda: E.embeddings(*inputs, EPS))
        expected = outcome(lambda: E.embeddings_reference(*inputs, EPS))
        assert counter.count == 0
        if isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor), got
            assert got.dtype == expected.dtype and torch.equal(got, expected), (got.dtype, expected.dtype)
        else:
            assert got == expected

    @pytest.mark.parametrize("shape", ["longer", "2-D"])
    @pytest.mark.parametrize("which", [1, 2], ids=["position_ids", "token_type_ids"])
    def test_interpreter_case_positions_or_types_of_another_shape_are_refused(which, shape, monkeypatch):
        """position_ids / token_type_ids must have one entry per token: another shape is refused with a
        ValueError naming them, before any kernel runs (the kernel would read ``ptr + token``)."""
        counter = LaunchCounter(monkeypatch)
        inputs = list(make_inputs(7, 64))
        limit = (VOCAB, MAX_POSITIONS, TYPE_VOCAB)[which]
        inputs[which] = torch.randint(0, limit, (9,)) if shape == "longer" else inputs[which][:, None]
        for validate in (True, False):
            with backend.use_backend("triton"), pytest.raises(
                    ValueError, match=r"input_ids, position_ids and token_type_ids must have one entry per token"):
                E.embeddings(*inputs, EPS, validate_indices=validate)
        assert counter.count == 0


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU).

@needs_cuda_extension
@pytest.mark.parametrize("tokens", TOKENS + [1000])
@pytest.mark.parametrize("hidden", HIDDEN + [1023, 8, 20000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_extension_matches_reference(dtype, hidden, tokens):
    inputs = make_inputs(tokens, hidden, dtype, device="cuda")
    out = poisoned_call(lambda: torch.ops.fastbert.embedding_layer_norm(*inputs, EPS), (tokens, hidden), dtype,
                        "cuda")
    check_against_reference(out, inputs, f"CUDA {dtype} hidden={hidden} tokens={tokens}")


@needs_cuda_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_extension_misaligned_tables_take_the_scalar_path(dtype):
    inputs = list(make_inputs(9, 768, dtype, device="cuda"))
    inputs[3] = torch.randn(VOCAB * 768 + 1, device="cuda").to(dtype)[1:].view(VOCAB, 768)  # 2- or 4-byte offset
    check_against_reference(torch.ops.fastbert.embedding_layer_norm(*inputs, EPS), inputs, f"misaligned {dtype}")


@needs_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_extension_large_activations(dtype):
    inputs = make_inputs(64, 1024, dtype, device="cuda", scale=600.0)
    check_against_reference(torch.ops.fastbert.embedding_layer_norm(*inputs, EPS), inputs, f"large {dtype}")


@needs_cuda_extension
@pytest.mark.parametrize("name,which,value,limit", OUT_OF_RANGE)
def test_cuda_extension_out_of_range_raises_and_context_survives(op_errors_reach_python, name, which, value, limit):
    inputs = with_bad_index(make_inputs(33, 768, device="cuda"), which, value, at=4)
    with pytest.raises(IndexError, match=rf"{name}\[4\] = {value} is out of range \[0, {limit}\)"):
        torch.ops.fastbert.embedding_layer_norm(*inputs, EPS)
    with backend.use_backend("auto"), pytest.raises(IndexError, match=rf"{name}\[4\]"):
        E.embeddings(*inputs, EPS)
    torch.cuda.synchronize()  # no sticky error: the context is usable
    good = make_inputs(33, 768, device="cuda")
    check_against_reference(torch.ops.fastbert.embedding_layer_norm(*good, EPS), good, "after the error")


@needs_cuda_extension
def test_cuda_extension_without_index_validation_is_safe():
    """validate_indices=False (the model validated at its boundary): no read-back, no exception; a bad
    index gives a NaN row, never an out-of-bounds read, and the other rows are right."""
    inputs = with_bad_index(make_inputs(33, 768, device="cuda"), 0, VOCAB + 3, at=4)
    with backend.use_backend("auto"):
        out = E.embeddings(*inputs, EPS, validate_indices=False)
    torch.cuda.synchronize()
    assert torch.isnan(out[4]).all() and torch.isfinite(out[torch.arange(33, device="cuda") != 4]).all()


@needs_cuda_extension
def test_cuda_extension_in_a_cuda_graph():
    inputs = make_inputs(40, 768, torch.float16, device="cuda")
    static_ids = inputs[0].clone()
    torch.ops.fastbert.embedding_layer_norm(static_ids, *inputs[1:], EPS)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fastbert.embedding_layer_norm(static_ids, *inputs[1:], EPS)
    static_ids.copy_(torch.randint(0, VOCAB, (40,), device="cuda"))
    graph.replay()
    check_against_reference(out.clone(), [static_ids, *inputs[1:]], "graph replay")
    # Inside a graph there is no exception (no sync allowed): the bad row is NaN, the others are right.
    static_ids[7] = VOCAB + 5
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(out[7]).all() and torch.isfinite(out[torch.arange(40, device="cuda") != 7]).all()


@needs_cuda_extension
def test_cuda_auto_backend_uses_the_extension_and_compiles():
    inputs = make_inputs(33, 768, torch.float16, device="cuda")
    with backend.use_backend("auto"):
        assert E.active_backend("cuda") == "cuda-extension"
        check_against_reference(E.embeddings(*inputs, EPS), inputs, "auto on CUDA")
        compiled = torch.compile(E.embeddings, fullgraph=True)
        check_against_reference(compiled(*inputs, EPS), inputs, "compiled auto on CUDA")


@needs_cuda
@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("hidden", [97, 312, 768, 4096, 9000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton_matches_reference(dtype, hidden):
    inputs = make_inputs(33, hidden, dtype, device="cuda")
    with backend.use_backend("triton"):
        out = poisoned_call(lambda: E.embeddings(*inputs, EPS), (33, hidden), dtype, "cuda")
    check_against_reference(out, inputs, f"Triton CUDA {dtype} hidden={hidden}")


@needs_cuda
@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("name,which,value,limit", OUT_OF_RANGE)
def test_cuda_triton_and_reference_out_of_range_raise_and_context_survives(name, which, value, limit):
    inputs = with_bad_index(make_inputs(33, 768, device="cuda"), which, value, at=4)
    for setting in ("triton", "torch"):
        with backend.use_backend(setting), pytest.raises(IndexError, match=rf"{name}\[4\] = {value} .*\[0, {limit}\)"):
            E.embeddings(*inputs, EPS)
    torch.cuda.synchronize()
    good = make_inputs(33, 768, device="cuda")
    with backend.use_backend("triton"):
        check_against_reference(E.embeddings(*good, EPS), good, "after the error")
