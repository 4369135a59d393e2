"""The ``fastbert`` command: embed equals sentence-transformers' pipeline; info reports."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from fastbert.cli import main
from tests.helpers import FP32_MODEL_RANDOM, assert_close, minilm_path, needs_cuda
from tests.test_checkpoint import SENTENCES

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def minilm_reference():
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    return lines, model.encode(lines, convert_to_numpy=True)


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_embed_equals_sentence_transformers(tmp_path, minilm_reference, batch_size):
    lines, expected = minilm_reference
    out = tmp_path / "e.npy"
    assert main(["embed", str(SENTENCES), "-o", str(out), "--batch-size", str(batch_size), "--quiet"]) == 0
    got = np.load(out)
    assert got.shape == expected.shape == (len(lines), 384)
    assert np.abs(got - expected).max() <= 1e-5


def test_embed_jsonl(tmp_path, minilm_reference):
    lines, expected = minilm_reference
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines[:5] + [""]) + "\n", encoding="utf-8")  # an empty line is a sentence too
    out = tmp_path / "e.jsonl"
    main(["embed", str(src), "-o", str(out), "--quiet"])
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == lines[:5] + [""]
    assert np.abs(np.array([r["embedding"] for r in rows[:5]]) - expected[:5]).max() <= 1e-5


def _random_st_dir(path, pooling, extra_modules=()):
    """A sentence-transformers directory around a small random BERT, with the given pooling."""
    from sentence_transformers import models

    from tests.model_utils import make_config, randomize_, word_piece_tokenizer

    config = make_config("h144", layers=2, vocab=30522, max_positions=512)
    import transformers

    bert = randomize_(transformers.BertModel(config))
    bert.save_pretrained(path / "bert")
    word_piece_tokenizer(path / "bert")
    word = models.Transformer(str(path / "bert"), max_seq_length=24)
    modules = [word, models.Pooling(144, pooling_mode=pooling), *extra_modules]
    model = st.SentenceTransformer(modules=modules, device="cpu")
    model.save(str(path / "st"))
    return path / "st"


@pytest.mark.parametrize("pooling", ["cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                     ("cls", "mean")])
def test_embed_pooling_modes_equal_sentence_transformers(tmp_path, pooling):
    model_dir = _random_st_dir(tmp_path, list(pooling) if isinstance(pooling, tuple) else pooling)
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[::4]
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(lines)
    out = tmp_path / "e.npy"
    main(["embed", str(SENTENCES), "-o", str(out), "--model", str(model_dir), "--quiet"])
    got = np.load(out)[::4]
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pooling", ["mean", "mean_sqrt_len_tokens", "weightedmean"])
def test_half_precision_pooling_accumulates_in_fp32(pooling, dtype):
    """`fastbert embed --dtype float16/bfloat16` pools sums of hundreds of tokens: accumulated in the
    16-bit dtype they overflow fp16 (65504) and lose bf16's 8 bits, so the pooling sums in fp32 and
    rounds once. Two sequences of 300 and 5 tokens, every value 300 (sums of 90000 and 1500)."""
    from fastbert.embed import _segment_pool

    hidden = torch.full((305, 4), 300.0, dtype=dtype)
    cu_seqlens = torch.tensor([0, 300, 305], dtype=torch.int32)
    pooled = _segment_pool(hidden, cu_seqlens, [pooling])
    expected = torch.tensor([[300.0], [300.0]])
    if pooling == "mean_sqrt_len_tokens":  # the sum over the square root of the length
        expected = torch.tensor([[90000 / 300**0.5], [1500 / 5**0.5]])
    assert pooled.dtype == dtype and torch.isfinite(pooled).all()
    assert_close(pooled.float(), expected.expand(2, 4), float(2**-7 * expected.max()), f"{pooling} {dtype}")


@needs_cuda
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_on_cuda_equals_sentence_transformers_on_cuda(tmp_path, pooling):
    """The packed pipeline on the fused kernels (fp32) against sentence-transformers on the same GPU."""
    model_dir = _random_st_dir(tmp_path, pooling)
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    expected = st.SentenceTransformer(str(model_dir), device="cuda").encode(lines)
    out = tmp_path / "e.npy"
    assert main(["embed", str(SENTENCES), "-o", str(out), "--model", str(model_dir), "--device", "cuda",
                 "--quiet"]) == 0
    assert np.abs(np.load(out) - expected).max() <= FP32_MODEL_RANDOM


def test_embed_other_pipelines_run_through_sentence_transformers(tmp_path):
    """A Dense module is not part of the packed pipeline: sentence-transformers runs it, on fastbert."""
    from sentence_transformers import models

    torch.manual_seed(3)
    model_dir = _random_st_dir(tmp_path, "mean", [models.Dense(144, 32)])
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()[:10]
    expected = st.SentenceTransformer(str(model_dir), device="cpu").encode(lines)
    from fastbert.embed import SentenceEmbedder

    embedder = SentenceEmbedder(model_dir, device="cpu")
    assert embedder.st_model is not None
    import fastbert

    assert isinstance(embedder.st_model[0].auto_model, fastbert.BertModel)
    assert np.abs(embedder.encode(lines) - expected).max() <= 1e-5


def test_embed_rejects_unknown_output_format(tmp_path):
    with pytest.raises(SystemExit, match="must end in .npy or .jsonl"):
        main(["embed", str(SENTENCES), "-o", str(tmp_path / "e.csv")])


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fastbert.cli", "info"], capture_output=True, text=True,
                         check=True).stdout
    for expected in ("torch", "transformers", "FASTBERT_BACKEND", "op attention", "op embeddings",
                     "op bias_activation", "op bias_residual_layer_norm", "CUDA extension"):
        assert expected in out, out
    assert re.search(r"encoder eager fast path +cpu: off", out), out  # the CPU runs PyTorch's ops


# --- user errors: one line naming the problem, before the model loads ---------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Checks of the arguments come before the model loads: loading one here fails the test."""
    import fastbert.embed

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(fastbert.embed, "SentenceEmbedder", refuse)


