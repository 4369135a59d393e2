"""Bias + activation: the Triton kernel against ``bias_activation_reference``.

- Under ``TRITON_INTERPRET=1`` on CPU tensors, in a child pytest process (Triton reads the variable
  when the kernel is defined, so it must be set before fastbert is imported, and must not leak into
  this process, whose fake-CUDA and compile tests need real JIT kernels): fp32 and fp16, NaN-filled
  outputs, odd shapes, a strided input, no bias, zero rows, gradients.
- On a GPU (skipped without one): the same checks, bf16 too.
- Here, without Triton running: the backend choice and the input checks.

Budgets (DESIGN.md): fp32 1e-5 (the op; 1e-4 is the interpreter's allowance, not needed here);
fp16 / bf16: error against the fp32 reference <= 2x PyTorch's own error at that dtype + 1e-3.
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
from tests.helpers import FP32_OP, assert_close, assert_low_precision_within_budget, nan_like

A = importlib.import_module("fastbert.ops.bias_activation")  # the module, not the same-named function

ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]
SHAPES = [(1, 1), (7, 37), (37, 301), (5, 3072), (3, 1024)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def make_inputs(rows, cols, dtype=torch.float32, device="cpu", scale=3.0):
    """Fresh random x (of order ``scale``, so both tails of GELU are exercised) and bias."""
    x = (scale * torch.randn(rows, cols, device=device)).to(dtype)
    bias = torch.randn(cols, device=device).to(dtype)
    return x, bias


def check(out, x, bias, activation, what):
    """fp32: 1e-5 against the reference; 16-bit: the low-precision budget against the fp32 reference
    computed from the same (rounded) inputs."""
    fp32 = A.bias_activation_reference(x.float(), None if bias is None else bias.float(), activation)
    assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    if x.dtype == torch.float32:
        assert_close(out, fp32, FP32_OP, what)
    else:
        same = A.bias_activation_reference(x, bias, activation)
        assert_low_precision_within_budget(out.float(), fp32, same.float(), what)


# Counts the op's launches (a quiet fallback to the reference cannot pass as a kernel run).
LaunchCounter = functools.partial(helpers.LaunchCounter, module=A, name="bias_activation_fwd")


def launch(x, bias, activation):
    """The launch helper on a NaN-filled output: any element it does not write fails the check."""
    from fastbert.kernels.bias_activation import bias_activation_fwd

    out = nan_like(x.shape, x.dtype, x.device)
    bias = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device) if bias is None else bias
    bias_activation_fwd(x, bias, activation, out)
    return out


# ---------------------------------------------------------------------------------------------------
# Checks shared by the interpreter (CPU) and the GPU.

def case_launch_helper(device, dtype, activation, shape):
    x, bias = make_inputs(*shape, dtype, device)
    check(launch(x, bias, activation), x, bias, activation, f"{device} {dtype} {activation} {shape}")


def case_op(device, dtype, activation, monkeypatch):
    counter = LaunchCounter(monkeypatch)
    x, bias = make_inputs(2 * 9, 301, dtype, device)
    x3 = x.view(2, 9, 301)  # any leading shape
    with backend.use_backend("triton"):
        assert A.active_backend(device) == "triton"
        out = A.bias_activation(x3, bias, activation)
        no_bias = A.bias_activation(x, None, activation)
    assert counter.count == 2
    check(out.view(-1, 301), x, bias, activation, f"op {dtype} {activation}")
    check(no_bias, x, None, activation, f"op without bias {dtype} {activation}")


def case_strided_input(device, activation):
    wide = torch.randn(11, 300, device=device) * 3
    x = wide[:, 5:260]  # row stride 300, unit column stride: read in place
    bias = torch.randn(255, device=device)
    check(launch(x, bias, activation), x, bias, activation, "strided x")
    transposed = torch.randn(255, 11, device=device).t()  # column stride != 1: the op copies
    with backend.use_backend("triton"):
        check(A.bias_activation(transposed, bias, activation), transposed, bias, activation, "transposed x")


def case_zero_rows(device):
    x = torch.randn(0, 64, device=device)
    with backend.use_backend("triton"):
        out = A.bias_activation(x, torch.randn(64, device=device), "gelu")
    assert out.shape == (0, 64)


def case_extreme_values(device, dtype, activation):
    """Tails: |x| up to 60 (exp(-2u) would overflow without the clamp), exact zeros in the input."""
    x = torch.linspace(-60, 60, 1201, device=device).to(dtype).view(1, -1).repeat(3, 1)
    x[1] = 0
    bias = torch.zeros(x.shape[1], device=device, dtype=dtype)
    out = launch(x, bias, activation)
    check(out, x, bias, activation, f"extreme values {dtype} {activation}")


def case_huge_inputs(device, activation):
    """|x| from 1e4 to 3e38 (fp32): every activation gives its limits, x above and 0 below (the cube in
    the tanh form overflows there; x / (1 + e^80) would give -1805 at -1e38)."""
    x = torch.tensor([[-3e38, -1e38, -1e30, -1e4, 1e4, 1e30, 1e38, 3e38]], device=device)
    out = launch(x, torch.zeros(x.shape[1], device=device), activation)
    assert torch.equal(out, torch.where(x > 0, x, 0.0)), out


def case_gelu_tails(device):
    """erf-GELU against a float64 oracle written with ``erfc`` (no cancellation), where PyTorch's own
    fp32 ``1 + erf`` loses every digit (x < -6): relative error <= 2e-5 down to the smallest normal
    result (a 4M-point sample peaked at 1.06e-5, near x = -13). Non-finite inputs: inf -> inf, NaN -> NaN, -inf -> 0 (the limit; PyTorch gives NaN)."""
    x = torch.cat([torch.linspace(-17, 17, 4001), torch.tensor([-1e-30, 1e-30, 1e30, -1e30])]).view(1, -1)
    x64 = x.double()
    exact = 0.5 * x64 * torch.special.erfc(-x64 / 2 ** 0.5)
    out = launch(x.to(device), torch.zeros(x.shape[1], device=device), "gelu").cpu()
    normal = exact.abs() > torch.finfo(torch.float32).tiny
    relative = ((out.double() - exact).abs() / exact.abs())[normal]
    assert relative.max() <= 2e-5, f"erf-GELU relative error {relative.max():.2e}"
    assert out[~normal].abs().max() <= torch.finfo(torch.float32).tiny  # flushed to (almost) 0
    torch_fp32 = torch.nn.functional.gelu(x)
    assert ((torch_fp32.double() - exact).abs() / exact.abs())[normal].max() > 0.5  # why float64
    specials = torch.tensor([[float("inf"), float("nan"), -float("inf")]], device=device)
    got = launch(specials, torch.zeros(3, device=device), "gelu").cpu()[0]
    assert got[0] == float("inf") and got[1].isnan() and got[2] == 0, got


def case_relu_keeps_nan(device, dtype):
    """ReLU of NaN is NaN, as ``torch.relu`` (a ``max(x, 0)`` would give 0 and hide it); the other
    values are torch.relu's exactly: negatives and -0.0 to 0, +-inf to inf and 0."""
    x = torch.tensor([[float("nan"), -1.0, 2.0, -0.0, float("inf"), -float("inf"), 0.5, float("nan")]],
                     device=device).to(dtype).repeat(3, 1)
    bias = torch.zeros(x.shape[1], device=device, dtype=dtype)
    for out in (launch(x, bias, "relu"), A.bias_activation(x, bias, "relu")):
        expected = torch.relu(x)
        assert out.dtype == dtype and torch.isnan(out[:, [0, 7]]).all(), out
        assert torch.equal(out[:, 1:7], expected[:, 1:7]), out


