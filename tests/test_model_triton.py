"""The whole model on the Triton kernels (``FASTBERT_BACKEND=triton``) under ``TRITON_INTERPRET=1``
against transformers' BertModel with the same weights, fp32, at real tokens.

The cases run in a child pytest process (Triton reads ``TRITON_INTERPRET`` when the kernels are
defined, so it must be set before fastbert is imported and must not leak into this process). Each
case counts the launches of the Triton launch helpers (attention, bias + activation,
bias + residual + LayerNorm; the fused linear + activation under ``FASTBERT_GEMM=triton``) during the
forward pass, so a quiet fallback to the PyTorch reference fails. Budget (DESIGN.md): 1e-4 for an fp32 model under the interpreter.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastbert.ops import backend
from tests.helpers import IN_INTERPRETER_CHILD as IN_CHILD
from tests.helpers import interpreter_parent_test
from tests.helpers import FP32_INTERPRETER, RecordFastbertOps, assert_close, assert_gradients_match
from tests.model_utils import make_config, make_mask, model_pair, random_inputs

OPS = {  # op module -> the launch helper it calls
    "attention": "attention_fwd",
    "bias_activation": "bias_activation_fwd",
    "bias_residual_layer_norm": "bias_residual_layer_norm_fwd",
    "linear_activation": "linear_activation_fwd",
}


test_model_on_triton_interpreter_in_subprocess = interpreter_parent_test(__file__, 33, FASTBERT_BACKEND="triton")


if IN_CHILD:
    @pytest.fixture
    def launches(monkeypatch):
        """Counts of each launch helper's calls, by op; and a check that the kernels are interpreted."""
        counts = dict.fromkeys(OPS, 0)
        for op, helper in OPS.items():
            module = importlib.import_module(f"fastbert.ops.{op}")
            original = getattr(module, helper)

            def counted(*args, _original=original, _op=op, **kwargs):
                counts[_op] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, helper, counted)
            kernel = next(v for k, v in vars(importlib.import_module(f"fastbert.kernels.{op}")).items()
                          if k.endswith("_fwd_kernel"))
            assert backend.is_interpreted(kernel), f"{op}: the kernel is not running in the interpreter"
        assert backend.backend_setting() == "triton" and backend.triton_interpreter()
        return counts

    def expect_launches(counts, layers, forwards=1, fused_gemm=False):
        """Per layer: attention, two LayerNorms, and the FFN's epilogue, fused into the GEMM under
        FASTBERT_GEMM=triton or else its own kernel after cuBLAS."""
        ffn = layers * forwards
        assert counts == {"attention": layers * forwards, "bias_activation": 0 if fused_gemm else ffn,
                          "bias_residual_layer_norm": 2 * layers * forwards,
                          "linear_activation": ffn if fused_gemm else 0}, counts

    def compare(fast, hf, ids, mask, types=None):
        with torch.no_grad():
            ours = fast(ids, attention_mask=mask, token_type_ids=types)
            theirs = hf(ids, attention_mask=mask, token_type_ids=types)
        keep = mask.bool()
        assert_close(ours.last_hidden_state[keep], theirs.last_hidden_state[keep], FP32_INTERPRETER,
                     "last_hidden_state")
        assert (ours.last_hidden_state[~keep] == 0).all(), "padded positions must be zeros"
        first_real = keep[:, 0]
        assert_close(ours.pooler_output[first_real], theirs.pooler_output[first_real], FP32_INTERPRETER, "pooler")
        return ours

    # h144: head dim 48; h312: 26 (TinyBERT); h160: 80; h96: 96 with one head.
    @pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes"])
    @pytest.mark.parametrize("shape", ["h144", "h312", "h160", "h96"])
    def test_interpreter_case_model_matches_transformers(shape, mask_kind, launches):
        fast, hf = model_pair(make_config(shape, layers=2))
        ids, types = random_inputs(fast.config, 3, 13)
        compare(fast, hf, ids, make_mask(mask_kind, 3, 13), types)
        expect_launches(launches, layers=2)

    @pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
    def test_interpreter_case_every_activation(hidden_act, launches):
        fast, hf = model_pair(make_config("h144", hidden_act=hidden_act))
        ids, types = random_inputs(fast.config, 2, 11)
        compare(fast, hf, ids, make_mask("right", 2, 11), types)
        expect_launches(launches, layers=2)

    @pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
    @pytest.mark.parametrize("mask_kind", ["right", "holes"])
    def test_interpreter_case_fused_gemm_matches_transformers(mask_kind, hidden_act, launches, monkeypatch):
        """FASTBERT_GEMM=triton: the FFN's first matmul and its epilogue are one Triton GEMM."""
        monkeypatch.setenv("FASTBERT_GEMM", "triton")
        fast, hf = model_pair(make_config("h144", hidden_act=hidden_act))
        ids, types = random_inputs(fast.config, 3, 13)
        compare(fast, hf, ids, make_mask(mask_kind, 3, 13), types)
        expect_launches(launches, layers=2, fused_gemm=True)

    def test_interpreter_case_bfloat16_is_refused_by_name(launches):
        """The interpreter stores bfloat16 as raw integers: a bf16 model under it raises, naming the
        dtype, instead of returning wrong numbers (on a GPU bf16 runs; FASTBERT_BACKEND=torch too)."""
        fast, _ = model_pair(make_config("h144", layers=1))
        ids, types = random_inputs(fast.config, 2, 7)
        with pytest.raises(NotImplementedError, match="cannot compute bfloat16 under TRITON_INTERPRET=1"), \
                torch.no_grad():
            fast.to(torch.bfloat16)(ids, token_type_ids=types)

    def test_interpreter_case_forward_mode_ad_equals_the_pytorch_path(launches):
        """torch.func.jvp through the model on the Triton backend: the ops take their references (the
        kernels have no forward-mode rule), so the tangent is the PyTorch path's, not zeros."""
        fast, _ = model_pair(make_config("h144", layers=1))
        embeds, tangent = torch.randn(2, 7, 144), torch.randn(2, 7, 144)
        mask = make_mask("right", 2, 7)

        def hidden(e):
            return fast(inputs_embeds=e, attention_mask=mask).last_hidden_state

        _, ours = torch.func.jvp(hidden, (embeds,), (tangent,))
        with backend.use_backend("torch"):
            _, expected = torch.func.jvp(hidden, (embeds,), (tangent,))
        assert ours.abs().max() > 0.1
        assert_close(ours, expected, FP32_INTERPRETER, "jvp tangent")

    def test_interpreter_case_torch_func_grad_equals_the_pytorch_path(launches):
        """torch.func.grad through the model on the Triton backend: the ops take their references (the
        kernels' registered autograd has no functorch support: it raised), so the gradient is the
        PyTorch path's."""
        fast, _ = model_pair(make_config("h144", layers=1))
        embeds = torch.randn(2, 7, 144)
        mask = make_mask("right", 2, 7)

        def loss(e):
            return fast(inputs_embeds=e, attention_mask=mask).last_hidden_state.square().sum()

        ours = torch.func.grad(loss)(embeds)
        with backend.use_backend("torch"):
            expected = torch.func.grad(loss)(embeds)
        assert ours.abs().max() > 0.1
        assert_close(ours, expected, FP32_INTERPRETER, "torch.func.grad")

    def test_interpreter_case_long_sequences(launches):
        """Sequences past two key blocks (the kernels' blocks are 32 to 64 keys), with holes."""
        fast, hf = model_pair(make_config("h144", layers=1, max_positions=160))
        ids, types = random_inputs(fast.config, 2, 150)
        compare(fast, hf, ids, make_mask("holes", 2, 150), types)
        expect_launches(launches, layers=1)

    def test_interpreter_case_fully_masked_row(launches):
        fast, hf = model_pair(make_config())
        ids, types = random_inputs(fast.config, 4, 9)
        mask = make_mask("fully_masked_row", 4, 9)
        ours = compare(fast, hf, ids, mask, types)
        assert torch.isfinite(ours.last_hidden_state).all() and (ours.last_hidden_state[-1] == 0).all()
        expect_launches(launches, layers=2)

    def test_interpreter_case_padded_equals_unpadded(launches):
        fast, _ = model_pair(make_config())
        ids, types = random_inputs(fast.config, 3, 10)
        mask = make_mask("right", 3, 10)
        with torch.no_grad():
            batch = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            for row in range(3):
                n = int(mask[row].sum())
                alone = fast(ids[row:row + 1, :n], token_type_ids=types[row:row + 1, :n]).last_hidden_state
                assert_close(batch[row, :n], alone[0], FP32_INTERPRETER, f"row {row} alone")
        expect_launches(launches, layers=2, forwards=4)

    def test_interpreter_case_direct_launches_equal_the_op_path(launches, monkeypatch):
        """A plain eager forward launches the kernels directly (no torch.library dispatch): one
        decision, for the encoder's fast path. Under a dispatch mode it goes through the ops. Same
        kernels, so the same numbers, bit for bit."""
        decisions = []
        original = backend.direct_launch
        monkeypatch.setattr(backend, "direct_launch", lambda *t: decisions.append(original(*t)) or decisions[-1])
        fast, _ = model_pair(make_config())
        ids, types = random_inputs(fast.config, 3, 10)
        mask = make_mask("holes", 3, 10)
        with torch.no_grad():
            direct = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            assert decisions == [True], decisions  # the encoder's fast path
            decisions.clear()
            with RecordFastbertOps() as record:
                through_ops = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert decisions == [False] * 9, decisions  # the encoder's check, then 2 layers x 4 ops
        assert record.names.count("fastbert.varlen_attention.default") == 2
        assert torch.equal(direct, through_ops)
        expect_launches(launches, layers=2, forwards=2)

    def test_interpreter_case_graph_runner_on_the_compact_attention_grid(launches, monkeypatch):
        """CUDAGraphRunner(compact_attention=True) (its static buffers, run eagerly here) launches the
        attention on the compact grid and gives the plain grid's output bit for bit (the same program
        on the same query blocks), and the eager model's; a bucket of 64 rows, 8 sequence slots."""
        from fastbert.cuda_graphs import CUDAGraphRunner
        from fastbert.kernels import attention as K

        grids, kernel = [], K._attention_fwd_kernel

        class Recorded:  # the kernel, recording each launch's grid
            def __getitem__(self, grid):
                grids.append(grid)
                return kernel[grid]

        monkeypatch.setattr(K, "_attention_fwd_kernel", Recorded())
        fast, _ = model_pair(make_config("h128", layers=2, max_positions=64))  # head dim 64
        ids, types = random_inputs(fast.config, 3, 13)
        mask = make_mask("holes", 3, 13)
        runners = [CUDAGraphRunner(fast, buckets=(64,), max_sequences=8, capture=False, compact_attention=compact)
                   for compact in (False, True)]
        with torch.no_grad():
            plain, compact = (runner(ids, mask, types).last_hidden_state for runner in runners)
            eager = fast(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        # Plain: (query blocks of 64 rows, 8 sequence slots + 1 padding piece, heads); compact: (programs, 1, heads).
        assert [grid[1] for grid in grids] == [9, 9, 1, 1, 3, 3], grids
        assert torch.equal(compact, plain)
        assert_close(compact, eager, FP32_INTERPRETER, "compact grid against the eager model")

    def test_interpreter_case_gradients_equal_transformers(launches):
        """Training (dropout 0): the Triton forward runs under autograd and the backward recomputes the
        reference; parameter gradients match transformers'."""
        fast, hf = model_pair(make_config(layers=2))
        fast.train(), hf.train()
        ids, types = random_inputs(fast.config, 3, 10)
        mask = make_mask("left", 3, 10)
        keep = mask.bool()[..., None]
        weight = torch.randn(3, 10, fast.config.hidden_size)
        for model in (fast, hf):
            out = model(ids, attention_mask=mask, token_type_ids=types)
            ((out.last_hidden_state * weight * keep).sum() + out.pooler_output[keep[:, 0, 0]].sum()).backward()
        expect_launches(launches, layers=2)
        assert_gradients_match(fast, hf)
