"""The CUDA path traced without a GPU: under ``FakeTensorMode`` CUDA tensors exist as metadata only,
so the ops, the encoder and the model run their GPU code path (backend ``auto`` picks Triton on
CUDA tensors) without computing anything. A ``TorchDispatchMode`` records every
``torch.ops.fastbert.*`` call with its shapes and dtypes, and the launch helpers are wrapped to check
that each kernel is launched through ``torch.library.wrap_triton`` (the form ``torch.compile`` and
CUDA graphs capture) on CUDA tensors, with the grid the real launch would use.

What cannot be traced this way: ``BertModel.forward`` in eager mode validates its inputs with host
reads (``attention_mask.all()``, the id range check's ``.tolist()``), which fake tensors cannot
answer (``DataDependentOutputException``). The model is therefore traced along the path
``torch.compile`` takes (``torch.compiler.is_compiling()`` true: no host sync, static packing), and
the encoder is traced on its own with a prepared ``Packing``.

These tests need real (JIT) kernels: they are skipped when ``TRITON_INTERPRET=1`` is set in this
process.
"""

from __future__ import annotations

import importlib
import os
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastbert.ops import Packing, backend
from tests.model_utils import make_config

pytestmark = [
    pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="needs real (JIT) Triton kernels; TRITON_INTERPRET is set in this process"),
    # Nothing may read data_ptr() of a fake tensor (torch warns, later errors).
    pytest.mark.filterwarnings("error:Accessing the data pointer of FakeTensor"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAUNCH_HELPERS = {  # op module -> launch helper
    "attention": "attention_fwd",
    "bias_activation": "bias_activation_fwd",
    "bias_residual_layer_norm": "bias_residual_layer_norm_fwd",
    "linear_activation": "linear_activation_fwd",
}
MY_KERNELS = ("_attention_fwd_kernel", "_bias_activation_fwd_kernel", "_bias_residual_layer_norm_fwd_kernel",
              "_linear_activation_fwd_kernel")
MY_OPS = ("fastbert.varlen_attention.default", "fastbert.bias_activation.default",
          "fastbert.bias_residual_layer_norm.default", "fastbert.linear_activation.default",
          "aten._addmm_activation.default")


class RecordFastbertOps(TorchDispatchMode):
    """Records (op name, tensor shapes, tensor dtypes, tensor devices) of every fastbert op, and of
    cuBLASLt's matmul with a bias + activation epilogue (``aten._addmm_activation``, FASTBERT_GEMM=cublaslt)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastbert" or func is torch.ops.aten._addmm_activation.default:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((str(func), [tuple(t.shape) for t in tensors], [t.dtype for t in tensors],
                               {t.device.type for t in tensors}))
        return func(*args, **(kwargs or {}))

    def mine(self):
        return [c for c in self.calls if c[0] in MY_OPS]


@pytest.fixture
def launches(monkeypatch):
    """Wraps the launch helpers and the wrapped kernels' launches: records (op, whether the kernel came
    through wrap_triton, devices of the tensor arguments) per helper call, and ("launch", kernel name,
    grid) per kernel launch."""
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    seen = []
    original_call = TraceableTritonKernelWrapper.__call__

    def counted_call(self, *args, **kwargs):  # the launch itself: kernel[grid](...)
        seen.append(("launch", self.kernel.__name__, tuple(self.grid)))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(TraceableTritonKernelWrapper, "__call__", counted_call)
    for op, helper in LAUNCH_HELPERS.items():
        module = importlib.import_module(f"fastbert.ops.{op}")
        original = getattr(module, helper)

        def spy(*args, _op=op, _original=original, kernel=None, **kwargs):
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            seen.append((_op, isinstance(kernel, TraceableTritonKernelWrapper), devices))
            return _original(*args, kernel=kernel, **kwargs)

        monkeypatch.setattr(module, helper, spy)
    return seen


def fake_cuda(mode, *tensors):
    with mode:
        return tuple(None if t is None else mode.from_tensor(t).to("cuda") for t in tensors)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert backend.backend_setting() == "auto"


# ---------------------------------------------------------------------------------------------------
# Ops.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_take_the_triton_path_on_cuda(dtype, launches):
    from fastbert import ops

    mode, record = FakeTensorMode(), RecordFastbertOps()
    tokens, heads, head_dim, inter = 11, 3, 26, 150
    hidden = heads * head_dim
    qkv, cu, x, inter_x, bias, ibias, w, lb = fake_cuda(
        mode, torch.randn(tokens, 3 * hidden).to(dtype), torch.tensor([0, 4, 4, 11], dtype=torch.int32),
        torch.randn(tokens, hidden).to(dtype), torch.randn(tokens, inter).to(dtype), torch.randn(hidden).to(dtype),
        torch.randn(inter).to(dtype), torch.randn(hidden).to(dtype), torch.randn(hidden).to(dtype))
    with mode, record:
        att = ops.varlen_attention(qkv, cu, 7, heads, head_dim**-0.5)
        act = ops.bias_activation(inter_x, ibias, "gelu")
        act_no_bias = ops.bias_activation(inter_x, None, "relu")
        ln = ops.bias_residual_layer_norm(x, bias, att, w, lb, 1e-12)
    for out, shape in ((att, (tokens, hidden)), (act, (tokens, inter)), (act_no_bias, (tokens, inter)),
                       (ln, (tokens, hidden))):
        assert out.shape == shape and out.dtype == dtype and out.device.type == "cuda"
    assert record.calls == [
        ("fastbert.varlen_attention.default", [(tokens, 3 * hidden), (4,)], [dtype, torch.int32], {"cuda"}),
        ("fastbert.bias_activation.default", [(tokens, inter), (inter,)], [dtype, dtype], {"cuda"}),
        ("fastbert.bias_activation.default", [(tokens, inter)], [dtype], {"cuda"}),
        ("fastbert.bias_residual_layer_norm.default", [(tokens, hidden), (hidden,), (tokens, hidden), (hidden,),
                                                       (hidden,)], [dtype] * 5, {"cuda"}),
    ]
    # Each op launched its kernel once, through wrap_triton, on CUDA tensors, with the grid the launch
    # helper computes: attention (cdiv(max_seqlen, BLOCK_M), batch, heads); the others over rows/columns.
    from fastbert.kernels import attention as K

    block_m = K.attention_config(head_dim, dtype == torch.float32)["BLOCK_M"]
    assert launches == [
        ("attention", True, {"cuda"}), ("launch", "_attention_fwd_kernel", (-(-7 // block_m), 3, heads)),
        ("bias_activation", True, {"cuda"}), ("launch", "_bias_activation_fwd_kernel", (2, 1)),
        ("bias_activation", True, {"cuda"}), ("launch", "_bias_activation_fwd_kernel", (2, 1)),
        # 11 rows: one a program (fewer than the 132 SMs the grid is sized for without a GPU to ask)
        ("bias_residual_layer_norm", True, {"cuda"}), ("launch", "_bias_residual_layer_norm_fwd_kernel", (11,)),
    ]


def test_triton_launches_make_their_tensors_gpu_current(monkeypatch):
    """Triton launches on the current CUDA device: each op makes its tensors' GPU current around its
    launch, and restores the previous one after. Here the tensors are on cuda:1 while cuda:0 is
    current; the three CUDA calls involved are stand-ins (no GPU here), which record the current
    device at each launch."""
    from fastbert import ops

    current = [0]

    class DeviceContext:  # torch.cuda.device's role, on the stand-in current device
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    mode = FakeTensorMode()
    with mode:  # made before the stand-ins: with CUDA "available", torch 2.11's fake .to() inits CUDA
        qkv, cu, x, b, table, ids, w = (mode.from_tensor(t).to("cuda:1") for t in (
            torch.randn(11, 3 * 78), torch.tensor([0, 4, 11], dtype=torch.int32), torch.randn(11, 78),
            torch.randn(78), torch.randn(10, 78), torch.tensor([1, 2, 3]), torch.randn(78, 78)))
    monkeypatch.setattr(backend, "_gpu", lambda index: (90, 132))  # tiles and grids ask the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    seen = []
    helpers = {**{f"fastbert.ops.{op}": helper for op, helper in LAUNCH_HELPERS.items()},
               "fastbert.kernels.embeddings": "embeddings_fwd"}
    for module_name, helper in helpers.items():
        module = importlib.import_module(module_name)
        original = getattr(module, helper)

        def spy(*args, _helper=helper, _original=original, **kwargs):
            seen.append((_helper, current[0], {a.get_device() for a in args if isinstance(a, torch.Tensor)}))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, helper, spy)
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")  # the embeddings' Triton op (the extension guards itself)
    with mode:
        att = ops.varlen_attention(qkv, cu, 7, 3, 0.2)
        ops.bias_residual_layer_norm(x, b, att, b, b, 1e-12)
        ops.bias_activation(x, b, "gelu")
        ops.embeddings(ids, ids, ids * 0, table, table, table, b, b, 1e-12, validate_indices=False)
        with ops.use_gemm("triton"):
            ops.linear_activation(x, w, b, "gelu")
    assert seen == [("attention_fwd", 1, {1}), ("bias_residual_layer_norm_fwd", 1, {1}),
                    ("bias_activation_fwd", 1, {1}), ("embeddings_fwd", 1, {1}),
                    ("linear_activation_fwd", 1, {1})], seen
    assert current == [0]
    assert backend.device_guard(x) is not backend.device_guard(torch.zeros(1))  # cuda:1 needs a switch
    current[0] = 1
    assert backend.device_guard(x) is backend.device_guard(torch.zeros(1))  # the shared no-op context


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_gemm_takes_the_triton_path_on_cuda(dtype, launches, monkeypatch):
    """FASTBERT_GEMM=triton: one fused op and one launch, with linear_config's tiles (no GPU to ask:
    an H100's 132 SMs); the default runs PyTorch's matmul and then the epilogue kernel."""
    from fastbert import ops
    from fastbert.kernels.linear_activation import linear_config

    mode, record = FakeTensorMode(), RecordFastbertOps()
    x, weight, bias = fake_cuda(mode, torch.randn(2, 150, 40).to(dtype), torch.randn(70, 40).to(dtype),
                                torch.randn(70).to(dtype))
    monkeypatch.setenv("FASTBERT_GEMM", "triton")
    with mode, record:
        fused = ops.linear_activation(x, weight, bias, "gelu")
    monkeypatch.setenv("FASTBERT_GEMM", "cublas")
    with mode, record:
        separate = ops.linear_activation(x, weight, None, "relu")
    for out in (fused, separate):
        assert out.shape == (2, 150, 70) and out.dtype == dtype and out.device.type == "cuda"
    assert record.mine() == [
        ("fastbert.linear_activation.default", [(2, 150, 40), (70, 40), (70,)], [dtype] * 3, {"cuda"}),
        ("fastbert.bias_activation.default", [(2, 150, 70)], [dtype], {"cuda"}),
    ]
    cfg = linear_config(300, 70, dtype == torch.float32, 90, 132)
    tiles = -(-300 // cfg["BLOCK_M"]) * -(-70 // cfg["BLOCK_N"])
    assert launches == [
        ("linear_activation", True, {"cuda"}), ("launch", "_linear_activation_fwd_kernel", (tiles,)),
        ("bias_activation", True, {"cuda"}), ("launch", "_bias_activation_fwd_kernel", (38, 1)),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cublaslt_setting_runs_the_epilogue_in_the_gemm(dtype, launches, monkeypatch):
    """FASTBERT_GEMM=cublaslt: one ``aten._addmm_activation`` (cuBLASLt's bias + GELU / ReLU epilogue,
    tanh-approximated GELU) and no Triton launch, where that is exact (ReLU, tanh-GELU) or within
    the 16-bit budget (erf-GELU in fp16 / bf16). Everything else runs the matmul and the epilogue
    kernel: erf-GELU in fp32, no bias, autograd (the epilogue op has no backward)."""
    from fastbert import ops

    A = importlib.import_module("fastbert.ops.linear_activation")  # the module, not the same-named function
    mode, record = FakeTensorMode(), RecordFastbertOps()
    x, weight, bias = fake_cuda(mode, torch.randn(2, 150, 40).to(dtype), torch.randn(70, 40).to(dtype),
                                torch.randn(70).to(dtype))
    monkeypatch.setenv("FASTBERT_GEMM", "cublaslt")
    assert A.active_backend("cuda") == "cublaslt" and A.active_backend("cpu") == "torch"
    with mode, record:
        outs = [ops.linear_activation(x, weight, bias, activation) for activation in ("gelu", "gelu_tanh", "relu")]
        outs.append(ops.linear_activation(x, weight, None, "gelu_tanh"))
        x.requires_grad_()
        outs.append(ops.linear_activation(x, weight, bias, "relu"))
    for out in outs:
        assert out.shape == (2, 150, 70) and out.dtype == dtype and out.device.type == "cuda"
    epilogue = ("aten._addmm_activation.default", [(70,), (300, 40), (40, 70)], [dtype] * 3, {"cuda"})
    separate = ("fastbert.bias_activation.default", [(2, 150, 70)], [dtype], {"cuda"})
    with_bias = ("fastbert.bias_activation.default", [(2, 150, 70), (70,)], [dtype] * 2, {"cuda"})
    gelu = epilogue if dtype != torch.float32 else with_bias
    assert record.mine() == [gelu, epilogue, epilogue, separate, with_bias], record.mine()
    assert [entry[0] for entry in launches if entry[0] != "launch"] == ["bias_activation"] * (2 + (dtype == torch.float32))


@pytest.mark.parametrize("fused_gemm", [False, True], ids=["cublas", "triton-gemm"])
def test_linear_activation_traces_a_symbolic_token_count(fused_gemm, launches, monkeypatch):
    """A token count that is a SymInt (torch.compile's dynamic shapes, or its recompile after a new
    batch shape): the op traces, the output keeps the symbol, and the tile choice is a guard on it."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from fastbert import ops

    monkeypatch.setenv("FASTBERT_GEMM", "triton" if fused_gemm else "cublas")
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    dynamic_rows = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(300, 64, dtype=torch.float16), symbolic_context=dynamic_rows,
                         source=ConstantSource("x"))  # made outside the mode: a real tensor to fake
    with mode:
        x = x.to("cuda")
    weight, bias = fake_cuda(mode, torch.randn(128, 64, dtype=torch.float16), torch.randn(128, dtype=torch.float16))
    assert isinstance(x.shape[0], torch.SymInt)
    with mode:
        out = ops.linear_activation(x, weight, bias, "gelu")
    assert isinstance(out.shape[0], torch.SymInt) and out.shape[1] == 128
    assert launches[0][0] == ("linear_activation" if fused_gemm else "bias_activation")