def case_mixed_dtypes(device, x_dtype, bias_dtype, activation, monkeypatch):
    """x and bias in different float dtypes: the kernel runs, and the result has the dtype of the
    reference (``x + bias`` promoted as PyTorch does: fp32 for fp16 with fp32) and its values (fp32
    budget: the fp16 operand is exact in fp32)."""
    counter = LaunchCounter(monkeypatch)
    x, bias = make_inputs(9, 301, device=device)
    x, bias = x.to(x_dtype), bias.to(bias_dtype)
    with backend.use_backend("triton"):
        out = A.bias_activation(x, bias, activation)
    assert counter.count == 1
    reference = A.bias_activation_reference(x, bias, activation)
    assert out.dtype == reference.dtype == torch.promote_types(x_dtype, bias_dtype), (out.dtype, reference.dtype)
    assert_close(out, A.bias_activation_reference(x.float(), bias.float(), activation), FP32_OP,
                 f"mixed {x_dtype} + {bias_dtype} {activation}")


def case_non_contiguous_bias(device, dtype, activation, monkeypatch):
    """A strided bias (every other element of a longer vector): the kernel reads it at unit stride,
    so the op copies it; the result is the reference's."""
    counter = LaunchCounter(monkeypatch)
    x, _ = make_inputs(9, 301, dtype, device)
    bias = torch.randn(2 * 301, device=device).to(dtype)[::2]  # cast, then slice: .to() would copy the view
    assert not bias.is_contiguous()
    with backend.use_backend("triton"):
        out = A.bias_activation(x, bias, activation)
    assert counter.count == 1
    check(out, x, bias, activation, f"non-contiguous bias {dtype} {activation}")


