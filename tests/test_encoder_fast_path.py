"""The encoder's eager fast path (``ops.encoder_layer``): each layer's kernels launched from one
function instead of through its modules and ops.

- Under ``TRITON_INTERPRET=1`` (``FASTBERT_BACKEND=triton``, a child pytest process): the fast path
  gives the module path's output bit for bit (same kernels, same arguments) at fp32 and fp16, odd
  shapes and every mask kind, and matches transformers; every layer takes it in a plain inference
  call; anything that must see the modules or the ops sends the affected layers (or the whole
  encoder) down the module path, which then gives what transformers gives: hooks on a sub-module, a
  global module hook, a ``forward`` replaced on an instance, a sub-module of another class, a weight
  of a tensor subclass, a layer input in another layout, mixed dtypes, autograd, output_attentions,
  bad ``cu_seqlens`` (the op's error). first_token_only's last layer takes it too. Under
  ``FASTBERT_GEMM=triton`` the fast path launches the fused GEMM, as the module path does.
- On a GPU (skipped without one): the same bit-for-bit check at fp32, fp16 and bf16, first-token-only
  too, and fp32 against transformers.
- Here: CPU calls under the default backend never take it; a BertLayer subclass keeps its forward's
  signature; ``weights_ready`` refuses shapes and dtypes the kernels cannot take.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastbert import modeling_bert
from fastbert.ops import backend
from tests.helpers import LaunchCounter
from tests.helpers import FP32_INTERPRETER, FP32_MODEL_RANDOM, assert_close, interpreter_parent_test, needs_cuda
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.model_utils import make_config, make_mask, model_pair, random_inputs

needs_triton = pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")

test_fast_path_on_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 54, FASTBERT_BACKEND="triton")


@pytest.fixture
def fast_layers(monkeypatch):
    """Counts the layers that took the fast path."""
    calls = []
    original = modeling_bert.encoder_layer

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(modeling_bert, "encoder_layer", counted)
    return calls


def forward(model, ids, mask, types, fast=True, **kwargs):
    """``model``'s last_hidden_state (and pooler output), the fast path allowed or not."""
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(modeling_bert, "fast_path_ready", lambda *args: False)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, token_type_ids=types, **kwargs)
    return out.last_hidden_state, out.pooler_output


def assert_fast_equals_module_path(model, ids, mask, types, **kwargs):
    fast = forward(model, ids, mask, types, **kwargs)
    slow = forward(model, ids, mask, types, fast=False, **kwargs)
    for a, b, what in zip(fast, slow, ("last_hidden_state", "pooler_output")):
        assert torch.equal(a, b), f"{what}: the fast path differs from the module path by {(a - b).abs().max()}"
    return fast