def test_zero_tokens_launch_nothing(launches):
    from fastbert import ops

    mode = FakeTensorMode()
    qkv, cu, x, bias = fake_cuda(mode, torch.randn(0, 96), torch.zeros(3, dtype=torch.int32),
                                 torch.randn(0, 64), torch.randn(64))
    with mode:
        assert ops.varlen_attention(qkv, cu, 0, 2).shape == (0, 32)
        assert ops.bias_activation(x, bias, "gelu").shape == (0, 64)
        assert ops.bias_residual_layer_norm(x, bias, x, bias, bias, 1e-12).shape == (0, 64)
    assert [entry[0] for entry in launches] == ["attention", "bias_activation", "bias_residual_layer_norm"]


def test_autograd_keeps_the_triton_forward(launches):
    """Inputs that require gradients: the forward still runs the Triton op, and the op's autograd node
    (its backward recomputes the PyTorch reference) is recorded. Running the backward on fake CUDA
    tensors needs the CUDA autograd engine, hence a GPU; the interpreter tests check the gradients."""
    from fastbert import ops

    mode = FakeTensorMode()
    (x, bias) = fake_cuda(mode, torch.randn(9, 40, dtype=torch.float16), torch.randn(40, dtype=torch.float16))
    with mode:
        x.requires_grad_(), bias.requires_grad_()
        out = ops.bias_activation(x, bias, "gelu_tanh")
    assert out.requires_grad and "bias_activation" in out.grad_fn.name()
    assert launches[0] == ("bias_activation", True, {"cuda"}) and launches[1][0] == "launch"


