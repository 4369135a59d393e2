"""``fastbert compile-kernels``: ahead-of-time compilation of every Triton kernel configuration
for GPUs that need not be present (filled in by the Triton-kernels work)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="80,90,120", help="compute capabilities, comma-separated")


def run(args) -> int:
    raise NotImplementedError("compile-kernels: the Triton kernels are not implemented yet")
