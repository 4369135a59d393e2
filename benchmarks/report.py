"""results.json (from `pytest benchmarks/ --benchmark-only`) -> a markdown table and a PNG plot.

    python benchmarks/report.py build/bench/results.json --markdown benchmarks/RESULTS.md --plot benchmarks/results.png
    python benchmarks/report.py call1/results.json call2/results.json --markdown table.md   # several GPU calls

The markdown holds the environment (device, driver, versions, date, command) and one row per case:
fastbert's median time, tokens/s, TFLOP/s and fraction of the measured matmul peak, and its speedup
over each peer measured in the same run. The plot shows the speedups per case and peer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMAND = "benchmarks/run_gpu.sh bench  (pytest benchmarks/ --benchmark-only)"


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _ms(seconds: float) -> str:
    """Milliseconds to the microsecond, and a kernel's few microseconds to three digits (0.00203)."""
    ms = seconds * 1e3
    return format(ms, ".3f" if ms >= 1 else ".3g")


def markdown(payload: dict, command: str = COMMAND) -> str:
    env, rows = payload["environment"], payload["results"]
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += [f"| command | `{command}` |", ""]
    peers = sorted({impl for row in rows if "speedup" in row for impl in row["speedup"]})
    # Memory-bound kernels carry the fraction of the copy bandwidth measured in the same run.
    copy = any(row.get("copy_fraction") is not None for row in rows)
    header = (["case", "fastbert impl", "median ms", "tokens/s", "TFLOP/s", "of matmul peak"]
              + ["of copy bandwidth"] * copy + [f"vs {p}" for p in peers])
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        if "speedup" not in row:
            continue
        cells = [row["case"], row["impl"], _ms(row["seconds"]), _fmt(row.get("tokens_per_s"), ".0f"),
                 _fmt(row.get("tflops"), ".1f"), _fmt(row.get("roofline_fraction") and 100 * row["roofline_fraction"], ".0f")
                 + ("%" if row.get("roofline_fraction") else "")]
        if copy:
            fraction = row.get("copy_fraction")
            cells.append(_fmt(fraction and 100 * fraction, ".0f") + ("%" if fraction else ""))
        cells += [_fmt(row["speedup"].get(p), ".2f") + ("x" if p in row["speedup"] else "") for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("report.py: --plot needs matplotlib (pip install matplotlib); the table is written") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["results"] if r["impl"].startswith("fastbert") and r.get("speedup")]
    peers = sorted({p for r in rows for p in r["speedup"]})
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows) * max(1, len(peers)) / 2), 5))
    width = 0.8 / max(1, len(peers))
    for k, peer in enumerate(peers):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [r["speedup"].get(peer, 0) for r in rows], width, label=f"vs {peer}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['case']} ({r['impl']})" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fastbert speedup (x)")
    ax.set_title(f"fastbert speedup per case, {payload['environment'].get('device', '')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_ratios(rows: list[dict]) -> None:
    """Each fastbert row gets its speedup over every peer measured on the same case."""
    by_case: dict[str, dict[str, float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row["seconds"]
    for row in rows:
        if row["impl"].startswith("fastbert"):
            peers = by_case[row["case"]]
            row["speedup"] = {impl: seconds / row["seconds"] for impl, seconds in peers.items()
                              if not impl.startswith("fastbert")}


CEILINGS = ("matmul_peak_tflops_bf16", "copy_bandwidth_gbs")


def merge(payloads: list[dict], same_machine: bool = False) -> dict:
    """Several runs' results (GPU calls of under 10 minutes each) as one table. A (case, impl) measured
    again replaces the earlier run's row, and fastbert's ratios are recomputed over the merged rows, so
    a peer measured in a later call (max-autotune, say) counts against fastbert measured in an earlier
    one: give it only calls made on one machine, back to back. Runs on different devices (the GPU's
    UUID where recorded: two H200s are two machines), drivers or versions are refused: their numbers
    do not belong in one table; so are GPU runs that record no UUID (older ones), unless the caller
    says they were made on one machine (``same_machine``). The ceilings measured in the runs (matmul
    peak, copy bandwidth) are kept from whichever run measured them (the first, where several did),
    with every run's value beside them where they differ: each row's fraction is of its own run's."""
    keys = ("device", "gpu_uuid", "driver", "torch", "triton", "transformers")
    first = payloads[0]["environment"]
    unknown = [i + 1 for i, p in enumerate(payloads) if not p["environment"].get("gpu_uuid")
               and not str(p["environment"].get("device", "")).startswith("cpu")]
    if len(payloads) > 1 and unknown and not same_machine:
        raise SystemExit(f"report.py: run(s) {', '.join(map(str, unknown))} record no gpu_uuid, so nothing shows "
                         "the runs were made on one machine; pass --same-machine if they were")
    for other in payloads[1:]:
        env = other["environment"]
        differ = [k for k in keys if env.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"report.py: runs differ in {', '.join(differ)}: "
                             + "; ".join(f"{k}: {first.get(k)} vs {env.get(k)}" for k in differ))
    rows: dict[tuple[str, str], dict] = {}
    for payload in payloads:
        for row in payload["results"]:
            rows[row["case"], row["impl"]] = {k: v for k, v in row.items() if k != "speedup"}
    merged = list(rows.values())
    add_ratios(merged)
    dates = sorted({p["environment"].get("date", "") for p in payloads})
    environment = dict(first, date=" .. ".join([dates[0], dates[-1]]) if len(dates) > 1 else dates[0])
    for key in CEILINGS:
        measured = [p["environment"][key] for p in payloads if p["environment"].get(key) is not None]
        if measured and environment.get(key) is None:
            environment[key] = measured[0]
        if len(set(measured)) > 1:
            environment[f"{key}, each run"] = ", ".join(f"{value:.1f}" for value in measured)
    return {"environment": environment, "results": merged}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="+", help="results.json of one or more runs")
    parser.add_argument("--markdown", type=Path, help="write the table here (stdout if omitted)")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    parser.add_argument("--command", default=COMMAND)
    parser.add_argument("--same-machine", action="store_true",
                        help="the runs were made on one machine (for runs that record no gpu_uuid)")
    args = parser.parse_args(argv)
    payload = merge([json.loads(path.read_text()) for path in args.results], args.same_machine)
    table = markdown(payload, args.command)
    if args.markdown:
        args.markdown.write_text(table)
    else:
        print(table)
    if args.plot:
        plot(payload, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