def _user_error_args(tmp_path, case, monkeypatch):
    good_in, out = str(SENTENCES), str(tmp_path / "e.npy")
    if case == "missing input":
        return [str(tmp_path / "missing.txt"), "-o", out], r"cannot read input '.*missing\.txt': No such file"
    if case == "directory input":
        return [str(tmp_path), "-o", out], "is a directory, not a text file"
    if case == "non-UTF-8 input":
        (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
        return [str(tmp_path / "latin1.txt"), "-o", out], r"latin1\.txt is not UTF-8 text"
    if case == "bogus device":
        return [good_in, "-o", out, "--device", "bogus"], "unknown device 'bogus'"
    if case == "cuda without a GPU":
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        return [good_in, "-o", out, "--device", "cuda"], "device 'cuda': no CUDA device is available"
    if case == "missing model folder":
        return [good_in, "-o", out, "--model", str(tmp_path / "nomodel")], r"model directory '.*nomodel' does not exist"
    if case == "hub id":
        return [good_in, "-o", out, "--model", "sentence-transformers/all-MiniLM-L6-v2"], \
            "model directory 'sentence-transformers/all-MiniLM-L6-v2' does not exist"
    if case == "output directory missing":
        return [good_in, "-o", str(tmp_path / "nodir" / "out.npy")], r"the output's directory '.*nodir' does not exist"
    if case in ("bogus backend", "bogus GEMM"):
        variable = "FASTBERT_BACKEND" if case == "bogus backend" else "FASTBERT_GEMM"
        monkeypatch.setenv(variable, "bogus")
        return [good_in, "-o", out], f"{variable}='bogus' is not one of"
    if case == "Triton backend on a CPU":
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return [good_in, "-o", out, "--device", "cpu"], \
            "FASTBERT_BACKEND=triton on cpu tensors needs TRITON_INTERPRET=1"
    if case == "output's directory is a file":
        return [good_in, "-o", str(SENTENCES / "out.npy")], r"the output's directory '.*sentences\.txt' is a file"
    if case == "output is a directory":
        (tmp_path / "d.npy").mkdir()
        return [good_in, "-o", str(tmp_path / "d.npy")], "is a directory"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing input", "directory input", "non-UTF-8 input", "bogus device",
                                  "cuda without a GPU", "missing model folder", "hub id",
                                  "output directory missing", "output is a directory", "output's directory is a file",
                                  "bogus backend", "bogus GEMM",
                                  "Triton backend on a CPU"])
def test_embed_user_errors_are_named_before_loading(tmp_path, no_model_load, monkeypatch, case):
    args, message = _user_error_args(tmp_path, case, monkeypatch)
    with pytest.raises(SystemExit, match="^fastbert embed: .*" + message):
        main(["embed", *args])


