"""``backend.direct_launch``: the Triton ops launch straight from Python only in a plain eager call;
whatever must see the op (torch.compile, FakeTensorMode and other dispatch modes, functorch transforms,
tensor subclasses, autograd) gets the ``torch.library`` op."""

from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastbert.ops import backend


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Subclass(torch.Tensor):
    pass


def test_plain_eager_calls_launch_directly():
    x, weight = torch.randn(4, 8), torch.nn.Parameter(torch.randn(8))
    assert backend.direct_launch(x, None, torch.randn(8))
    with torch.no_grad():  # inference with a model's parameters
        assert backend.direct_launch(x, weight)
    with torch.inference_mode():
        assert backend.direct_launch(torch.randn(3))


def test_autograd_needs_the_op():
    x, weight = torch.randn(4, 8), torch.nn.Parameter(torch.randn(8))
    assert not backend.direct_launch(x.requires_grad_(), None)
    assert not backend.direct_launch(torch.randn(4, 8), weight)  # grad enabled, a parameter needs it


@pytest.mark.parametrize("context", ["fake", "dispatch_mode", "compiling"])
def test_tracing_and_modes_need_the_op(context):
    x = torch.randn(4, 8)
    if context == "fake":
        with FakeTensorMode() as mode:
            assert not backend.direct_launch(mode.from_tensor(x))
    elif context == "dispatch_mode":
        with PassThrough():
            assert not backend.direct_launch(x)
    else:
        with mock.patch("torch.compiler.is_compiling", return_value=True):
            assert not backend.direct_launch(x)


def test_functorch_transforms_and_subclasses_need_the_op():
    seen = []
    torch.func.grad(lambda t: (seen.append(backend.direct_launch(t)), t.sum())[1])(torch.randn(3))
    torch.func.vmap(lambda t: (seen.append(backend.direct_launch(t)), t * 2)[1])(torch.randn(2, 3))
    assert seen == [False, False]
    assert not backend.direct_launch(torch.randn(3).as_subclass(Subclass))


@pytest.mark.parametrize("force, setting, choices", [(backend.use_backend, backend.backend_setting, ("torch", "triton")),
                                                     (backend.use_gemm, backend.gemm_setting, ("triton", "cublas"))])
def test_overrides_are_per_thread_and_restored(force, setting, choices, monkeypatch):
    """A ``with use_backend / use_gemm`` block in one thread leaves another thread's setting alone,
    and overlapping blocks in two threads each restore their own."""
    import threading

    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    monkeypatch.delenv("FASTBERT_GEMM", raising=False)
    default = setting()
    entered, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with force(choices[1]):
            seen["other inside"] = setting()
            entered.set()
            release.wait(10)
        seen["other after"] = setting()

    with force(choices[0]):
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait(10)
        seen["main inside"] = setting()
    release.set()
    thread.join(10)
    assert seen == {"other inside": choices[1], "main inside": choices[0], "other after": default}
    assert setting() == default


def test_kernels_refuse_what_they_cannot_run_here():
    """CPU tensors need a kernel defined under TRITON_INTERPRET=1, and never bfloat16 there (the
    interpreter stores it as raw 16-bit integers: its results would be silently wrong); CUDA tensors
    pass. ``InterpretedFunction`` stands in for an interpreted kernel (Triton's class of that name)."""
    class InterpretedFunction:
        __name__ = "_some_fwd_kernel"

    class JITFunction:
        __name__ = "_some_fwd_kernel"

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    backend.check_kernel_runs_here(InterpretedFunction(), cpu, torch.float16)
    backend.check_kernel_runs_here(JITFunction(), cuda, torch.bfloat16)
    with pytest.raises(RuntimeError, match="_some_fwd_kernel cannot run on cpu tensors.*TRITON_INTERPRET=1"):
        backend.check_kernel_runs_here(JITFunction(), cpu, torch.float32)
    with pytest.raises(NotImplementedError, match="_some_fwd_kernel cannot compute bfloat16 under TRITON_INTERPRET=1"):
        backend.check_kernel_runs_here(InterpretedFunction(), cpu, torch.bfloat16)


