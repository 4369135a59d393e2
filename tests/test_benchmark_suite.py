"""The GPU model suite's wiring, proven on the CPU before a GPU session spends its minutes on it.

``FASTBERT_BENCH_SMOKE=1`` runs benchmarks/bench_model.py with a tiny fp32 model on the CPU (every
peer but CUDA graphs and max-autotune, torch.compile of transformers and of fastbert through
``aot_eager``): models built, fastbert
checked against the fp32 reference, every case timed and recorded, ratios computed, results.json
written, and benchmarks/report.py turns it into the table and the plot. benchmarks/bench_embed.py
runs beside it (a small random pipeline). No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PEERS = {"transformers-eager", "transformers-sdpa", "torch.compile", "module-path"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    # Not PYTEST_XDIST_WORKER & co: under xdist, pytest-benchmark would see them and refuse to time.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "TRITON_INTERPRET"}
    env.update(FASTBERT_BENCH_SMOKE="1", FASTBERT_BENCH_JSON=str(out))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_model.py", "benchmarks/bench_embed.py", "--benchmark-only",
         "-q", "-rs",
         "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "CUDA graphs and max-autotune need a GPU" in output  # the skips say why
    return out, json.loads(out.read_text())


def test_every_case_is_timed_against_every_peer(smoke_results):
    _, payload = smoke_results
    rows = [row for row in payload["results"] if not row["case"].startswith("embed ")]
    cases = {row["case"] for row in rows}
    assert cases == {"tiny fp32 8x128", "tiny fp32 varlen16x512"}
    for case in cases:
        impls = {row["impl"]: row for row in rows if row["case"] == case}
        compiled = {"fastbert+torch.compile"} if case == "tiny fp32 varlen16x512" else set()  # headline only
        assert set(impls) == PEERS | {"fastbert", "fastbert+triton-gemm", "fastbert+cublas"} | compiled, case
        ours = impls["fastbert"]
        assert set(ours["speedup"]) == PEERS
        for peer in PEERS:
            expected = impls[peer]["seconds"] / ours["seconds"]
            assert ours["speedup"][peer] == pytest.approx(expected)
        assert ours["seconds"] > 0 and ours["tokens_per_s"] == pytest.approx(ours["tokens"] / ours["seconds"])
        assert ours["roofline_fraction"] is None  # no GPU: no measured matmul peak
    dense = next(row for row in rows if row["case"] == "tiny fp32 8x128")
    assert dense["tokens"] == dense["padded_tokens"] == 8 * 128
    varlen = next(row for row in rows if row["case"] == "tiny fp32 varlen16x512")
    assert varlen["tokens"] < varlen["padded_tokens"] <= 16 * 512
    assert payload["environment"]["device"].startswith("cpu")


def test_embed_job_is_timed_against_transformers(smoke_results):
    """bench_embed.py: the embed job through graphs (captured before the rounds, and in each), and
    eagerly, each against both transformers peers."""
    from fastbert.embed import read_lines
    from tests.test_checkpoint import SENTENCES

    _, payload = smoke_results
    rows = {row["impl"]: row for row in payload["results"] if row["case"].startswith("embed ")}
    assert set(rows) == {"fastbert", "fastbert+capture", "fastbert+eager", "transformers-sdpa", "transformers-eager"}
    for impl in ("fastbert", "fastbert+capture", "fastbert+eager"):
        ours = rows[impl]
        assert ours["speedup"] == {peer: pytest.approx(rows[peer]["seconds"] / ours["seconds"])
                                   for peer in ("transformers-sdpa", "transformers-eager")}
        assert ours["sentences"] % len(read_lines(str(SENTENCES))) == 0  # the sentence set, repeated
        assert ours["sentences_per_s"] == pytest.approx(ours["sentences"] / ours["seconds"])
    assert rows["fastbert"]["graph_buckets"] and rows["fastbert+eager"]["graph_buckets"] is None


def test_report_makes_the_table_and_the_plot(smoke_results, tmp_path):
    path, _ = smoke_results
    table, png = tmp_path / "table.md", tmp_path / "plot.png"
    args = [sys.executable, "benchmarks/report.py", str(path), "--markdown", str(table)]
    if _has_matplotlib():
        args += ["--plot", str(png)]
    subprocess.run(args, cwd=ROOT, check=True, timeout=120)
    text = table.read_text()
    assert "| tiny fp32 varlen16x512 | fastbert |" in text
    assert "vs transformers-eager" in text and "vs torch.compile" in text
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_report_merges_runs_and_refuses_other_devices():
    from benchmarks.report import merge

    env = {"device": "NVIDIA H100", "gpu_uuid": "GPU-1", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}

    def run(date, rows, **changes):
        return {"environment": dict(env, date=date, **changes), "results": rows}

    a = [{"case": "x", "impl": "fastbert", "seconds": 1.0}, {"case": "y", "impl": "fastbert", "seconds": 2.0}]
    b = [{"case": "y", "impl": "fastbert", "seconds": 3.0}, {"case": "z", "impl": "fastbert", "seconds": 4.0}]
    # A later call measures a peer of case x (max-autotune, say): its ratio is against the earlier fastbert row.
    b.append({"case": "x", "impl": "torch.compile-max-autotune", "seconds": 1.5})
    merged = merge([run("d1", a), run("d2", b)])
    assert [(r["case"], r["impl"], r["seconds"]) for r in merged["results"]] == [
        ("x", "fastbert", 1.0), ("y", "fastbert", 3.0), ("z", "fastbert", 4.0), ("x", "torch.compile-max-autotune", 1.5)]
    assert merged["results"][0]["speedup"] == {"torch.compile-max-autotune": 1.5}
    assert merged["results"][1]["speedup"] == {}
    assert merged["environment"]["date"] == "d1 .. d2"
    with pytest.raises(SystemExit, match="device"):
        merge([run("d1", a), run("d2", b, device="NVIDIA H200")])
    with pytest.raises(SystemExit, match="gpu_uuid"):  # another machine of the same kind
        merge([run("d1", a, gpu_uuid="GPU-1"), run("d2", b, gpu_uuid="GPU-2")])
    # The ceilings come from whichever run measured them (the kernel call's copy bandwidth, say).
    ceilings = merge([run("d1", a, matmul_peak_tflops_bf16=800.0), run("d2", b, copy_bandwidth_gbs=4100.0,
                                                                       matmul_peak_tflops_bf16=790.0)])["environment"]
    assert (ceilings["matmul_peak_tflops_bf16"], ceilings["copy_bandwidth_gbs"]) == (800.0, 4100.0)
    assert ceilings["matmul_peak_tflops_bf16, each run"] == "800.0, 790.0"  # each row's fraction is its run's
    assert "copy_bandwidth_gbs, each run" not in ceilings
    # Runs that record no GPU UUID (older ones): nothing shows one machine made them, unless the caller says so.
    with pytest.raises(SystemExit, match=r"run\(s\) 2 record no gpu_uuid"):
        merge([run("d1", a), run("d2", b, gpu_uuid=None)])
    assert len(merge([run("d1", a, gpu_uuid=None), run("d2", b, gpu_uuid=None)], same_machine=True)["results"]) == 4
    cpu = dict(device="cpu: x86_64, 2 threads", gpu_uuid=None)
    assert len(merge([run("d1", a, **cpu), run("d2", b, **cpu)])["results"]) == 4


def test_report_times_and_a_missing_matplotlib(tmp_path, monkeypatch):
    """A kernel's few microseconds keep three digits (0.002 and 0.003 ms told 2.0 from 2.8 us apart
    no more); --plot without matplotlib says so in one line."""
    import builtins

    from benchmarks import report

    payload = {"environment": {"device": "cpu"}, "results": [
        {"case": "k", "impl": "fastbert", "seconds": 2.03e-6, "speedup": {"torch": 1.5}},
        {"case": "m", "impl": "fastbert", "seconds": 1.9374e-3, "speedup": {"torch": 2.0}}]}
    table = report.markdown(payload)
    assert "| k | fastbert | 0.00203 |" in table and "| m | fastbert | 1.937 |" in table
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        report.plot(payload, tmp_path / "p.png")


def test_profile_model_smoke(tmp_path):
    """benchmarks/profile_model.py (run in a GPU session) on a tiny model on the CPU: it writes one
    profiler table per shape, with the forward's operators in it, then one of each graph runner's call."""
    from benchmarks.profile_model import main

    assert main(["--tiny", "--out", str(tmp_path), "--rows", "10"]) == 0
    report = (tmp_path / "profile.txt").read_text()
    assert report.startswith("## 4x16, 3 forwards")
    assert "## PaddedCUDAGraphRunner 1x16, every token real, 3 calls" in report
    assert "## CUDAGraphRunner 1x16, every token real, 3 calls" in report
    assert "device kernels per call: 0;" in report  # no GPU: the runner ran eagerly, on the CPU
    assert report.count("aten::") >= 2


def test_profile_model_reads_clocks_or_says_why(monkeypatch):
    """The replay profile's clock reading: nvidia-smi's line, or why there is none (never a raise)."""
    import subprocess

    from benchmarks import profile_model

    def fake_run(argv, **kwargs):
        assert argv[0] == "nvidia-smi" and argv[-2:] == ["-i", "3"]
        return subprocess.CompletedProcess(argv, 0, "1980 MHz, 1980 MHz, 650.1 W, 61\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert profile_model.sm_clock(3) == "1980 MHz, 1980 MHz, 650.1 W, 61"

    def missing(argv, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert profile_model.sm_clock(0).startswith("(nvidia-smi: ")
