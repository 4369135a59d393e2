"""Bias + residual + LayerNorm: the Triton kernel against ``bias_residual_layer_norm_reference``.

- Under ``TRITON_INTERPRET=1`` on CPU tensors, in a child pytest process (Triton reads the variable
  when the kernel is defined, so it must be set before fastbert is imported, and must not leak into
  this process, whose fake-CUDA and compile tests need real JIT kernels): fp32 and fp16, NaN-filled
  outputs, hidden sizes 97 to 4096 and a row wider than one block (the chunked loop), no bias,
  strided rows, zero rows, large activations, gradients.
- On a GPU (skipped without one): the same checks, bf16 too.
- Here, without Triton running: the backend choice and the input checks.

Budgets (DESIGN.md): fp32 1e-5 (the op); fp16 / bf16: error against the fp32 reference <= 2x
PyTorch's own error at that dtype + 1e-3.
"""

from __future__ import annotations

import functools
import importlib
import re

import pytest
import torch

from fastbert.ops import backend
from tests import helpers
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.helpers import interpreter_parent_test, interpreted_kernel_fixture, registered_schema_test
from tests.helpers import FP32_OP, assert_close, assert_low_precision_within_budget, max_abs_diff, nan_like

L = importlib.import_module("fastbert.ops.bias_residual_layer_norm")  # the module, not the function


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()

HIDDEN = [97, 312, 384, 768, 1024, 4096, 8200]  # 8200: wider than 8192, the chunked-loop variant
ROWS = [1, 13]
EPS = [1e-12, 1e-5]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def make_inputs(rows, hidden, dtype=torch.float32, device="cpu", scale=1.0):
    """Fresh random x, bias, residual; LayerNorm weight and bias random (never the 1 / 0 defaults)."""
    x = scale * torch.randn(rows, hidden, device=device)
    bias = torch.randn(hidden, device=device)
    residual = scale * torch.randn(rows, hidden, device=device) + 0.5  # a mean away from zero
    weight = 1 + 0.5 * torch.randn(hidden, device=device)
    ln_bias = 0.5 * torch.randn(hidden, device=device)
    return tuple(t.to(dtype) for t in (x, bias, residual, weight, ln_bias))


def check(out, inputs, eps, what):
    x, bias, residual, weight, ln_bias = inputs
    fp32 = L.bias_residual_layer_norm_reference(*(None if t is None else t.float() for t in inputs), eps)
    assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    if x.dtype == torch.float32:
        assert_close(out, fp32, FP32_OP, what)
    else:
        same = L.bias_residual_layer_norm_reference(*inputs, eps)
        assert_low_precision_within_budget(out.float(), fp32, same.float(), what)


# Counts the op's launches (a quiet fallback to the reference cannot pass as a kernel run).
LaunchCounter = functools.partial(helpers.LaunchCounter, module=L, name="bias_residual_layer_norm_fwd")


def launch(inputs, eps, num_sms=132):
    """The launch helper on a NaN-filled output: any element it does not write fails the check.
    ``num_sms``: the GPU the grid is sized for (1: the default blocks at any row count; 132: one row a
    program for fewer than 132 programs' worth of rows)."""
    from fastbert.kernels.bias_residual_layer_norm import bias_residual_layer_norm_fwd

    x, bias, residual, weight, ln_bias = inputs
    out = nan_like(x.shape, x.dtype, x.device)
    bias = torch.zeros_like(weight) if bias is None else bias
    bias_residual_layer_norm_fwd(x, bias, residual, weight, ln_bias, eps, out, num_sms)
    return out


# ---------------------------------------------------------------------------------------------------
# Checks shared by the interpreter (CPU) and the GPU.

GRIDS = {"one-row": 10_000, "default-blocks": 1}  # SM counts that pick each grid at these row counts


def case_launch_helper(device, dtype, hidden, rows, eps, grid):
    inputs = make_inputs(rows, hidden, dtype, device)
    check(launch(inputs, eps, GRIDS[grid]), inputs, eps, f"{device} {dtype} hidden={hidden} rows={rows} eps={eps} {grid}")


def case_op(device, dtype, monkeypatch):
    counter = LaunchCounter(monkeypatch)
    inputs = make_inputs(2 * 5, 312, dtype, device)
    x, bias, residual, weight, ln_bias = inputs
    with backend.use_backend("triton"):
        assert L.active_backend(device) == "triton"
        out3 = L.bias_residual_layer_norm(x.view(2, 5, 312), bias, residual.view(2, 5, 312), weight, ln_bias, 1e-12)
        no_bias = L.bias_residual_layer_norm(x, None, residual, weight, ln_bias, 1e-12)
    assert counter.count == 2
    check(out3.view(-1, 312), inputs, 1e-12, f"op {dtype}")
    check(no_bias, (x, None, residual, weight, ln_bias), 1e-12, f"op without bias {dtype}")