def _broken_copy(tmp_path, breakage):
    """The embedded MiniLM folder as links to its files, with one thing broken."""
    source, folder = Path(minilm_path()), tmp_path / "model"
    folder.mkdir()
    for entry in source.iterdir():
        (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    if breakage == "no weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "no pooling folder":
        (folder / "1_Pooling").unlink()
    elif breakage == "corrupt weights":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").write_bytes(b"junk")
    else:  # modules.json not JSON
        (folder / "modules.json").unlink()
        (folder / "modules.json").write_text("{bad")
    return folder


@pytest.mark.parametrize("breakage, message", [
    ("no weights", r"cannot load the model in '.*model': OSError: .*no file named model.safetensors"),
    ("no pooling folder", r"cannot load the model in '.*model': FileNotFoundError: .*1_Pooling/config.json"),
    ("corrupt weights", r"cannot load the model in '.*model': SafetensorError: "),
    ("modules.json not JSON", r".*model/modules.json is not valid JSON \(.* at line 1, column 2\)")])
def test_embed_names_a_broken_model_folder(tmp_path, breakage, message):
    """A model folder that passes the first checks but lacks a file or holds a corrupt one: one line
    naming the folder (or the file) and the error, no traceback."""
    folder = _broken_copy(tmp_path, breakage)
    with pytest.raises(SystemExit, match="^fastbert embed: " + message):
        main(["embed", str(SENTENCES), "-o", str(tmp_path / "e.npy"), "--model", str(folder), "--quiet"])


def test_embed_user_error_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastbert.cli", "embed", str(tmp_path / "missing.txt"),
                             "-o", str(tmp_path / "e.npy")], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fastbert embed: cannot read input '{tmp_path / 'missing.txt'}': No such file or directory"]