def case_gradients(device, activation):
    x, bias = make_inputs(13, 97, torch.float32, device)
    weight = torch.randn(13, 97, device=device)
    grads = []
    for name in ("triton", "torch"):
        xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
        with backend.use_backend(name):
            (A.bias_activation(xg, bg, activation) * weight).sum().backward()
        grads.append((xg.grad, bg.grad))
    assert_close(grads[0][0], grads[1][0], FP32_OP, f"grad x {activation}")
    assert_close(grads[0][1], grads[1][1], 1e-4, f"grad bias {activation}")  # a sum over 13 rows


# ---------------------------------------------------------------------------------------------------
# Without Triton running (this process): backend choice and checks.

def test_cpu_defaults_to_the_reference(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert A.active_backend("cpu") == "torch"
    assert A.active_backend("cuda") == ("triton" if backend.triton_available() else "torch")
    with backend.use_backend("torch"):
        assert A.active_backend("cuda") == "torch"
    x, bias = make_inputs(4, 33)
    assert torch.equal(A.bias_activation(x, bias, "gelu"), A.bias_activation_reference(x, bias, "gelu"))


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        A.bias_activation(*make_inputs(4, 33), "gelu")


def test_bad_inputs_are_refused():
    x, bias = make_inputs(4, 33)
    with pytest.raises(ValueError, match="does not match"):
        A.bias_activation(x, bias[:-1], "gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        A.bias_activation(x, bias, "silu")


def test_float64_takes_the_reference():
    x, bias = make_inputs(4, 33, torch.float64)
    with backend.use_backend("triton"):  # even forced: the kernel has no fp64 variant
        out = A.bias_activation(x, bias, "gelu_tanh")
    assert torch.equal(out, A.bias_activation_reference(x, bias, "gelu_tanh"))


test_fused_op_is_registered = registered_schema_test(
    "bias_activation",
    "fastbert::bias_activation(Tensor x, Tensor? bias, str activation) -> Tensor",
)


# ---------------------------------------------------------------------------------------------------
# The interpreter: these cases are defined only in the child process.

test_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 54)


if IN_CHILD:
    _kernel_is_interpreted = interpreted_kernel_fixture(
        "fastbert.kernels.bias_activation", "_bias_activation_fwd_kernel")

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_launch_helper(dtype, activation, shape):
        case_launch_helper("cpu", dtype, activation, shape)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_op(dtype, activation, monkeypatch):
        case_op("cpu", dtype, activation, monkeypatch)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_interpreter_case_strided_input(activation):
        case_strided_input("cpu", activation)

    def test_interpreter_case_zero_rows(monkeypatch):
        counter = LaunchCounter(monkeypatch)
        case_zero_rows("cpu")
        assert counter.count == 1  # the helper is called, and launches nothing for an empty grid

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_extreme_values(dtype, activation):
        case_extreme_values("cpu", dtype, activation)

    def test_interpreter_case_gelu_tails():
        case_gelu_tails("cpu")

    @pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's x^3, as a GPU's inf
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_interpreter_case_huge_inputs(activation):
        case_huge_inputs("cpu", activation)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_interpreter_case_gradients(activation, monkeypatch):
        counter = LaunchCounter(monkeypatch)
        case_gradients("cpu", activation)
        assert counter.count == 1  # the Triton forward ran under autograd; the backward is the reference's

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_relu_keeps_nan(dtype):
        with backend.use_backend("triton"):
            case_relu_keeps_nan("cpu", dtype)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("x_dtype,bias_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)],
                             ids=["fp16+fp32", "fp32+fp16"])
    def test_interpreter_case_mixed_dtypes(x_dtype, bias_dtype, activation, monkeypatch):
        case_mixed_dtypes("cpu", x_dtype, bias_dtype, activation, monkeypatch)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_non_contiguous_bias(dtype, activation, monkeypatch):
        case_non_contiguous_bias("cpu", dtype, activation, monkeypatch)

    def test_interpreter_case_opcheck():
        x, bias = make_inputs(5, 40)
        for args in ((x, bias, "gelu"), (x, None, "relu"), (x.requires_grad_(), bias, "gelu_tanh")):
            torch.library.opcheck(torch.ops.fastbert.bias_activation.default, args,
                                  test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------------
# GPU (compiled kernels; skipped without one).

@needs_cuda
@pytest.mark.skipif(IN_CHILD, reason="GPU cases run in the parent process")
class TestCuda:
    DTYPES = [torch.float32, torch.float16, torch.bfloat16]

    @pytest.mark.parametrize("shape", SHAPES + [(4096, 3072), (1000, 37)], ids=str)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_launch_helper(self, dtype, activation, shape):
        case_launch_helper("cuda", dtype, activation, shape)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_op(self, dtype, activation, monkeypatch):
        case_op("cuda", dtype, activation, monkeypatch)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_extreme_values(self, dtype, activation):
        case_extreme_values("cuda", dtype, activation)

    def test_gelu_tails(self):
        case_gelu_tails("cuda")
        for activation in ACTIVATIONS:
            case_huge_inputs("cuda", activation)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_strided_input_and_gradients(self, activation):
        case_strided_input("cuda", activation)
        case_gradients("cuda", activation)

    def test_zero_rows(self):
        case_zero_rows("cuda")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_relu_nan_mixed_dtypes_and_non_contiguous_bias(self, dtype, monkeypatch):
        with backend.use_backend("triton"):
            case_relu_keeps_nan("cuda", dtype)
        for activation in ACTIVATIONS:
            case_non_contiguous_bias("cuda", dtype, activation, monkeypatch)
            if dtype != torch.float32:
                case_mixed_dtypes("cuda", dtype, torch.float32, activation, monkeypatch)
                case_mixed_dtypes("cuda", torch.float32, dtype, activation, monkeypatch)

    def test_torch_compile_fullgraph(self):
        x, bias = make_inputs(64, 3072, torch.float16, "cuda")
        compiled = torch.compile(lambda x, b: A.bias_activation(x, b, "gelu"), fullgraph=True)
        check(compiled(x, bias), x, bias, "gelu", "torch.compile")