# ---------------------------------------------------------------------------------------------------
# Encoder and model.

def fake_state(model, mode, dtype, prefix=""):
    """The model's parameters and buffers as fake CUDA tensors (floating ones in ``dtype``)."""
    items = list(model.named_parameters()) + list(model.named_buffers())
    with mode:
        return {name[len(prefix):]: mode.from_tensor(t).to("cuda", dtype if t.is_floating_point() else t.dtype)
                for name, t in items if name.startswith(prefix)}


def expected_layer_calls(layers, tokens, hidden, heads, inter, batch, dtype, gemm=backend.DEFAULT_GEMM):
    """Per layer: attention, LayerNorm, the FFN's first matmul's epilogue as ``gemm`` runs it (a
    ``make_config`` model's erf-GELU: cuBLASLt's epilogue in 16-bit only), LayerNorm."""
    if gemm == "triton":
        ffn = ("fastbert.linear_activation.default", [(tokens, hidden), (inter, hidden), (inter,)], [dtype] * 3,
               {"cuda"})
    elif gemm == "cublaslt" and dtype != torch.float32:
        ffn = ("aten._addmm_activation.default", [(inter,), (tokens, hidden), (hidden, inter)], [dtype] * 3, {"cuda"})
    else:
        ffn = ("fastbert.bias_activation.default", [(tokens, inter), (inter,)], [dtype, dtype], {"cuda"})
    per_layer = [
        ("fastbert.varlen_attention.default", [(tokens, 3 * hidden), (batch + 1,)], [dtype, torch.int32], {"cuda"}),
        ("fastbert.bias_residual_layer_norm.default", [(tokens, hidden), (hidden,), (tokens, hidden), (hidden,),
                                                       (hidden,)], [dtype] * 5, {"cuda"}),
        ffn,
        ("fastbert.bias_residual_layer_norm.default", [(tokens, hidden), (hidden,), (tokens, hidden), (hidden,),
                                                       (hidden,)], [dtype] * 5, {"cuda"}),
    ]
    return per_layer * layers