if IN_CHILD:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("mask_kind", ["none", "right", "holes"])
    @pytest.mark.parametrize("shape", ["h144", "h312", "h96"])
    def test_interpreter_case_fast_path_is_the_module_path_bit_for_bit(shape, mask_kind, dtype, fast_layers):
        fast, hf = model_pair(make_config(shape, layers=2))
        fast.to(dtype)
        ids, types = random_inputs(fast.config, 3, 11)
        mask = make_mask(mask_kind, 3, 11)
        hidden, _ = assert_fast_equals_module_path(fast, ids, mask, types)
        assert len(fast_layers) == 2, fast_layers
        if dtype == torch.float32:
            with torch.no_grad():
                theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            keep = mask.bool()
            assert_close(hidden[keep], theirs[keep], FP32_INTERPRETER, "last_hidden_state against transformers")

    def _two_fast_layers_against_transformers(mask_kind, fast_layers, launches, what):
        """Two forwards of a 2-layer model: both layers take the fast path, ``launches`` counts one
        launch a layer and forward, and the output equals the module path's and transformers'."""
        fast, hf = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 3, 11)
        mask = make_mask(mask_kind, 3, 11)
        hidden, _ = assert_fast_equals_module_path(fast, ids, mask, types)
        assert len(fast_layers) == 2 and launches.count == 4, (fast_layers, launches.count)  # 2 layers, 2 forwards
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        keep = mask.bool()
        assert_close(hidden[keep], theirs[keep], FP32_INTERPRETER, f"{what} against transformers")

    @pytest.mark.parametrize("mask_kind", ["none", "holes"])
    def test_interpreter_case_fused_gemm_setting(mask_kind, fast_layers, monkeypatch):
        """FASTBERT_GEMM=triton: the fast path launches the fused GEMM as ops.linear_activation does."""
        monkeypatch.setenv("FASTBERT_GEMM", "triton")
        launches = LaunchCounter(monkeypatch, "fastbert.ops.linear_activation", "linear_activation_fwd")
        _two_fast_layers_against_transformers(mask_kind, fast_layers, launches, "fused GEMM")

    @pytest.mark.parametrize("mask_kind", ["none", "holes"])
    def test_interpreter_case_cublaslt_setting(mask_kind, fast_layers, monkeypatch):
        """FASTBERT_GEMM=cublaslt: the fast path runs the FFN's first matmul with its bias + GELU in one
        ``torch._addmm_activation``, as ops.linear_activation does, and no epilogue kernel. cuBLASLt
        runs on CUDA tensors only: here ``cublaslt_takes`` is let take CPU tensors, whose
        ``_addmm_activation`` computes erf-GELU, so the output is also transformers' within fp32's budget."""
        monkeypatch.setenv("FASTBERT_GEMM", "cublaslt")
        gemm = importlib.import_module("fastbert.ops.linear_activation")
        takes = gemm.cublaslt_takes
        monkeypatch.setattr(gemm, "cublaslt_takes", lambda x, *args: x.device.type == "cpu" or takes(x, *args))
        epilogues, original = [], torch._addmm_activation
        monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: epilogues.append(k) or original(*a, **k))
        separate = importlib.import_module("fastbert.ops.bias_activation")
        monkeypatch.setattr(separate, "bias_activation_fwd", lambda *a, **k: pytest.fail("the epilogue kernel ran"))
        fast, hf = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 3, 11)
        mask = make_mask(mask_kind, 3, 11)
        hidden, _ = assert_fast_equals_module_path(fast, ids, mask, types)
        assert len(fast_layers) == 2 and epilogues == [{"use_gelu": True}] * 4, (fast_layers, epilogues)
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        keep = mask.bool()
        assert_close(hidden[keep], theirs[keep], FP32_INTERPRETER, "cuBLASLt setting against transformers")

    def test_interpreter_case_each_layer_runs_on_its_tensors_gpu(fast_layers, monkeypatch):
        """The fast path makes its hidden states' GPU current (``backend.device_guard``) around each
        layer's launches, as the ops do around theirs: Triton launches on the current device."""
        guarded = []
        original = backend.device_guard
        monkeypatch.setattr(backend, "device_guard", lambda t: guarded.append(t.shape) or original(t))
        fast, _ = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 2, 7)
        forward(fast, ids, None, types)
        # The embeddings' Triton op (on its word table), then each layer (on its hidden states).
        assert len(fast_layers) == 2 and guarded == [(512, 144), (14, 144), (14, 144)], guarded

    def test_interpreter_case_layer_norms_size_their_grids_for_the_tensors_gpu(fast_layers, monkeypatch):
        """Both LayerNorms of a layer get the SM count of the hidden states' GPU (one row a program when
        the default blocks would leave SMs idle), as the op passes it."""
        from fastbert.ops import encoder_layer

        seen, original = [], encoder_layer._layer_norm.bias_residual_layer_norm_fwd
        monkeypatch.setattr(backend, "gpu_description", lambda t: (90, 7))
        monkeypatch.setattr(encoder_layer._layer_norm, "bias_residual_layer_norm_fwd",
                            lambda *args, **kwargs: seen.append(args[7]) or original(*args, **kwargs))
        fast, _ = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 2, 7)
        forward(fast, ids, None, types)
        assert len(fast_layers) == 2 and seen == [7] * 4, seen

    @pytest.mark.parametrize("mask_kind", ["none", "left", "holes"])
    def test_interpreter_case_first_token_only(mask_kind, fast_layers):
        """The last layer computes only each row's first token after attention, on the fast path too."""
        fast, hf = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 3, 11)
        mask = make_mask(mask_kind, 3, 11)
        hidden, pooled = assert_fast_equals_module_path(fast, ids, mask, types, first_token_only=True)
        assert len(fast_layers) == 2 and hidden.shape == (3, 1, 144), (fast_layers, hidden.shape)
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, token_type_ids=types)
        first_real = mask.bool()[:, 0]
        assert_close(hidden[first_real, 0], theirs.last_hidden_state[first_real, 0], FP32_INTERPRETER, "[CLS]")
        assert_close(pooled[first_real], theirs.pooler_output[first_real], FP32_INTERPRETER, "pooler")

    def test_interpreter_case_one_qkv_copy_per_forward(fast_layers, monkeypatch):
        """Under CUDA-graph capture (stood in for here) the fast path copies every layer's QKV weights
        into their fused storage in one foreach launch (one kernel a replay, not one a layer); eager
        calls copy per layer (so the first layer launches before the others' weights are read). Both
        follow weights changed through ``.data`` between forwards; a hook on one layer makes each layer
        copy its own (the hook could change weights between a shared copy and the layers' reads)."""
        copies = []
        original = torch._foreach_copy_
        monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or original(dst, src))
        fast, hf = model_pair(make_config("h144", layers=3))
        ids, types = random_inputs(fast.config, 2, 9)
        mask = make_mask("right", 2, 9)
        forward(fast, ids, mask, types)
        assert copies == [6, 6, 6] and len(fast_layers) == 3, (copies, fast_layers)
        copies.clear()
        monkeypatch.setattr(modeling_bert, "_capturing", lambda t: True)
        forward(fast, ids, mask, types)
        assert copies == [18] and len(fast_layers) == 6, (copies, fast_layers)
        for model in (fast, hf):
            model.encoder.layer[1].attention.self.value.weight.data.mul_(1.5)
        hidden, _ = forward(fast, ids, mask, types)
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        keep = mask.bool()
        assert_close(hidden[keep], theirs[keep], FP32_INTERPRETER, "after a write through .data")
        copies.clear()
        fast.encoder.layer[2].register_forward_hook(lambda module, args, out: out)
        forward(fast, ids, mask, types)
        assert copies == [6, 6, 6] and len(fast_layers) == 12, (copies, fast_layers)

    def test_interpreter_case_long_sequences(fast_layers):
        """Several key blocks per sequence, holes."""
        fast, _ = model_pair(make_config("h144", layers=1, max_positions=160))
        ids, types = random_inputs(fast.config, 2, 150)
        assert_fast_equals_module_path(fast, ids, make_mask("holes", 2, 150), types)
        assert len(fast_layers) == 1

    def hooked_pair(where: str, pre: bool = False):
        """A model pair with the same hook (output x 1.5, or input x 1.5 for a pre-hook) on the
        sub-module at ``where`` of both."""
        fast, hf = model_pair(make_config("h144", layers=2))
        for model in (fast, hf):
            module = model.get_submodule(where)
            if pre:
                module.register_forward_pre_hook(lambda m, args: (1.5 * args[0], *args[1:]))
            else:
                module.register_forward_hook(lambda m, args, out: 1.5 * out)
        return fast, hf

    @pytest.mark.parametrize("where, pre, fast_count", [
        ("encoder.layer.0.attention.output.dense", False, 1),
        ("encoder.layer.1.intermediate.dense", True, 1),
        ("encoder.layer.1.output.LayerNorm", False, 1),
        ("encoder.layer.0.attention.self.query", False, 1),
        ("encoder.layer.1.output.dropout", False, 1),  # a hidden dropout is called, hooks and all
        ("encoder.layer.0.attention.output.dropout", True, 1),
    ])
    def test_interpreter_case_hooked_leaf_module_runs_its_layer_as_modules(where, pre, fast_count, fast_layers):
        fast, hf = hooked_pair(where, pre)
        ids, types = random_inputs(fast.config, 3, 11)
        mask = make_mask("right", 3, 11)
        hidden, _ = assert_fast_equals_module_path(fast, ids, mask, types)
        assert len(fast_layers) == fast_count, fast_layers
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        keep = mask.bool()
        assert_close(hidden[keep], theirs[keep], FP32_INTERPRETER, f"hook on {where}")

    def test_interpreter_case_hooked_container_module_fires(fast_layers):
        """A hook on BertSelfOutput, BertIntermediate, ...: the module path calls them as modules."""
        fast, _ = model_pair(make_config("h144", layers=2))
        seen = []
        fast.encoder.layer[1].intermediate.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        ids, types = random_inputs(fast.config, 2, 7)
        forward(fast, ids, None, types)
        assert len(seen) == 1 and len(fast_layers) == 1, (seen, fast_layers)

    def test_interpreter_case_global_module_hook_turns_the_fast_path_off(fast_layers):
        fast, _ = model_pair(make_config("h144", layers=2))
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
        try:
            ids, types = random_inputs(fast.config, 2, 7)
            forward(fast, ids, None, types)
        finally:
            handle.remove()
        assert fast_layers == [] and modeling_bert.BertIntermediate in seen, (fast_layers, seen)

    def test_interpreter_case_subclassed_sub_module_runs_as_a_module(fast_layers):
        class Doubled(modeling_bert.BertIntermediate):
            def forward(self, hidden_states):
                return 2 * super().forward(hidden_states)

        fast, _ = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 2, 7)
        before, _ = forward(fast, ids, None, types)
        replacement = Doubled(fast.config)
        replacement.load_state_dict(fast.encoder.layer[0].intermediate.state_dict())
        fast.encoder.layer[0].intermediate = replacement
        fast_layers.clear()
        after, _ = assert_fast_equals_module_path(fast, ids, None, types)
        assert len(fast_layers) == 1 and not torch.equal(before, after)

    def test_interpreter_case_mixed_dtypes_run_as_modules(fast_layers):
        """fp16 model with one fp32 LayerNorm: the module path promotes, the kernels would not."""
        fast, _ = model_pair(make_config("h144", layers=2))
        fast.half()
        fast.encoder.layer[1].output.LayerNorm.float()
        ids, types = random_inputs(fast.config, 2, 7)
        assert_fast_equals_module_path(fast, ids, None, types)
        assert len(fast_layers) == 1

    def test_interpreter_case_what_the_fast_path_leaves_alone(fast_layers, monkeypatch):
        fast, _ = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 2, 7)
        out = fast(ids, token_type_ids=types)  # gradients on: autograd must see the ops
        assert out.last_hidden_state.requires_grad and fast_layers == []
        forward(fast, ids, None, types, output_attentions=True)
        assert fast_layers == []

    def test_interpreter_case_layer_hook_returning_another_layout(fast_layers):
        """A hook on a whole layer may return any layout (here column-major): the next layer checks
        its own input, and the module path copies it to rows."""
        fast, hf = model_pair(make_config("h144", layers=2))
        for model in (fast, hf):
            model.encoder.layer[0].register_forward_hook(
                lambda m, args, out: (out[0].t().contiguous().t(), *out[1:]) if isinstance(out, tuple) else out)
        ids, types = random_inputs(fast.config, 2, 7)
        hidden, _ = assert_fast_equals_module_path(fast, ids, None, types)
        assert len(fast_layers) == 1, fast_layers  # layer 0 only: layer 1's input is column-major
        with torch.no_grad():
            plain = forward(model_pair(make_config("h144", layers=2))[0], ids, None, types)[0]
        assert torch.equal(hidden, plain), "a layout change must not change the numbers"

    @pytest.mark.parametrize("where", ["encoder.layer.0.intermediate", "encoder.layer.0.output.dense",
                                       "encoder.layer.0.attention.output.LayerNorm"])
    def test_interpreter_case_replaced_forward_is_called(where, fast_layers):
        """``module.forward = ...`` on the instance (accelerate's offloading hooks do that): the module
        is called, as in transformers."""
        fast, hf = model_pair(make_config("h144", layers=2))
        calls = []
        for model in (fast, hf):
            module = model.get_submodule(where)
            original = module.forward

            def replaced(*args, _original=original, **kwargs):
                calls.append(where)
                return 1.25 * _original(*args, **kwargs)

            module.forward = replaced
        ids, types = random_inputs(fast.config, 2, 7)
        hidden, _ = assert_fast_equals_module_path(fast, ids, None, types)
        assert len(fast_layers) == 1 and calls, (fast_layers, calls)
        with torch.no_grad():
            theirs = hf(ids, token_type_ids=types).last_hidden_state
        assert_close(hidden, theirs, FP32_INTERPRETER, f"forward replaced on {where}")

    def test_interpreter_case_weight_subclass_runs_as_modules(fast_layers):
        """A tensor subclass as a weight must see the ops (the module path's torch.library ops)."""
        seen = []

        class Traced(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                seen.append(str(func))
                return super().__torch_function__(func, types, args, kwargs or {})

        fast, _ = model_pair(make_config("h144", layers=2))
        norm = fast.encoder.layer[1].output.LayerNorm
        norm.weight = torch.nn.Parameter(norm.weight.detach().as_subclass(Traced), requires_grad=False)
        ids, types = random_inputs(fast.config, 2, 7)
        forward(fast, ids, None, types)
        assert len(fast_layers) == 1 and any("bias_residual_layer_norm" in name for name in seen), seen

    def test_interpreter_case_bad_cu_seqlens_raise_as_in_the_module_path(fast_layers):
        """The encoder called directly with int64 offsets: the attention op's error, not a kernel run."""
        from fastbert.ops import Packing

        fast, _ = model_pair(make_config("h144", layers=2))
        hidden = torch.randn(7, 144)
        packing = Packing(None, torch.tensor([0, 3, 7]), 4, 2, 4)
        with torch.no_grad(), pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
            fast.encoder(hidden, packing)
        assert fast_layers == []

    def test_interpreter_case_training_with_dropout_runs_as_modules(fast_layers):
        config = make_config("h144", layers=2)
        config.hidden_dropout_prob = 0.1
        fast, _ = model_pair(config)
        fast.train()
        ids, types = random_inputs(fast.config, 2, 7)
        forward(fast, ids, None, types)
        assert fast_layers == []

    def test_interpreter_case_frozen_embeddings_with_gradients_run_as_modules(fast_layers, monkeypatch):
        """Gradients on with the embeddings frozen (a common fine-tuning setup): the hidden states need
        no grad, yet the encoder's weights do, so autograd must see the ops: the module path, and every
        encoder weight gets the gradient it gets there."""
        fast, _ = model_pair(make_config("h144", layers=2))
        fast.embeddings.requires_grad_(False)
        ids, types = random_inputs(fast.config, 2, 7)

        def gradients():
            fast.zero_grad(set_to_none=True)
            out = fast(ids, token_type_ids=types)
            assert out.last_hidden_state.requires_grad, "the encoder's output has no grad_fn"
            out.last_hidden_state.sum().backward()
            return {name: p.grad for name, p in fast.encoder.named_parameters()}

        grads = gradients()
        assert fast_layers == [], fast_layers
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        with monkeypatch.context() as patch:
            patch.setattr(modeling_bert, "fast_path_ready", lambda *args: None)
            module_path = gradients()
        for name, grad in grads.items():
            assert torch.equal(grad, module_path[name]), name

    @pytest.mark.parametrize("where, base", [("output", "BertOutput"), ("attention.output", "BertSelfOutput")])
    def test_interpreter_case_subclassed_output_module_runs_as_a_module(where, base, fast_layers):
        """A BertOutput or BertSelfOutput subclass with its own forward: that forward runs (layer 0 takes
        the module path, layer 1 the fast path) and the output reflects it."""
        calls = []

        class Doubled(getattr(modeling_bert, base)):
            def forward(self, hidden_states, input_tensor):
                calls.append(hidden_states.shape)
                return 2 * super().forward(hidden_states, input_tensor)

        fast, _ = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 2, 7)
        before, _ = forward(fast, ids, None, types)
        original = fast.encoder.layer[0].get_submodule(where)
        replacement = Doubled(fast.config)
        replacement.load_state_dict(original.state_dict())
        parent, _, name = f"encoder.layer.0.{where}".rpartition(".")
        setattr(fast.get_submodule(parent), name, replacement)
        fast_layers.clear()
        after, _ = assert_fast_equals_module_path(fast, ids, None, types)
        assert len(fast_layers) == 1 and len(calls) == 2, (fast_layers, calls)  # 2 forwards
        assert not torch.equal(before, after), "the subclass's forward did not change the output"

    def test_interpreter_case_training_with_attention_dropout_only_runs_as_modules(fast_layers):
        """Train mode under no_grad with attention-probs dropout on and hidden dropout off: the
        attention dropout is applied (the module path), not skipped by the fast path."""
        config = make_config("h144", layers=2)
        config.hidden_dropout_prob = 0.0
        config.attention_probs_dropout_prob = 0.5
        fast, _ = model_pair(config)
        fast.train()
        ids, types = random_inputs(fast.config, 2, 7)
        torch.manual_seed(0)
        first, _ = forward(fast, ids, None, types)
        second, _ = forward(fast, ids, None, types)
        assert fast_layers == [], fast_layers
        assert not torch.equal(first, second), "no attention dropout was applied"

    def test_interpreter_case_mixed_dtypes_under_capture_run_as_modules(fast_layers, monkeypatch):
        """As the mixed-dtype case, with every layer's weights prepared up front (CUDA-graph capture,
        stood in for): the encoder checks them against its input, so the odd layer runs as modules."""
        monkeypatch.setattr(modeling_bert, "_capturing", lambda t: True)
        fast, _ = model_pair(make_config("h144", layers=2))
        fast.half()
        fast.encoder.layer[1].output.LayerNorm.float()
        ids, types = random_inputs(fast.config, 2, 7)
        assert_fast_equals_module_path(fast, ids, None, types)
        assert len(fast_layers) == 1, fast_layers

    def test_interpreter_case_autocast_runs_as_modules(fast_layers):
        """Under autocast the module path runs (autocast must see the ops' matmuls), whatever it then
        computes."""
        fast, _ = model_pair(make_config("h144", layers=2))
        ids, types = random_inputs(fast.config, 2, 7)
        with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
            fast(ids, token_type_ids=types)
        assert fast_layers == [], fast_layers

    @pytest.mark.parametrize("mask_kind", ["none", "holes"])
    def test_interpreter_case_cublaslt_setting_falls_back_where_cublaslt_refuses(mask_kind, fast_layers, monkeypatch):
        """FASTBERT_GEMM=cublaslt on tensors ``cublaslt_takes`` refuses (CPU ones): the fast path runs
        PyTorch's matmul and the separate epilogue kernel, as ops.linear_activation does."""
        monkeypatch.setenv("FASTBERT_GEMM", "cublaslt")
        monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("cuBLASLt's epilogue ran"))
        launches = LaunchCounter(monkeypatch, "fastbert.ops.bias_activation", "bias_activation_fwd")
        _two_fast_layers_against_transformers(mask_kind, fast_layers, launches, "cuBLASLt fallback")


