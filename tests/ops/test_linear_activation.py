"""Linear + bias + activation: the fused Triton GEMM against ``linear_activation_reference``.

- Under ``TRITON_INTERPRET=1`` on CPU tensors, in a child pytest process (Triton reads the variable
  when the kernel is defined): fp32 and fp16, NaN-filled outputs, odd shapes (ragged K, partial
  tiles, grouped tile order with several groups), a strided input, no bias, zero rows, K = 0,
  gradients, opcheck.
- On a GPU (skipped without one): the same checks, bf16 and BERT-sized shapes too.
- Here, without Triton running: which path ``FASTBERT_GEMM`` picks, the input checks, and the rule
  of ``FASTBERT_GEMM=cublaslt`` on its numbers (cuBLASLt's tanh-form GELU, emulated: within the budget
  wherever the rule takes it; its GPU cases run the real epilogue).

Budgets (DESIGN.md): fp32 1e-5 (the op); fp16 / bf16: error against the fp32 reference <= 2x
PyTorch's own error at that dtype + 1e-3. Weights are scaled by 1/sqrt(K) as in a trained layer, so
the pre-activations are of order 1 and reach both tails of GELU.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from fastbert.ops import backend
from tests import helpers
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.helpers import interpreter_parent_test, interpreted_kernel_fixture, registered_schema_test
from tests.helpers import FP32_OP, assert_close, assert_low_precision_within_budget, nan_like

A = importlib.import_module("fastbert.ops.linear_activation")  # the module, not the same-named function
B = importlib.import_module("fastbert.ops.bias_activation")

ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]
# (M, K, N): one element; ragged K and partial tiles; K a multiple of the 64-wide K block; more rows
# than one 128-row tile.
SHAPES = [(1, 1, 1), (37, 97, 301), (130, 128, 72), (200, 64, 300)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def make_inputs(m, k, n, dtype=torch.float32, device="cpu"):
    """Fresh random x, weight (``[N, K]``, scaled by 1/sqrt(K)) and bias."""
    x = torch.randn(m, k, device=device)
    weight = torch.randn(n, k, device=device) / max(k, 1) ** 0.5
    bias = 0.5 * torch.randn(n, device=device)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def check(out, x, weight, bias, activation, what):
    """fp32: 1e-5 against the reference; 16-bit: the low-precision budget against the fp32 reference
    from the same (rounded) inputs."""
    fp32 = A.linear_activation_reference(x.float(), weight.float(), None if bias is None else bias.float(),
                                         activation)
    assert out.shape == fp32.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    if x.dtype == torch.float32:
        assert_close(out, fp32, FP32_OP, what)
    else:
        same = A.linear_activation_reference(x, weight, bias, activation)
        assert_low_precision_within_budget(out.float(), fp32, same.float(), what)


class LaunchCounter:
    """Counts the launches of the fused kernel and of the separate epilogue kernel."""

    def __init__(self, monkeypatch):
        self._fused = helpers.LaunchCounter(monkeypatch, A, "linear_activation_fwd")
        self._epilogue = helpers.LaunchCounter(monkeypatch, B, "bias_activation_fwd")

    fused = property(lambda self: self._fused.count)
    epilogue = property(lambda self: self._epilogue.count)


def launch(x, weight, bias, activation, config=None):
    """The launch helper on a NaN-filled output: any element it does not write fails the check."""
    from fastbert.kernels.linear_activation import linear_activation_fwd

    out = nan_like((x.shape[0], weight.shape[0]), x.dtype, x.device)
    bias = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device) if bias is None else bias
    linear_activation_fwd(x, weight, bias, activation, out, config=config)
    return out


# ---------------------------------------------------------------------------------------------------
# Checks shared by the interpreter (CPU) and the GPU.

def case_launch_helper(device, dtype, activation, shape):
    x, weight, bias = make_inputs(*shape, dtype, device)
    check(launch(x, weight, bias, activation), x, weight, bias, activation, f"{device} {dtype} {activation} {shape}")


def case_grouped_tiles(device, dtype):
    """16 x 16 x 16 tiles on a 150 x 40 x 70 problem: 10 x 5 tiles in two groups of 8 row blocks and
    one of 2 (the grouped order's short last group), ragged K with several K steps."""
    x, weight, bias = make_inputs(150, 40, 70, dtype, device)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
    check(launch(x, weight, bias, "gelu", config), x, weight, bias, "gelu", f"16x16 tiles {dtype}")


def case_op(device, dtype, activation, monkeypatch):
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    counter = LaunchCounter(monkeypatch)
    x, weight, bias = make_inputs(2 * 9, 64, 75, dtype, device)
    with backend.use_backend("triton"):
        assert A.active_backend(device) == "triton"
        out = A.linear_activation(x.view(2, 9, 64), weight, bias, activation)  # any leading shape
        no_bias = A.linear_activation(x, weight, None, activation)
    assert (counter.fused, counter.epilogue) == (2, 0)
    assert out.shape == (2, 9, 75)
    check(out.view(-1, 75), x, weight, bias, activation, f"op {dtype} {activation}")
    check(no_bias, x, weight, None, activation, f"op without bias {dtype} {activation}")


def case_strided_and_empty(device, monkeypatch):
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    x, weight, bias = make_inputs(11, 48, 33, device=device)
    wide = torch.randn(11, 100, device=device)
    wide[:, 7:55] = x
    with backend.use_backend("triton"):
        check(A.linear_activation(wide[:, 7:55], weight, bias, "gelu"), x, weight, bias, "gelu", "strided rows")
        transposed = x.t().contiguous().t()  # column stride != 1: the op copies
        check(A.linear_activation(transposed, weight.t().contiguous().t(), bias, "relu"), x, weight, bias, "relu",
              "column-major x and weight")
        assert A.linear_activation(x[:0], weight, bias, "gelu").shape == (0, 33)
        empty_k = A.linear_activation(x[:, :0], weight[:, :0], bias, "gelu")  # no products: act(bias)
    assert_close(empty_k, torch.nn.functional.gelu(bias).expand(11, 33), FP32_OP, "K = 0")


def case_gradients(device, activation, monkeypatch):
    """All three inputs requiring gradients, then x only (frozen weights, 3-D x), then no bias: the
    fused op's backward against the reference's, through the Triton forward (counted)."""
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    counter = LaunchCounter(monkeypatch)
    x, weight, bias = make_inputs(2 * 13, 40, 29, device=device)
    x = x.view(2, 13, 40)
    upstream = torch.randn(2, 13, 29, device=device)
    for wants, with_bias in (((True, True, True), True), ((True, False, False), True), ((False, True, False), False)):
        grads = []
        for name in ("triton", "torch"):
            leaves = [t.clone().requires_grad_(want) for t, want in zip((x, weight, bias), wants)]
            with backend.use_backend(name):
                out = A.linear_activation(leaves[0], leaves[1], leaves[2] if with_bias else None, activation)
                (out * upstream).sum().backward()
            grads.append([t.grad for t in leaves])
        for what, ours, ref, want in zip(("x", "weight", "bias"), *grads, wants):
            assert (ours is None) == (not want or (what == "bias" and not with_bias)), (what, wants)
            if ours is not None:
                assert_close(ours, ref, 1e-4, f"grad {what} {activation} {wants}")  # sums of up to 40 terms
    assert counter.fused == 3


def bias_mismatch(bias_shape):
    """linear_activation's own message for a bias of ``bias_shape`` against a [20, 33] weight (it names
    the weight; bias_activation's message, on the unfused path, names x)."""
    return rf"bias of shape {re.escape(str(bias_shape))} does not match a weight of shape \(20, 33\)"


def case_bias_of_another_shape_is_refused(device, bias_shape, monkeypatch):
    """On the fused path (FASTBERT_GEMM=triton) nothing after linear_activation checks the bias: its
    own ValueError, naming the weight, comes before any launch (the kernel reads ``N`` elements)."""
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    counter = LaunchCounter(monkeypatch)
    x, weight, _ = make_inputs(4, 33, 20, device=device)
    bias = torch.randn(bias_shape, device=device)
    with backend.use_backend("triton"), pytest.raises(ValueError, match=bias_mismatch(bias_shape)):
        A.linear_activation(x, weight, bias, "gelu")
    assert (counter.fused, counter.epilogue) == (0, 0)


def case_nan_propagates(device, dtype, activation, monkeypatch):
    """A NaN in a row of x makes that row's outputs NaN through every epilogue, ReLU included (as
    ``torch.relu``; a ``max(x, 0)`` would give 0); the other rows are the reference's."""
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    counter = LaunchCounter(monkeypatch)
    x, weight, bias = make_inputs(5, 40, 24, dtype, device)
    x[2, 7] = float("nan")
    with backend.use_backend("triton"):
        out = A.linear_activation(x, weight, bias, activation)
    assert counter.fused == 1
    assert torch.isnan(out[2]).all(), out[2]
    keep = torch.arange(5, device=device) != 2
    check(out[keep], x[keep], weight, bias, activation, f"rows without NaN {dtype} {activation}")


def case_autocast_takes_the_matmul(device, monkeypatch):
    """Under autocast the matmul's dtype is autocast's: F.linear runs it (fp32 inputs would otherwise
    make an fp32 GEMM), then the epilogue kernel with the bias in autocast's dtype, so that the result
    has that dtype, as transformers' Linear + GELU under autocast."""
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    counter = LaunchCounter(monkeypatch)
    x, weight, bias = make_inputs(9, 64, 33, device=device)
    with backend.use_backend("triton"), torch.autocast(device, dtype=torch.float16):
        out = A.linear_activation(x, weight, bias, "gelu")
        peer = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
    assert (counter.fused, counter.epilogue) == (0, 1) and out.dtype == peer.dtype == torch.float16
    reference = A.linear_activation_reference(x, weight, bias, "gelu")
    assert_low_precision_within_budget(out.float(), reference, peer.float(), "autocast")


# ---------------------------------------------------------------------------------------------------
# Without Triton running (this process): the path FASTBERT_GEMM picks, and the checks.

def test_default_is_cublaslt_for_cuda_tensors(monkeypatch):
    """The default FASTBERT_GEMM is cuBLASLt's epilogue (faster on the H200, RESULTS.md); CPU tensors
    take the reference, and the setting can still pick cuBLAS + the epilogue kernel or the Triton GEMM."""
    monkeypatch.delenv("FASTBERT_GEMM", raising=False)
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert backend.gemm_setting() == backend.DEFAULT_GEMM == "cublaslt"
    assert A.active_backend("cpu") == "torch"
    assert A.active_backend("cuda") == ("cublaslt" if backend.triton_available() else "torch")
    monkeypatch.setenv("FASTBERT_GEMM", "cublas")
    assert A.active_backend("cuda") == ("cublas+triton" if backend.triton_available() else "torch")
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    assert A.active_backend("cuda") == ("triton" if backend.triton_available() else "torch")
    with backend.use_gemm("cublas"):  # the context manager overrides the variable, and restores it
        assert A.active_backend("cuda") in ("cublas+triton", "torch")
    assert backend.gemm_setting() == "triton"
    monkeypatch.setenv("FASTBERT_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FASTBERT_GEMM='cutlass'"):
        backend.gemm_setting()
    with pytest.raises(ValueError, match="GEMM 'cutlass'"), backend.use_gemm("cutlass"):
        pass


def test_cpu_takes_the_reference(monkeypatch):
    monkeypatch.setenv("FASTBERT_GEMM", "triton")  # asks for the fused kernel; the CPU has no kernel
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    x, weight, bias = make_inputs(4, 33, 20)
    assert torch.equal(A.linear_activation(x, weight, bias, "gelu"),
                       A.linear_activation_reference(x, weight, bias, "gelu"))


def test_autocast_leaves_float64_alone(monkeypatch):
    """Autocast does not touch float64 matmuls, and neither does the bias: the result is the fp64
    reference's (a cast of the bias to autocast's dtype would round it)."""
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    x, weight, bias = make_inputs(5, 24, 7, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.linear_activation(x, weight, bias, "gelu")
    assert out.dtype == torch.float64
    assert_close(out, torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias)), 1e-12, "fp64 autocast")


