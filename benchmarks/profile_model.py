"""Where one forward's time goes: torch.profiler over eager fastbert (BERT-base, random weights),
one table per batch shape of the self device time per kernel (or self CPU time without a GPU).

The H200 run of 2026-11-26 left two questions that timings of whole forwards cannot answer: at
32x512 fastbert reached 41% of the matmul peak (how much of 9.4 ms is GEMMs, attention, the
memory-bound kernels?), and the eager path at 32x128 took 7.6 ms against 2.6 ms replayed (which
host-side work, which syncs?). This prints both views.

    python benchmarks/profile_model.py                   # GPU: bf16, 32x128 and 32x512 eager, then
                                                         # 1x128, 32x128 and 32x512 through
                                                         # PaddedCUDAGraphRunner, 1x128 through
                                                         # CUDAGraphRunner
    python benchmarks/profile_model.py --tiny --out DIR  # CPU: a 2-layer model, fp32 (a smoke run)
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from fastbert.cuda_graphs import CUDAGraphRunner, PaddedCUDAGraphRunner
from fastbert.optimize import to_fastbert

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def model_for(tiny: bool, device: str, dtype: torch.dtype):
    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **(TINY if tiny else BASE))
    torch.manual_seed(0)
    hf = transformers.AutoModel.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()
    return to_fastbert(hf)


def profile_shape(model, batch: int, seqlen: int, device: str, rows: int) -> str:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seqlen), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[batch // 2:, seqlen * 3 // 4:] = 0  # half the rows padded by a quarter: the unpadding runs
    cuda = device == "cuda"
    with torch.inference_mode():
        for _ in range(3):  # warm-up: Triton compilation, cuBLAS handles, the fused QKV weight
            model(ids, attention_mask=mask)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                model(ids, attention_mask=mask)
            if cuda:
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    header = f"## {batch}x{seqlen}, 3 forwards, sorted by {sort}\n"
    by_device = prof.key_averages().table(sort_by=sort, row_limit=rows)
    by_host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows) if cuda else ""
    return header + by_device + ("\n### by host time\n" + by_host if by_host else "") + "\n"


def profile_replay(model, batch: int, seqlen: int, device: str, rows: int,
                   runner_class=PaddedCUDAGraphRunner) -> str:
    """The same view of a graph runner's call (``PaddedCUDAGraphRunner``, or ``CUDAGraphRunner``) on a
    batch with every token real (its graph replay, the work around it and the read-back): which
    kernels a call runs, how many, and each one's device time. Where 1x128's replayed time goes (0.62 ms
    on the H200 against a target of 0.25 ms). ``CUDAGraphRunner``'s attention launches a program per
    (query block of its static ``max_seqlen``, sequence slot of its ``max_sequences`` capacity, head),
    most of which find no query and return at once: its profile says what they cost. Without a GPU the
    runner runs the same work eagerly."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seqlen), generator=gen).to(device)
    mask = torch.ones_like(ids)
    runner = runner_class(model)
    cuda = device == "cuda"
    for _ in range(3):  # capture, then warm replays
        runner(ids, attention_mask=mask)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    calls = 3
    with profile(activities=activities) as prof:
        for _ in range(calls):
            runner(ids, attention_mask=mask)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / calls / 1000 if kernels else 0.0
    header = (f"## {runner_class.__name__} {batch}x{seqlen}, every token real, {calls} calls, sorted by {sort}\n"
              f"device kernels per call: {len(kernels) / calls:.0f}; their summed device time per call: {busy:.3f} ms\n")
    if cuda:
        header += wall_time(lambda: runner(ids, attention_mask=mask), busy)
    return header + prof.key_averages().table(sort_by=sort, row_limit=rows) + "\n"


def wall_time(call, busy_ms: float, calls: int = 50) -> str:
    """Wall time per call, back to back between two events, beside the kernels' summed device time
    and the SM clock before and after. The H200 run of 2026-11-26 timed 32x512 at 7.35 ms a call in
    the benchmark while the profile's kernels summed to ~5.9 ms a forward: launch gaps, or clocks
    lowered under sustained load? This line says which, in one process."""
    index = torch.cuda.current_device()
    clocks = [sm_clock(index)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    clocks.append(sm_clock(index))
    per_call = start.elapsed_time(end) / calls
    return (f"back to back: {per_call:.3f} ms a call ({per_call - busy_ms:+.3f} ms beside the kernels' sum); "
            f"SM clock before / after: {clocks[0]} / {clocks[1]}\n")


def sm_clock(index: int) -> str:
    """GPU ``index``'s current and maximum SM clock, power draw and temperature from nvidia-smi
    (read-only), or why not."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader", "-i", str(index)],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"(nvidia-smi: {error})"
    return out.stdout.strip() or f"(nvidia-smi: {out.stderr.strip()})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer fp32 model (CPU smoke run)")
    parser.add_argument("--out", type=Path, help="also write profile.txt here")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and not args.tiny else torch.float32
    model = model_for(args.tiny, device, dtype)
    shapes = [(4, 16)] if args.tiny else [(32, 128), (32, 512)]
    report = "".join(profile_shape(model, b, s, device, args.rows) for b, s in shapes)
    replays = [(1, 16)] if args.tiny else [(1, 128), (32, 128), (32, 512)]
    report += "".join(profile_replay(model, b, s, device, args.rows) for b, s in replays)
    report += profile_replay(model, *replays[0], device, args.rows, CUDAGraphRunner)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