def case_strided_rows(device):
    wide = torch.randn(9, 800, device=device)
    x = wide[:, 16:784]  # row stride 800: read in place
    _, bias, residual, weight, ln_bias = make_inputs(9, 768, device=device)
    residual = torch.randn(768, 9, device=device).t()  # column stride != 1: the op copies it
    with backend.use_backend("triton"):
        out = L.bias_residual_layer_norm(x, bias, residual, weight, ln_bias, 1e-12)
    check(out, (x, bias, residual, weight, ln_bias), 1e-12, "strided rows")


def case_zero_rows(device):
    inputs = make_inputs(0, 384, device=device)
    with backend.use_backend("triton"):
        out = L.bias_residual_layer_norm(*inputs, 1e-12)
    assert out.shape == (0, 384)


def case_large_activations(device, dtype):
    """Values of 1e3 with a large common offset: fp32 statistics keep fp16 finite and accurate
    (a one-pass E[x^2] - E[x]^2 in fp16 would overflow or cancel)."""
    inputs = list(make_inputs(6, 768, dtype, device, scale=300.0))
    inputs[0] = (inputs[0].float() + 2000).to(dtype)
    out = launch(inputs, 1e-5)
    assert torch.isfinite(out).all()
    check(out, inputs, 1e-5, f"large activations {dtype}")


def case_gradients(device):
    inputs = make_inputs(7, 97, torch.float32, device)
    weight_out = torch.randn(7, 97, device=device)
    grads = []
    for name in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with backend.use_backend(name):
            (L.bias_residual_layer_norm(*leaves, 1e-5) * weight_out).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, ours, ref in zip(("x", "bias", "residual", "weight", "ln_bias"), *grads):
        assert_close(ours, ref, 1e-4 if name in ("bias", "weight", "ln_bias") else FP32_OP, f"grad {name}")


def case_non_contiguous_vectors(device, dtype, which, monkeypatch):
    """A strided bias, LayerNorm weight or LayerNorm bias (every other element of a longer vector): the
    kernel reads them at unit stride, so the op copies them; the result is the reference's."""
    counter = LaunchCounter(monkeypatch)
    inputs = list(make_inputs(7, 312, dtype, device))
    index = {"bias": 1, "weight": 3, "ln_bias": 4}[which]
    # Cast first, then slice: .to() of a strided view would hand back a contiguous copy.
    wide = (1 + 0.5 * torch.randn(2 * 312, device=device)).to(dtype)
    inputs[index] = wide[::2]
    assert not inputs[index].is_contiguous()
    with backend.use_backend("triton"):
        out = L.bias_residual_layer_norm(*inputs, 1e-12)
    assert counter.count == 1
    check(out, inputs, 1e-12, f"non-contiguous {which} {dtype}")


MIXED = {  # which inputs are fp16 (the others fp32): the reference promotes x + bias + residual to fp32
    "x": ("x",),
    "x-and-bias": ("x", "bias"),
    "x-and-residual": ("x", "residual"),
    "x-no-bias": ("x",),
    "residual": ("residual",),
}


def case_mixed_dtypes(device, case, monkeypatch):
    """fp16 and fp32 inputs together (x in fp16 with an fp32 residual or bias, as when one sub-layer
    runs in another precision): the kernel runs and its result has the reference's dtype (PyTorch's
    promotion of ``x + bias + residual``: fp32) and is within the fp32 budget of the reference on the
    same values in fp32 (the reference itself rounds an fp16 ``x + bias`` to fp16; the kernel sums in fp32)."""
    counter = LaunchCounter(monkeypatch)
    names = ("x", "bias", "residual", "weight", "ln_bias")
    inputs = [t.to(torch.float16) if name in MIXED[case] else t
              for name, t in zip(names, make_inputs(9, 97, device=device))]
    if case == "x-no-bias":
        inputs[1] = None
    with backend.use_backend("triton"):
        out = L.bias_residual_layer_norm(*inputs, 1e-5)
    assert counter.count == 1
    reference = L.bias_residual_layer_norm_reference(*inputs, 1e-5)
    assert reference.dtype == torch.float32
    assert out.dtype == reference.dtype and out.shape == reference.shape, (out.dtype, reference.dtype)
    fp32 = L.bias_residual_layer_norm_reference(*(None if t is None else t.float() for t in inputs), 1e-5)
    assert_close(out, fp32, FP32_OP, f"mixed dtypes {case}")


