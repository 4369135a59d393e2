"""``make demo``: the main job on the embedded model, checked and timed against transformers.

Runs ``fastbert embed`` on a text file, then encodes the same lines with stock
sentence-transformers (transformers' BertModel) and prints the largest difference and the
sentences per second of both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# The demo's sentences live in the repository (benchmarks/data), found from the package's place, not
# from the current directory, so that `python -m fastbert.demo` runs from anywhere in a checkout.
DEFAULT_INPUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "sentences.txt"
# The README's promise: fastbert embed equals sentence-transformers within 1e-5 (fp32).
TOLERANCE = 1e-5


def _throughput(encode, lines, repeats: int) -> float:
    encode(lines)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        encode(lines)
    return repeats * len(lines) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input", nargs="?", default=str(DEFAULT_INPUT),
                        help="a text file, one sentence per line (default: benchmarks/data/sentences.txt of "
                             "the repository)")
    parser.add_argument("-o", "--output", default="build/demo/embeddings.npy",
                        help="where fastbert embed writes (.npy: the demo reads it back)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the input (at least 1)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        where = " (the default input is part of the fastbert repository, not of an installed package)" \
            if args.input == str(DEFAULT_INPUT) else ""
        raise SystemExit(f"fastbert demo: input {args.input!r} is not a file{where}; "
                         "pass one: python -m fastbert.demo SENTENCES.txt")
    if not args.output.endswith(".npy"):
        raise SystemExit(f"fastbert demo: output {args.output!r} must end in .npy (the demo reads it back)")
    if args.repeats < 1:
        raise SystemExit(f"fastbert demo: --repeats {args.repeats}: time at least one pass")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sentence_transformers import SentenceTransformer

    from .cli import main as fastbert_main
    from .embed import SentenceEmbedder, default_model_dir, read_lines

    try:
        lines = read_lines(args.input)
    except ValueError as exc:
        raise SystemExit(f"fastbert demo: input {exc}") from None
    if not lines:
        raise SystemExit(f"fastbert demo: input {args.input!r} has no lines to embed and compare")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    command = ["embed", args.input, "-o", args.output, "--quiet"]
    print("$ fastbert " + " ".join(command), flush=True)
    fastbert_main(command)
    ours = np.load(args.output)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stock = SentenceTransformer(str(default_model_dir()), device=device)
    theirs = stock.encode(lines, convert_to_numpy=True)
    diff = float(np.abs(ours - theirs).max())
    print(f"{len(lines)} sentences from {args.input}, model all-MiniLM-L6-v2 (embedded), device {device}")
    print(f"largest |difference| from transformers (stock sentence-transformers): {diff:.2e} "
          f"({'within' if diff <= TOLERANCE else 'OVER'} the promised {TOLERANCE:.0e})")

    embedder = SentenceEmbedder(device=device)
    fast = _throughput(embedder.encode, lines, args.repeats)
    slow = _throughput(lambda x: stock.encode(x, show_progress_bar=False), lines, args.repeats)
    print(f"sentences/s: fastbert {fast:.1f}, transformers {slow:.1f} ({fast / slow:.2f}x), "
          f"batch size 32, {torch.get_num_threads()} CPU threads" if device == "cpu" else
          f"sentences/s: fastbert {fast:.1f}, transformers {slow:.1f} ({fast / slow:.2f}x), batch size 32")
    return 0 if diff <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
