"""The ``fastbert`` command: ``embed``, ``info``, ``compile-kernels``."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser("embed", help="one sentence embedding per input line")
    from .embed import add_arguments as add_embed_arguments

    add_embed_arguments(embed)

    sub.add_parser("info", help="versions, device, the backend of each op, the CUDA extension")

    compile_kernels = sub.add_parser(
        "compile-kernels", help="compile every Triton kernel configuration for GPUs that need not be here"
    )
    from .compile_kernels import add_arguments as add_compile_arguments

    add_compile_arguments(compile_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "embed":
        from .embed import run
    elif args.command == "info":
        from .info import run
    else:
        from .compile_kernels import run
    return run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