def case_float64_takes_the_reference(device, monkeypatch):
    """float64 inputs, even under a forced Triton backend: the kernel's fp32 statistics would lose
    fp64 accuracy (and it has no fp64 variant), so the reference runs, bit for bit."""
    counter = LaunchCounter(monkeypatch)
    inputs = make_inputs(5, 97, torch.float64, device)
    with backend.use_backend("triton"):
        out = L.bias_residual_layer_norm(*inputs, 1e-12)
    assert counter.count == 0
    assert out.dtype == torch.float64 and torch.equal(out, L.bias_residual_layer_norm_reference(*inputs, 1e-12))


# ---------------------------------------------------------------------------------------------------
# Without Triton running (this process): backend choice and checks.

def test_cpu_defaults_to_the_reference(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert L.active_backend("cpu") == "torch"
    assert L.active_backend("cuda") == ("triton" if backend.triton_available() else "torch")
    inputs = make_inputs(3, 97)
    assert torch.equal(L.bias_residual_layer_norm(*inputs, 1e-12), L.bias_residual_layer_norm_reference(*inputs, 1e-12))


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        L.bias_residual_layer_norm(*make_inputs(3, 97), 1e-12)


def test_bad_inputs_are_refused():
    x, bias, residual, weight, ln_bias = make_inputs(3, 97)
    with pytest.raises(ValueError, match="do not match"):
        L.bias_residual_layer_norm(x, bias, residual[:, :-1], weight, ln_bias, 1e-12)
    with pytest.raises(ValueError, match="must be"):
        L.bias_residual_layer_norm(x, bias[:-1], residual, weight, ln_bias, 1e-12)


@pytest.mark.parametrize("shape", [(96,), (98,), (1, 97)], ids=str)
@pytest.mark.parametrize("which", ["weight", "ln_bias"])
def test_layer_norm_weight_or_bias_of_another_shape_is_refused_by_name(which, shape):
    """LayerNorm weight and bias must be [hidden]: another shape is a ValueError naming the tensor
    (the kernel would read ``hidden`` elements of it), not the reference's RuntimeError."""
    x, bias, residual, weight, ln_bias = make_inputs(3, 97)
    shown = re.escape(str(shape))
    if which == "weight":
        weight, match = torch.randn(shape), rf"and LayerNorm weight {shown} do not match"
    else:
        ln_bias, match = torch.randn(shape), rf"and LayerNorm bias {shown} must be \[97\]"
    with pytest.raises(ValueError, match=match):
        L.bias_residual_layer_norm(x, bias, residual, weight, ln_bias, 1e-12)


@pytest.mark.skipif(not backend.triton_available(), reason="needs Triton installed")
def test_float64_takes_the_reference(monkeypatch):
    case_float64_takes_the_reference("cpu", monkeypatch)


def test_a_0d_input_and_a_bad_eps_are_refused():
    """A 0-d x has no row to normalize (its 0-d weight would have "matched"); a negative or NaN eps
    would make every row NaN."""
    scalar = torch.tensor(1.0)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        L.bias_residual_layer_norm(scalar, None, scalar, scalar, scalar, 1e-12)
    inputs = make_inputs(3, 97)
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            L.bias_residual_layer_norm(*inputs, eps)
    for dropout_p in (-0.5, 1.5, float("nan")):  # the kernels' path ran them without dropout
        for name in ("torch", "triton"):
            with backend.use_backend(name), pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
                L.bias_residual_layer_norm(*inputs, 1e-5, dropout_p=dropout_p)


def test_dropout_takes_the_reference(monkeypatch):
    counter = LaunchCounter(monkeypatch)
    inputs = make_inputs(3, 97)
    with backend.use_backend("triton"):
        out = L.bias_residual_layer_norm(*inputs, 1e-12, dropout_p=0.5)
    assert counter.count == 0 and out.shape == inputs[0].shape


class GridRecorder:
    """Stands in for the kernel: records the grid and block of each launch (no Triton run)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, meta["BLOCK_M"], meta["num_warps"]))


@pytest.mark.parametrize("rows, num_sms, expected", [
    (128, 132, ((128,), 1, 1)),  # BERT-base at 1 x 128: one row a program on an H100 / H200
    (1055, 132, ((132,), 8, 4)),  # 132 programs of 8 rows fill 132 SMs: the default blocks
    (1024, 132, ((1024,), 1, 1)),  # 128 programs of 8 would leave 4 SMs idle
    (4096, 132, ((512,), 8, 4)),
    (128, 16, ((16,), 8, 4)),  # a 16-SM GPU is filled by the default blocks
])
def test_few_rows_take_one_row_a_program(rows, num_sms, expected):
    from fastbert.kernels.bias_residual_layer_norm import bias_residual_layer_norm_fwd

    x, bias, residual, weight, ln_bias = make_inputs(rows, 768)
    kernel = GridRecorder()
    bias_residual_layer_norm_fwd(x, bias, residual, weight, ln_bias, 1e-12, torch.empty_like(x), num_sms, kernel)
    assert kernel.launches == [expected]


def test_one_row_configurations_keep_the_chunks_and_cut_the_warps():
    from fastbert.kernels.bias_residual_layer_norm import fills_the_gpu, layer_norm_config

    for cols, block_n, chunks, warps in ((768, 256, 3, 1), (384, 128, 3, 1), (3072, 1024, 3, 2),
                                         (1024, 1024, 1, 2), (97, 128, 1, 1)):
        cfg = layer_norm_config(cols, True)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["CHUNKS"], cfg["num_warps"]) == (1, block_n, chunks, warps), cols
        default = layer_norm_config(cols)
        assert {k: v for k, v in cfg.items() if k not in ("BLOCK_M", "num_warps")} == \
            {k: v for k, v in default.items() if k not in ("BLOCK_M", "num_warps")}
    assert layer_norm_config(20000, True) == layer_norm_config(20000)  # the loop is one row already
    assert fills_the_gpu(1, 4096, 132)  # one row a program is the default there
    shape_env = torch.fx.experimental.symbolic_shapes.ShapeEnv()
    symbolic_rows = shape_env.create_unbacked_symint()
    assert fills_the_gpu(symbolic_rows, 768, 132)  # no guard on a symbolic row count: the default blocks


@pytest.mark.skipif(not backend.triton_available(), reason="needs Triton installed")
def test_the_op_sizes_the_grid_for_the_tensors_gpu(monkeypatch):
    """The op passes the SM count of the tensors' GPU (an H100's 132 where there is none to ask)."""
    x, bias, residual, weight, ln_bias = make_inputs(128, 768)
    kernel = GridRecorder()
    L._launch(x, bias, residual, weight, ln_bias, 1e-12, kernel)
    monkeypatch.setattr(backend, "gpu_description", lambda t: (90, 8))
    L._launch(x, bias, residual, weight, ln_bias, 1e-12, kernel)
    assert kernel.launches == [((128,), 1, 1), ((16,), 8, 4)]


test_fused_op_is_registered = registered_schema_test(
    "bias_residual_layer_norm",
    "fastbert::bias_residual_layer_norm(Tensor x, Tensor? bias, Tensor residual, Tensor weight, "
    "Tensor ln_bias, float eps) -> Tensor",
)


# ---------------------------------------------------------------------------------------------------
# The interpreter: these cases are defined only in the child process.

test_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 42)


if IN_CHILD:
    _kernel_is_interpreted = interpreted_kernel_fixture(
        "fastbert.kernels.bias_residual_layer_norm", "_bias_residual_layer_norm_fwd_kernel")

    @pytest.mark.parametrize("grid", GRIDS)
    @pytest.mark.parametrize("eps", EPS)
    @pytest.mark.parametrize("rows", ROWS)
    @pytest.mark.parametrize("hidden", HIDDEN)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_launch_helper(dtype, hidden, rows, eps, grid):
        case_launch_helper("cpu", dtype, hidden, rows, eps, grid)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_op(dtype, monkeypatch):
        case_op("cpu", dtype, monkeypatch)

    def test_interpreter_case_strided_rows():
        case_strided_rows("cpu")

    def test_interpreter_case_zero_rows(monkeypatch):
        counter = LaunchCounter(monkeypatch)
        case_zero_rows("cpu")
        assert counter.count == 1  # called, and launches nothing for an empty grid

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_large_activations(dtype):
        case_large_activations("cpu", dtype)

    def test_interpreter_case_gradients(monkeypatch):
        counter = LaunchCounter(monkeypatch)
        case_gradients("cpu")
        assert counter.count == 1  # the Triton forward ran under autograd; the backward is the reference's

    def test_interpreter_case_loop_variant_equals_single_block():
        """Rows of 8200 columns (the chunked loop) against the same rows through the reference, and
        the loop's three sweeps agree with the single-block kernel on a row that fits both."""
        from fastbert.kernels import bias_residual_layer_norm as K

        inputs = make_inputs(3, 4096)
        single = launch(inputs, 1e-12)
        looped = nan_like(single.shape, single.dtype)
        x, bias, residual, weight, ln_bias = inputs
        K._bias_residual_layer_norm_fwd_kernel[(3,)](
            x, bias, residual, weight, ln_bias, looped, 3, 4096, x.stride(0), residual.stride(0), looped.stride(0),
            1e-12, BLOCK_M=1, BLOCK_N=1024, LOOP=True)
        assert max_abs_diff(looped, single) <= FP32_OP

    @pytest.mark.parametrize("hidden", [312, 768, 1024])
    def test_interpreter_case_variants_agree(hidden):
        """The launcher's choice (three chunks for 312 masked and 768 even; one even block for 1024)
        against one power-of-two block masked past ``hidden``, on the same 5 rows."""
        from fastbert.kernels import bias_residual_layer_norm as K

        inputs = make_inputs(5, hidden)
        chosen = launch(inputs, 1e-12)
        assert K.layer_norm_config(hidden)["CHUNKS"] == (1 if hidden == 1024 else 3)
        masked = nan_like(chosen.shape, chosen.dtype)
        x, bias, residual, weight, ln_bias = inputs
        K._bias_residual_layer_norm_fwd_kernel[(3,)](
            x, bias, residual, weight, ln_bias, masked, 5, hidden, x.stride(0), residual.stride(0), masked.stride(0),
            1e-12, BLOCK_M=2, BLOCK_N=next_power_of_2(hidden), LOOP=False, CHUNKS=1, EVEN=False)
        assert max_abs_diff(masked, chosen) <= FP32_OP

    @pytest.mark.parametrize("which", ["bias", "weight", "ln_bias"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_non_contiguous_vectors(dtype, which, monkeypatch):
        case_non_contiguous_vectors("cpu", dtype, which, monkeypatch)

    @pytest.mark.parametrize("case", MIXED)
    def test_interpreter_case_mixed_dtypes(case, monkeypatch):
        case_mixed_dtypes("cpu", case, monkeypatch)

    def test_interpreter_case_float64_takes_the_reference(monkeypatch):
        case_float64_takes_the_reference("cpu", monkeypatch)

    def test_interpreter_case_opcheck():
        inputs = make_inputs(4, 97)
        x, bias, residual, weight, ln_bias = inputs
        for args in ((*inputs, 1e-12), (x, None, residual, weight, ln_bias, 1e-5),
                     (x.requires_grad_(), bias, residual, weight.requires_grad_(), ln_bias, 1e-12)):
            torch.library.opcheck(torch.ops.fastbert.bias_residual_layer_norm.default, args,
                                  test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------------
# GPU (compiled kernels; skipped without one).

@needs_cuda
@pytest.mark.skipif(IN_CHILD, reason="GPU cases run in the parent process")
class TestCuda:
    DTYPES = [torch.float32, torch.float16, torch.bfloat16]

    @pytest.mark.parametrize("grid", GRIDS)
    @pytest.mark.parametrize("rows", ROWS + [4097])
    @pytest.mark.parametrize("hidden", HIDDEN + [20000])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_launch_helper(self, dtype, hidden, rows, grid):
        case_launch_helper("cuda", dtype, hidden, rows, 1e-12, grid)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_op_and_large_activations(self, dtype, monkeypatch):
        case_op("cuda", dtype, monkeypatch)
        case_large_activations("cuda", dtype)

    def test_strided_zero_rows_and_gradients(self):
        case_strided_rows("cuda")
        case_zero_rows("cuda")
        case_gradients("cuda")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_non_contiguous_vectors_mixed_and_float64(self, dtype, monkeypatch):
        for which in ("bias", "weight", "ln_bias"):
            case_non_contiguous_vectors("cuda", dtype, which, monkeypatch)
        if dtype == torch.float32:
            for case in MIXED:
                case_mixed_dtypes("cuda", case, monkeypatch)
            case_float64_takes_the_reference("cuda", monkeypatch)

    def test_torch_compile_fullgraph(self):
        inputs = make_inputs(64, 768, torch.float16, "cuda")
        compiled = torch.compile(lambda *a: L.bias_residual_layer_norm(*a, 1e-12), fullgraph=True)
        check(compiled(*inputs), inputs, 1e-12, "torch.compile")