def test_forward_mode_ad_takes_the_references(monkeypatch):
    """The fused ops register a backward only: under forward-mode AD (a dual level, torch.func.jvp) their
    kernels would drop the tangents, so every op takes its PyTorch reference, whatever the backend
    (FASTBERT_BACKEND=triton on CPU tensors would raise here if it asked for a kernel)."""
    import torch.autograd.forward_ad as fwAD

    from fastbert import ops

    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    x, weight, bias = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    assert not backend.forward_ad_active()
    with fwAD.dual_level():
        assert backend.forward_ad_active() and not backend.use_triton(x, differentiable=True)
        assert backend.needs_autograd(x)
        dual = fwAD.make_dual(weight, torch.ones_like(weight))
        tangent = fwAD.unpack_dual(ops.linear_activation(x, dual, bias, "gelu")).tangent
    _, expected = torch.func.jvp(lambda w: ops.linear_activation_reference(x, w, bias, "gelu"), (weight,),
                                 (torch.ones_like(weight),))
    _, through_jvp = torch.func.jvp(lambda w: ops.linear_activation(x, w, bias, "gelu"), (weight,),
                                    (torch.ones_like(weight),))
    assert tangent is not None and torch.allclose(tangent, expected) and torch.allclose(through_jvp, expected)


def test_torch_func_transforms_take_the_references(monkeypatch):
    """The fused ops' registered autograd has no functorch support (torch.func.grad through a kernel
    raised): under grad, vjp, jacrev or vmap every op takes its PyTorch reference, whatever the backend
    (FASTBERT_BACKEND=triton on CPU tensors would raise here if it asked for a kernel)."""
    from fastbert import ops

    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    x, weight, bias = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    assert not backend.transform_active()
    seen = []

    def loss(w):
        seen.append((backend.transform_active(), backend.use_triton(w, differentiable=True)))
        return ops.linear_activation(x, w, bias, "gelu").sum()

    got = torch.func.grad(loss)(weight)
    with backend.use_backend("torch"):
        expected = torch.func.grad(lambda w: ops.linear_activation_reference(x, w, bias, "gelu").sum())(weight)
    assert seen == [(True, False)] and torch.allclose(got, expected)
    rows = torch.func.vmap(lambda row: ops.bias_activation(row[None], bias[:4].clone(), "gelu")[0])(x[:, :4])
    assert torch.allclose(rows, ops.bias_activation_reference(x[:, :4], bias[:4], "gelu"))


def _long(*shape):
    return torch.zeros(*shape, dtype=torch.long)


REGISTERED_OP_MISUSE = {
    "bias_activation": (lambda: torch.ops.fastbert.bias_activation(torch.randn(5, 8), torch.randn(3), "gelu"),
                        r"bias of shape \(3,\) does not match x of shape \(5, 8\)"),
    "bias_residual_layer_norm": (
        lambda: torch.ops.fastbert.bias_residual_layer_norm(torch.randn(4096, 64), None, torch.randn(1, 64),
                                                            torch.randn(64), torch.randn(64), 1e-5),
        r"x \(4096, 64\), residual \(1, 64\) and LayerNorm weight \(64,\) do not match"),
    "linear_activation": (lambda: torch.ops.fastbert.linear_activation(torch.randn(64, 512), torch.randn(64, 3), None,
                                                                       "gelu"),
                          r"x of shape \(64, 512\) does not match a weight of shape \(64, 3\)"),
    "embedding_layer_norm_triton": (
        lambda: torch.ops.fastbert.embedding_layer_norm_triton(_long(4), _long(4), _long(1), torch.randn(10, 8),
                                                               torch.randn(10, 8), torch.randn(2, 8), torch.randn(8),
                                                               torch.randn(8), 1e-5),
        r"must have one entry per token, got shapes \(4,\), \(4,\), \(1,\)"),
    "pack_padded_batch": (lambda: torch.ops.fastbert.pack_padded_batch(_long(2, 3), _long(1, 3) + 1, _long(2, 3),
                                                                       10, 2),
                          r"attention_mask \(1, 3\) does not match input_ids \(2, 3\)"),
    "varlen_attention": (lambda: torch.ops.fastbert.varlen_attention(torch.randn(5, 25), torch.tensor([0, 5]).int(),
                                                                     5, 2, 0.5),
                         r"qkv must be \[tokens, 3 \* hidden\] with hidden divisible by 2 heads, got \(5, 25\)"),
}


@pytest.mark.parametrize("op", REGISTERED_OP_MISUSE)
def test_registered_triton_ops_check_their_shapes(op):
    """``torch.ops.fastbert.*`` called directly, past the Python functions' checks: the shapes are
    checked in the op too (its kernel read past a short bias, residual, weight, token-type row or mask:
    values, NaN or garbage; a segfault or an illegal access on a GPU). Here the check comes before any
    launch, so it runs on the CPU without the interpreter."""
    pytest.importorskip("triton")
    call, message = REGISTERED_OP_MISUSE[op]
    with pytest.raises(ValueError, match=message):
        call()