@pytest.mark.parametrize("pipeline", [False, True], ids=["transformers", "sentence-transformers"])
def test_embed_names_a_model_of_another_type(tmp_path, pipeline):
    """A DistilBERT folder (sentence-transformers embeds it; fastbert runs BERT only): one line that
    names the model type, not a traceback."""
    model_dir = tmp_path / "distilbert"
    transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(model_dir)
    if pipeline:
        (model_dir / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    src = tmp_path / "in.txt"
    src.write_text("hello\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "fastbert.cli", "embed", str(src), "-o", str(tmp_path / "e.npy"),
                             "--model", str(model_dir), "--quiet", "--device", "cpu"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    if pipeline:  # a pipeline sentence-transformers runs, on fastbert's encoder (none here)
        assert last == ("fastbert embed: fastbert.optimize found no transformers BertModel inside SentenceTransformer; "
                        "it holds DistilBertModel (model_type 'distilbert'): fastbert runs BERT (model_type 'bert') "
                        "only"), result.stderr
    else:
        assert last == (f"fastbert embed: {model_dir} holds a 'distilbert' model; fastbert.BertModel loads BERT "
                        "checkpoints (model_type 'bert') only"), result.stderr


# --- input lines, empty input, --quiet, --dtype ------------------------------------------------------

def test_embed_one_embedding_per_newline(tmp_path):
    """Form feeds, \\x85, \\u2028 ... inside a line do not split it (str.splitlines() did: 7 lines -> 14)."""
    minilm_path()  # the default model: skips where its package is not installed (the GPU image)
    src = tmp_path / "in.txt"
    texts = ["first line", "second\u2028half", "page\x0cbreak", "nel\x85here", "vt\x0bx", "fs\x1cgs\x1drs\x1e", "last"]
    src.write_bytes(("\ufeff" + "\r\n".join(texts) + "\r\n").encode("utf-8"))
    out = tmp_path / "e.jsonl"
    main(["embed", str(src), "-o", str(out), "--quiet"])
    assert [json.loads(x)["text"] for x in out.read_text(encoding="utf-8").split("\n")[:-1]] == texts


@pytest.mark.parametrize("fallback", [False, True], ids=["packed", "sentence-transformers"])
def test_embed_empty_input(tmp_path, capsys, fallback):
    minilm_path()  # the default model: skips where its package is not installed (the GPU image)
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    args = []
    if fallback:
        from tests.test_embed_edge_cases import minilm_copy

        args = ["--model", str(minilm_copy(tmp_path / "m", {"tokenizer_args": {"model_max_length": 8}}))]
    assert main(["embed", str(src), "-o", str(tmp_path / "e.npy"), "--quiet", *args]) == 0
    assert np.load(tmp_path / "e.npy").shape == (0, 384)
    assert main(["embed", str(src), "-o", str(tmp_path / "e.jsonl"), "--quiet", *args]) == 0
    assert (tmp_path / "e.jsonl").read_text() == ""
    assert "0 embeddings of dimension 384" in capsys.readouterr().err


def test_embed_quiet_silences_the_loading_bar(tmp_path, capfd):
    minilm_path()  # the default model: skips where its package is not installed (the GPU image)
    from transformers.utils import logging as hf_logging

    lines = tmp_path / "in.txt"
    lines.write_text("one sentence\n", encoding="utf-8")
    assert hf_logging.is_progress_bar_enabled()
    main(["embed", str(lines), "-o", str(tmp_path / "e.npy")])
    assert "Loading weights" in capfd.readouterr().err  # the bar that --quiet must silence is there
    main(["embed", str(lines), "-o", str(tmp_path / "e.npy"), "--quiet"])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Batches" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


def test_quiet_restores_each_progress_bar_switch_on_its_own():
    """transformers' switch turns huggingface_hub's too: with transformers' bar off and hub's on
    before, hub's was left off after a quiet run."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    from fastbert.embed import _progress_bars

    try:
        for transformers_on, hub_on in ((False, True), (True, False), (False, False), (True, True)):
            (hf_logging.enable_progress_bar if transformers_on else hf_logging.disable_progress_bar)()
            (hub_utils.enable_progress_bars if hub_on else hub_utils.disable_progress_bars)()
            with _progress_bars(False):
                assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.is_progress_bar_enabled() == transformers_on
            assert hub_utils.are_progress_bars_disabled() == (not hub_on), (transformers_on, hub_on)
    finally:
        hf_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()


def test_embed_dtype_auto(tmp_path, capsys):
    from tests.test_embed_edge_cases import _fp16_st_dir

    model_dir = _fp16_st_dir(tmp_path)
    main(["embed", str(SENTENCES), "-o", str(tmp_path / "e.npy"), "--model", str(model_dir), "--quiet"])
    assert "float32" in capsys.readouterr().err  # the default, whatever the checkpoint holds
    main(["embed", str(SENTENCES), "-o", str(tmp_path / "e.npy"), "--model", str(model_dir), "--quiet",
          "--dtype", "auto"])
    assert "float16" in capsys.readouterr().err


# --- info and the demo ---------------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["FASTBERT_BACKEND", "FASTBERT_GEMM"])
def test_info_reports_an_invalid_setting(monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, "bogus")
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^{variable} +error: {variable}='bogus' is not one of", out, re.MULTILINE), out
    assert "op attention" in out  # the rest of the report is still there


def test_info_reports_a_backend_that_cannot_run_here(monkeypatch, capsys):
    """FASTBERT_BACKEND=triton where a model would run on the CPU without the interpreter: every job
    would fail at its first op, so info says so (it listed every op as triton and exited 0)."""
    if torch.cuda.is_available():
        pytest.skip("a model runs on the GPU here, where the setting is valid")
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FASTBERT_BACKEND +error: FASTBERT_BACKEND=triton on cpu tensors needs TRITON_INTERPRET=1",
                     out, re.MULTILINE), out


def test_demo_runs_from_another_directory(tmp_path, monkeypatch):
    """The default input is the repository's, not the current directory's; the demo checks the 1e-5
    of the README (the throughput part is left out here: it is slow on a CPU)."""
    minilm_path()  # the default model: skips where its package is not installed (the GPU image)
    import fastbert.demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fastbert.demo, "_throughput", lambda encode, lines, repeats: 1.0)
    assert fastbert.demo.TOLERANCE == 1e-5
    assert fastbert.demo.main(["-o", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (len(SENTENCES.read_text(encoding="utf-8").splitlines()), 384)


def test_demo_names_a_missing_input(tmp_path):
    import fastbert.demo

    with pytest.raises(SystemExit, match=r"fastbert demo: input '.*nothere\.txt' is not a file"):
        fastbert.demo.main([str(tmp_path / "nothere.txt")])


@pytest.mark.parametrize("case, message", [
    ("empty input", r"input '.*empty\.txt' has no lines to embed and compare"),
    ("no timed pass", r"--repeats 0: time at least one pass"),
    ("jsonl output", r"output '.*e\.jsonl' must end in \.npy \(the demo reads it back\)"),
    ("csv output in a new folder", r"output '.*e\.csv' must end in \.npy")])
def test_demo_names_bad_arguments_before_embedding(tmp_path, monkeypatch, case, message):
    """Named before anything runs (no embed call, no folder made), where they were a ZeroDivisionError,
    a NumPy broadcast error, an unpicklable read-back after the embed had run."""
    import fastbert.cli
    import fastbert.demo

    monkeypatch.setattr(fastbert.cli, "main", lambda argv: pytest.fail("the demo embedded before checking"))
    (tmp_path / "empty.txt").write_text("")
    args = {"empty input": [str(tmp_path / "empty.txt")], "no timed pass": ["--repeats", "0"],
            "jsonl output": ["-o", str(tmp_path / "e.jsonl")],
            "csv output in a new folder": ["-o", str(tmp_path / "new" / "e.csv")]}[case]
    with pytest.raises(SystemExit, match="^fastbert demo: " + message):
        fastbert.demo.main(args)
    assert not (tmp_path / "new").exists()