def test_bad_inputs_are_refused():
    x, weight, bias = make_inputs(4, 33, 20)
    with pytest.raises(ValueError, match=r"x of shape \(4, 33\) does not match a weight of shape \(20, 32\)"):
        A.linear_activation(x, weight[:, :-1], bias, "gelu")
    with pytest.raises(ValueError, match=r"bias of shape \(19,\)"):
        A.linear_activation(x, weight, bias[:-1], "gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        A.linear_activation(x, weight, bias, "silu")


@pytest.mark.parametrize("bias_shape", [(19,), (21,), (1, 20)], ids=str)
def test_bias_of_another_shape_is_refused_naming_the_weight(bias_shape):
    """linear_activation's own check (on the default path bias_activation would refuse a bias of
    another length too, but naming x, not the weight)."""
    x, weight, _ = make_inputs(4, 33, 20)
    with pytest.raises(ValueError, match=bias_mismatch(bias_shape)):
        A.linear_activation(x, weight, torch.randn(bias_shape), "gelu")


def cublaslt_emulated(x, weight, bias, activation):
    """What cuBLASLt's epilogue computes: the fp32 accumulator plus the bias, then ReLU or GELU in its
    tanh form, rounded once to the output dtype (PyTorch's CPU ``_addmm_activation`` uses erf-GELU)."""
    pre = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    out = torch.relu(pre) if activation == "relu" else torch.nn.functional.gelu(pre, approximate="tanh")
    return out.to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cublaslt_takes_only_what_its_epilogue_computes_within_budget(dtype, shape):
    """FASTBERT_GEMM=cublaslt's rule, on its numbers: where ``cublaslt_takes`` (asked about fake CUDA
    copies of the inputs), the epilogue's result is within the op's budget of the reference; the one
    case it refuses, erf-GELU in fp32, would not be (the tanh form is up to 4.7e-4 off)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight, bias = make_inputs(*shape, dtype)
    x = 4 * x  # pre-activations of order 4: GELU's region where the tanh form is furthest from erf's
    mode = FakeTensorMode()
    with mode:
        on_cuda = [mode.from_tensor(t).to("cuda") for t in (x, weight, bias)]
    for activation in ACTIVATIONS:
        takes = A.cublaslt_takes(*on_cuda, activation)
        assert not A.cublaslt_takes(*on_cuda[:2], None, activation)  # the epilogue needs a bias
        # K = 0: PyTorch's CUDA addmm returns the bias without the activation
        assert not A.cublaslt_takes(on_cuda[0][:, :0], on_cuda[1][:, :0], on_cuda[2], activation)
        other = torch.float32 if dtype != torch.float32 else torch.float16
        assert not A.cublaslt_takes(*on_cuda[:2], on_cuda[2].to(other), activation)  # one dtype for all three
        assert not A.cublaslt_takes(x, weight, bias, activation)  # CPU tensors: never
        assert takes == (dtype != torch.float32 or activation != "gelu"), (dtype, activation)
        out = cublaslt_emulated(x, weight, bias, activation)
        if takes:
            check(out, x, weight, bias, activation, f"cuBLASLt epilogue {dtype} {activation}")
        else:
            with pytest.raises(AssertionError):
                check(out, x, weight, bias, activation, "tanh-GELU for erf-GELU in fp32")


def test_cublaslt_setting_leaves_autocast_to_the_matmul(monkeypatch):
    """Under autocast the matmul's dtype is autocast's: FASTBERT_GEMM=cublaslt runs F.linear and the
    epilogue, never the cuBLASLt op on the uncast inputs (cublaslt_takes let take CPU tensors here)."""
    monkeypatch.setenv("FASTBERT_GEMM", "cublaslt")
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setattr(A, "cublaslt_takes", lambda *args: True)
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("cuBLASLt's op ran under autocast"))
    monkeypatch.setattr(A, "bias_activation", lambda pre, bias, activation: B.bias_activation_reference(pre, bias, activation))
    x, weight, bias = make_inputs(5, 24, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.linear_activation(x, weight, bias, "gelu")
    assert out.dtype == torch.bfloat16
    assert A.active_backend("cpu") == "cublas+triton"  # cuBLASLt is for CUDA tensors only


test_fused_op_is_registered = registered_schema_test(
    "linear_activation",
    "fastbert::linear_activation(Tensor x, Tensor weight, Tensor? bias, str activation) "
    "-> Tensor",
)


# ---------------------------------------------------------------------------------------------------
# The interpreter: these cases are defined only in the child process.

test_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 46)


if IN_CHILD:
    _kernel_is_interpreted = interpreted_kernel_fixture(
        "fastbert.kernels.linear_activation", "_linear_activation_fwd_kernel")

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_launch_helper(dtype, activation, shape):
        case_launch_helper("cpu", dtype, activation, shape)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_grouped_tiles(dtype):
        case_grouped_tiles("cpu", dtype)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_op(dtype, activation, monkeypatch):
        case_op("cpu", dtype, activation, monkeypatch)

    def test_interpreter_case_strided_and_empty(monkeypatch):
        case_strided_and_empty("cpu", monkeypatch)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_interpreter_case_gradients(activation, monkeypatch):
        case_gradients("cpu", activation, monkeypatch)

    def test_interpreter_case_autocast_takes_the_matmul(monkeypatch):
        case_autocast_takes_the_matmul("cpu", monkeypatch)

    @pytest.mark.parametrize("bias_shape", [(21,), (1, 20)], ids=str)  # never shorter: a kernel would read past it
    def test_interpreter_case_bias_of_another_shape_is_refused_on_the_fused_path(bias_shape, monkeypatch):
        case_bias_of_another_shape_is_refused("cpu", bias_shape, monkeypatch)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_interpreter_case_nan_propagates(dtype, activation, monkeypatch):
        case_nan_propagates("cpu", dtype, activation, monkeypatch)

    def test_interpreter_case_opcheck():
        x, weight, bias = make_inputs(5, 40, 24)
        for args in ((x, weight, bias, "gelu"), (x, weight, None, "relu"),
                     (x.requires_grad_(), weight, bias, "gelu_tanh")):
            torch.library.opcheck(torch.ops.fastbert.linear_activation.default, args,
                                  test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------------
# GPU (compiled kernels; skipped without one).

@needs_cuda
@pytest.mark.skipif(IN_CHILD, reason="GPU cases run in the parent process")
class TestCuda:
    DTYPES = [torch.float32, torch.float16, torch.bfloat16]

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_launch_helper(self, dtype, activation, shape):
        case_launch_helper("cuda", dtype, activation, shape)

    # Model-sized products (BERT-base's and MiniLM's FFN, BERT-large's at 16384 tokens) in 16-bit, the
    # large tiles; GELU only, so that a GPU session compiles few variants.
    @pytest.mark.parametrize("shape", [(4096, 768, 3072), (77, 384, 1536), (16384, 1024, 4096)], ids=str)
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_model_sized(self, dtype, shape):
        case_launch_helper("cuda", dtype, "gelu", shape)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_grouped_tiles(self, dtype):
        case_grouped_tiles("cuda", dtype)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_op(self, dtype, activation, monkeypatch):
        case_op("cuda", dtype, activation, monkeypatch)

    @pytest.mark.parametrize("shape", [(1, 1, 1), (37, 97, 301), (4096, 768, 3072)], ids=str)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_cublaslt_setting(self, dtype, activation, shape, monkeypatch):
        """FASTBERT_GEMM=cublaslt: cuBLASLt's epilogue where it takes the product (within the budget),
        else the matmul and the epilogue kernel; leading dimensions and no bias too."""
        monkeypatch.setenv("FASTBERT_GEMM", "cublaslt")
        counter = LaunchCounter(monkeypatch)
        x, weight, bias = make_inputs(*shape, dtype, "cuda")
        takes = A.cublaslt_takes(x, weight, bias, activation)
        out = A.linear_activation(x.view(1, *x.shape), weight, bias, activation)[0]
        assert (counter.fused, counter.epilogue) == (0, 0 if takes else 1)
        check(out, x, weight, bias, activation, f"cublaslt {dtype} {activation} {shape}")
        check(A.linear_activation(x, weight, None, activation), x, weight, None, activation, "cublaslt, no bias")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_bias_shape_and_nan(self, dtype, monkeypatch):
        for bias_shape in ((19,), (21,), (1, 20)):
            case_bias_of_another_shape_is_refused("cuda", bias_shape, monkeypatch)
        for activation in ACTIVATIONS:
            case_nan_propagates("cuda", dtype, activation, monkeypatch)

    def test_strided_empty_gradients_autocast(self, monkeypatch):
        case_strided_and_empty("cuda", monkeypatch)
        for activation in ACTIVATIONS:
            case_gradients("cuda", activation, monkeypatch)
        case_autocast_takes_the_matmul("cuda", monkeypatch)
