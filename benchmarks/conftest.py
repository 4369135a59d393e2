"""Shared machinery of the benchmark suite (`pytest benchmarks/ --benchmark-only`).

Every timed case records its median into one table; the table, with the ratios between
implementations measured side by side and the device's matmul peak measured in the same run, is
written after every case (a run stopped at its time limit keeps what it measured) to
``$FASTBERT_BENCH_JSON`` (default: ``$OUT/results.json`` when ``OUT`` is
set, else ``build/bench/results.json``). ``benchmarks/report.py`` turns it into RESULTS.md's table
and a plot.

``FASTBERT_BENCH_SMOKE=1`` (smoke mode): cases run on the CPU at tiny sizes, 3 rounds after 1 warmup,
torch.compile peers through ``aot_eager``; it proves the suite's wiring before a GPU runs it, not speed.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.report import add_ratios
from fastbert.cuda_graphs import capture_graph

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOKE = os.environ.get("FASTBERT_BENCH_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
# The torch.compile peers specialize to every shape and dtype (dynamic=False): past dynamo's default
# of 8 graphs per function they would silently run eager and be timed as torch.compile. Fail instead.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.fail_on_recompile_limit_hit = True

_RESULTS: list[dict] = []
_CONTEXT: dict = {}


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: no CUDA device on this machine")


def device_or_skip() -> str:
    """The device a kernel microbenchmark runs on: the CPU in smoke mode, else CUDA (or the case skips)."""
    if not SMOKE:
        cuda_or_skip()
    return DEVICE


def triton_or_skip() -> None:
    """Skip a Triton case whose kernel cannot run here: no triton, or CPU tensors without the interpreter."""
    from fastbert.ops import backend

    if not backend.triton_available():
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and not backend.triton_interpreter():
        pytest.skip("smoke mode: Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")


def compile_peer(fn):
    """The torch.compile peer of ``fn``: one graph per benchmark shape (its fastest form); in smoke mode
    dynamo's capture through ``aot_eager``, without inductor's minutes of CPU codegen."""
    if SMOKE:
        return torch.compile(fn, backend="aot_eager")
    return torch.compile(fn, dynamic=False)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(benchmark, fn, rounds: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (synchronized with the GPU when there is one)."""
    if SMOKE:  # the wiring, not the speed: a few rounds
        rounds, warmup = min(rounds, 3), min(warmup, 1)

    def call():
        out = fn()
        sync()
        return out

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    return benchmark.stats.stats.median


def timed_kernel(benchmark, build, bytes_per_call: int, rounds: int = 20, warmup: int = 3) -> float:
    """Median device seconds per call of one kernel (or one peer's kernels), for the microbenchmarks.

    ``build(seed)`` returns a zero-argument call on inputs of its own. On a GPU there are enough input
    sets to fill twice the L2 (each call reads cold memory, as inside a model; one set re-read would
    measure the cache), and at least 8 calls are captured back to back in one CUDA graph whose
    replays are timed by CUDA events (``timed_replays``): device time. A single small kernel timed from
    the host would measure its launch and the synchronization instead (a 10 us kernel behind 20-50 us
    of host work). In smoke mode the calls run eagerly.
    """
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() else 0
    sets = max(1, min(32, -(-2 * l2 // max(1, bytes_per_call))))
    calls = [build(seed) for seed in range(sets)]
    if not torch.cuda.is_available():
        return timed(benchmark, lambda: [call() for call in calls], rounds, warmup) / len(calls)
    calls = (calls * 8)[:max(8, len(calls))]
    graph, _ = capture_graph(lambda: [call() for call in calls], warmup=1)
    return timed_replays(benchmark, graph.replay, rounds, warmup) / len(calls)


def timed_replays(benchmark, replay, rounds: int = 20, warmup: int = 3, round_seconds: float = 1e-3) -> float:
    """Median device seconds of one ``replay()`` (a CUDA graph's): each round is CUDA events around as
    many back-to-back replays as fill ``round_seconds``, so the host's launch and synchronization
    (about 10 us, a tenth of a 4096-token kernel's replay) stay out of the figure, as METHOD.md asks."""
    for _ in range(warmup):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replay()
    end.record()
    end.synchronize()
    reps = max(1, min(1000, int(round_seconds / max(start.elapsed_time(end) / 1e3, 1e-7)) + 1))
    samples = []

    def one_round():
        start.record()
        for _ in range(reps):
            replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / reps)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return statistics.median(samples)


@pytest.fixture(scope="session")
def matmul_peak_tflops() -> float | None:
    """The device's bf16 matmul peak, measured by a large GEMM in this run (the roofline)."""
    if not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / 10)
    peak = 2 * n**3 / best / 1e12
    _CONTEXT["matmul_peak_tflops_bf16"] = peak
    return peak


@pytest.fixture(scope="session")
def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth measured in this run (read + write bytes per second)."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    end.synchronize()
    gbs = 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3) / 1e9
    _CONTEXT["copy_bandwidth_gbs"] = gbs
    return gbs


@pytest.fixture
def record():
    """``record(case=..., impl=..., seconds=..., **extra)``: one row of the results table."""

    def add(**row):
        _RESULTS.append(row)
        _write_results()

    return add


@functools.cache
def _environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for module in ("triton", "transformers"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        env["gpu_uuid"] = str(getattr(props, "uuid", "unknown"))  # one machine from another of the same kind
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["device"] = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return env


def _write_results() -> None:
    add_ratios(_RESULTS)
    default = Path(os.environ["OUT"]) / "results.json" if os.environ.get("OUT") else Path("build/bench/results.json")
    path = Path(os.environ.get("FASTBERT_BENCH_JSON", default))
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": {**_environment(), **_CONTEXT}, "results": _RESULTS}
    # Written whole, then renamed: a run killed at its time limit never leaves half a file.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(path)


def pytest_sessionfinish(session, exitstatus):
    if _RESULTS:
        _write_results()
