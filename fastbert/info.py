"""``fastbert info``: versions, device, the backend each op runs on, the CUDA extension."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _or_error(get) -> str:
    """``get()``, or the error it raises: a bad FASTBERT_BACKEND / FASTBERT_GEMM is what ``fastbert info``
    is run to find, so it is reported in its row rather than ending the report in a traceback."""
    try:
        return get()
    except (ValueError, RuntimeError) as exc:
        return f"error: {exc}"


def report() -> list[tuple[str, str]]:
    from . import __version__
    from .ops import backend

    rows = [("fastbert", __version__), ("python", platform.python_version())]
    rows += [(name, _version(name)) for name in ("torch", "triton", "transformers", "tokenizers",
                                                  "sentence-transformers")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("device", f"cuda: {props.name} (sm_{props.major}{props.minor}), torch CUDA {torch.version.cuda}"))
    else:
        rows.append(("device", f"cpu (no CUDA device; torch CUDA build: {torch.version.cuda or 'none'})"))
    # Checked on the device a model would run on here: a backend its kernels cannot run on is an error.
    main_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows.append(("FASTBERT_BACKEND", _or_error(lambda: backend.runnable_backend(main_device))))
    rows.append(("FASTBERT_GEMM", _or_error(backend.gemm_setting)))
    try:
        from ._extension import extension_status
    except ImportError:
        status = "not part of this build"
    else:
        status = extension_status()
    rows.append(("CUDA extension fastbert._C", status))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in ("embeddings", "attention", "linear_activation", "bias_activation",
                 "bias_residual_layer_norm"):
        op = importlib.import_module(f"fastbert.ops.{name}")  # the module: ops re-exports same-named functions
        rows.append((f"op {name}", _or_error(lambda op=op: ", ".join(f"{d}: {op.active_backend(d)}" for d in devices))))
    if backend.triton_available():
        from .ops.encoder_layer import fast_path_active

        rows.append(("encoder eager fast path", _or_error(lambda: ", ".join(
            f"{d}: {'on' if fast_path_active(d) else 'off'}" for d in devices))))
    return rows


def run(args=None) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 1 if any(value.startswith("error: ") for _, value in rows) else 0