@pytest.mark.parametrize("gemm", backend.GEMMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encoder_runs_the_fused_triton_ops(dtype, gemm, launches, monkeypatch):
    import fastbert

    monkeypatch.setenv("FASTBERT_GEMM", gemm)
    config = make_config("h144", layers=2)  # hidden 144, 3 heads of 48, intermediate 288
    model = fastbert.BertModel(config).eval()
    mode, record = FakeTensorMode(), RecordFastbertOps()
    state = fake_state(model, mode, dtype, prefix="encoder.")
    lengths = [5, 0, 9]
    (hidden_states, cu_seqlens) = fake_cuda(mode, torch.randn(14, 144).to(dtype),
                                            torch.tensor([0, 5, 5, 14], dtype=torch.int32))
    packing = Packing(None, cu_seqlens, max(lengths), len(lengths), max(lengths))
    with mode, record, torch.no_grad():
        out, _, _ = torch.func.functional_call(model.encoder, state, (hidden_states, packing))
    assert out.shape == (14, 144) and out.dtype == dtype and out.device.type == "cuda"
    assert record.calls == expected_layer_calls(2, 14, 144, 3, 288, 3, dtype, gemm)
    mine = [e for e in launches if e[0] != "launch" or e[1] in MY_KERNELS]  # not the embeddings kernel
    helpers, kernels = mine[0::2], mine[1::2]
    triton_ops = 6 if gemm == "cublaslt" and dtype != torch.float32 else 8
    assert len(helpers) == triton_ops and all(wrapped and devices == {"cuda"} for _, wrapped, devices in helpers)
    assert [k[0] for k in kernels] == ["launch"] * triton_ops


@pytest.mark.parametrize("gemm", backend.GEMMS)
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_traces_on_the_compile_path(dtype, mask, gemm, launches, monkeypatch):
    """The whole model as torch.compile traces it (no host sync): every layer runs the three fused
    Triton ops on CUDA tensors. With a mask, the static packing carries all batch * seqlen rows in
    2 * batch sequences (see ``static_unpad_input``)."""
    import fastbert

    monkeypatch.setenv("FASTBERT_GEMM", gemm)
    config = make_config("h144", layers=2)
    model = fastbert.BertModel(config).eval()
    mode, record = FakeTensorMode(), RecordFastbertOps()
    state = fake_state(model, mode, dtype)
    batch, seqlen = 3, 7
    ids, attention_mask = fake_cuda(mode, torch.randint(0, config.vocab_size, (batch, seqlen)),
                                    torch.ones(batch, seqlen, dtype=torch.long))
    kwargs = {"input_ids": ids, "attention_mask": attention_mask if mask else None}
    with mock.patch("torch.compiler.is_compiling", return_value=True), mode, record, torch.no_grad():
        out = torch.func.functional_call(model, state, args=(), kwargs=kwargs)
    assert out.last_hidden_state.shape == (batch, seqlen, 144) and out.last_hidden_state.dtype == dtype
    assert out.last_hidden_state.device.type == "cuda"
    sequences = 2 * batch if mask else batch
    assert record.mine() == expected_layer_calls(2, batch * seqlen, 144, 3, 288, sequences, dtype, gemm)
    mine = [e for e in launches if e[0] != "launch" or e[1] in MY_KERNELS]  # not the embeddings kernel
    helpers, kernels = mine[0::2], mine[1::2]
    triton_ops = 6 if gemm == "cublaslt" and dtype != torch.float32 else 8
    assert len(helpers) == triton_ops and all(wrapped and devices == {"cuda"} for _, wrapped, devices in helpers)
    assert [k[0] for k in kernels] == ["launch"] * triton_ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_graph_runner_body_is_sync_free(dtype, launches):
    """What PaddedCUDAGraphRunner captures (value checks + the whole forward under
    validation.static_forms, no torch.compile involved): no host read (fake tensors would refuse it),
    the fused Triton ops on CUDA tensors over all batch * seqlen rows of the bucket."""
    import fastbert
    from fastbert.cuda_graphs import PaddedCUDAGraphRunner, _PaddedBucket

    config = make_config("h144", layers=2)
    model = fastbert.BertModel(config).eval()
    runner = PaddedCUDAGraphRunner(model, capture=False)
    mode, record = FakeTensorMode(), RecordFastbertOps()
    state = {f"model.{name}": t for name, t in fake_state(model, mode, dtype).items()}
    with mode:
        bucket = _PaddedBucket(4, 32, "cuda")

    class Body(torch.nn.Module):  # lets functional_call swap in the fake parameters
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return runner._forward(bucket)

    census = AtenCensus()
    with mode, record, census, torch.no_grad():
        hidden, pooled, extremes, limits = torch.func.functional_call(Body(), state, ())
    assert hidden.shape == (4, 32, 144) and hidden.dtype == dtype and hidden.device.type == "cuda"
    # Smallest and largest id, token type and mask value, and their bounds.
    assert pooled.shape == (4, 144) and extremes.shape == (6,) and extremes.dtype == torch.int64
    assert limits == [config.vocab_size, config.type_vocab_size, 2]
    assert record.mine() == expected_layer_calls(2, 4 * 32, 144, 3, 288, 2 * 4, dtype)
    # Everything but the layers: each op is a kernel in every replay, and at small batches the replay
    # is a chain of small kernels. The packing, its clamped lookups and the value checks in one op
    # (pack_padded_batch: 19 ops of PyTorch before, 35 before 2026-11-26's first trims), the
    # embeddings, re-padding (the padding zeroed, the rows put back, no zero fill) and the pooler's tanh (the
    # pooler's and the layers' matmuls are left out, with the QKV concatenation fake weights take).
    layers = {"mm", "addmm", "_addmm_activation", "cat", "varlen_attention", "bias_residual_layer_norm",
              "bias_activation"}
    outside = sorted(op for op in census.ops if op not in layers)
    assert outside == sorted(["pack_padded_batch", "embedding_layer_norm_triton", "where", "index_copy_",
                              "tanh"]), outside


class AtenCensus(TorchDispatchMode):
    """The names of the operators that do work (views, allocations and CPU scalars left out)."""

    FREE = {"view", "_unsafe_view", "reshape", "empty", "as_strided", "slice", "expand", "select", "unsqueeze",
            "squeeze", "alias", "detach", "t", "transpose", "permute", "empty_strided", "new_empty", "unbind",
            "lift_fresh", "_local_scalar_dense", "empty_like", "new_empty_strided", "scalar_tensor", "device"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_active_backend_on_cuda_is_triton():
    for name in ("attention", "bias_activation", "bias_residual_layer_norm"):
        op = importlib.import_module(f"fastbert.ops.{name}")
        assert op.active_backend("cuda") == "triton"
        assert op.active_backend("cpu") == "torch"