@needs_cuda
@pytest.mark.parametrize("first_token_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "right", "holes"])
def test_cuda_fast_path_is_the_module_path_bit_for_bit(mask_kind, dtype, first_token_only, fast_layers, monkeypatch):
    """On a GPU (the default backend): every layer takes the fast path in an inference call, and gives
    the module path's output bit for bit; fp32 also matches transformers on the GPU."""
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    fast, hf = model_pair(make_config("h144", layers=2), device="cuda")
    fast.to(dtype)
    ids, types = random_inputs(fast.config, 3, 37, device="cuda")
    mask = make_mask(mask_kind, 3, 37).cuda()
    hidden, _ = assert_fast_equals_module_path(fast, ids, mask, types, first_token_only=first_token_only)
    assert len(fast_layers) == 2, fast_layers
    if dtype == torch.float32 and not first_token_only:
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        keep = mask.bool()
        assert_close(hidden[keep], theirs[keep], FP32_MODEL_RANDOM, "last_hidden_state against transformers")


def test_layer_subclass_keeps_its_forward_signature(monkeypatch):
    """A BertLayer subclass written against ``forward(hidden_states, packing, output_attentions, rows)``
    is called that way, fast path or not."""
    class LoggedLayer(modeling_bert.BertLayer):
        def forward(self, hidden_states, packing, output_attentions=False, rows=None):
            return super().forward(hidden_states, packing, output_attentions, rows)

    monkeypatch.setattr(modeling_bert, "fast_path_ready", lambda *args: True)  # as on a GPU
    fast, hf = model_pair(make_config("h144", layers=2))
    for i in range(2):
        layer = LoggedLayer(fast.config)
        layer.load_state_dict(fast.encoder.layer[i].state_dict())
        fast.encoder.layer[i] = layer
    ids, types = random_inputs(fast.config, 2, 7)
    with torch.no_grad(), backend.use_backend("torch"):
        ours = fast(ids, token_type_ids=types).last_hidden_state
        theirs = hf(ids, token_type_ids=types).last_hidden_state
    assert_close(ours, theirs, 2e-5, "a BertLayer subclass")


def test_cpu_default_backend_never_takes_the_fast_path(fast_layers, monkeypatch):
    from fastbert.validation import check_inputs

    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    fast, _ = model_pair(make_config("h144", layers=2))
    ids, types = random_inputs(fast.config, 2, 7)
    forward(fast, ids, None, types)
    assert fast_layers == []
    # A layer called with fast_path off (None, False): the module path, whatever the value's type.
    packing = check_inputs(fast.config, ids, None, None, None, None).packing
    hidden = torch.randn(14, 144)
    with torch.no_grad():
        for off in (None, False):
            fast.encoder.layer[0](hidden, packing, fast_path=off)
    assert fast_layers == []


@needs_triton
def test_weights_ready_refuses_what_the_kernels_cannot_take():
    from fastbert.ops.encoder_layer import weights_ready

    fast, _ = model_pair(make_config("h144", layers=1))
    layer = fast.encoder.layer[0]
    hidden = torch.randn(5, 144)
    weights = layer._fast_path_weights()
    assert weights is not None and weights_ready(weights, hidden)
    assert not weights_ready(weights, hidden.half()), "another dtype"
    assert not weights_ready(weights, torch.randn(5, 96)), "another hidden size"
    short = weights._replace(output_bias=weights.output_bias[:-1])
    assert not weights_ready(short, hidden), "a bias shorter than the GEMM's columns"
    wide = weights._replace(intermediate_bias=torch.randn(289))
    assert not weights_ready(wide, hidden), "an intermediate bias of another width"
    strided = weights._replace(attention_norm=(torch.randn(288)[::2], *weights.attention_norm[1:]))
    assert not weights_ready(strided, hidden), "a strided LayerNorm weight"
    assert not weights_ready(weights._replace(scale=0.0), hidden), "a scale the attention kernel refuses"
    assert not weights_ready(weights._replace(num_heads=5), hidden), "heads that do not divide hidden"
