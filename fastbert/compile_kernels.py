"""``fastbert compile-kernels``: ahead-of-time compilation of every Triton kernel configuration for
GPUs that need not be present.

Each kernel module in ``fastbert.kernels`` lists, in ``compile_configs()``, every configuration its
launcher can pick (block sizes, warps, compile-time switches, dtypes). Each one is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for every requested compute
capability, and its cubin is read with Triton's bundled ``cuobjdump --dump-resource-usage``
(registers, stack, local memory, static shared memory); the dynamic shared memory comes from the
compiled kernel's metadata. One row per kernel, configuration and architecture; the exit status is
non-zero when anything fails to compile or spills (a stack frame or local memory in use).

A job of ``compile_configs()`` is a dict: ``kernel`` (the row's name), ``name`` (the configuration),
``fn`` (the ``@triton.jit`` function), ``signature`` (runtime parameter -> Triton type such as
``"*fp16"``, ``"i32"``, ``"fp32"``), ``constexprs`` (name -> value), ``divisible`` (parameters the
JIT would see as multiples of 16, compiled with that hint), ``num_warps`` and ``num_stages``.

Compilation runs in worker processes (``--jobs``, default one per core) started fresh with
``TRITON_INTERPRET`` removed: kernels defined under the interpreter cannot be compiled.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

KERNEL_MODULES = ("attention", "bias_activation", "bias_residual_layer_norm", "linear_activation")


def kernel_modules() -> tuple[str, ...]:
    """The modules of ``fastbert.kernels`` that list compile configurations: the four above, then any
    other module of the package that defines ``compile_configs``."""
    import pkgutil

    from . import kernels

    found = [m.name for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_")]
    extra = []
    for name in sorted(set(found) - set(KERNEL_MODULES)):
        try:
            if hasattr(importlib.import_module(f"fastbert.kernels.{name}"), "compile_configs"):
                extra.append(name)
        except ImportError:
            continue
    return KERNEL_MODULES + tuple(extra)


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="80,90,120",
                        help="compute capabilities, comma-separated (default: 80,90,120 = sm_80, sm_90, sm_120)")
    parser.add_argument("--kernel", action="append",
                        help="only this kernel module of fastbert.kernels (repeatable; default: all)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="parallel compile processes (default: one per CPU core)")


def _parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        part = part.removeprefix("sm_").removeprefix("sm")
        if not part.isdigit() or int(part) < 50:  # sm_50 (Maxwell) is the oldest any ptxas here takes
            raise ValueError(f"--arch: {part!r} is not a compute capability such as 80, 90 or 120")
        archs.append(int(part))
    if not archs:
        raise ValueError("--arch: no compute capability given")
    return archs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"Triton's bundled cuobjdump is missing: {path}")
    return path


def _cuobjdump_output(cubin: bytes, option: str) -> str:
    """What Triton's bundled cuobjdump prints for ``cubin`` with ``option``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([_cuobjdump(), option, f.name], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in ``cubin``, from cuobjdump."""
    report = _cuobjdump_output(cubin, "--dump-resource-usage")
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", report)
        if not found:
            raise RuntimeError(f"cuobjdump printed no {key}: {report.strip()}")
        usage[key] = max(int(v) for v in found)
    return usage


def sass(cubin: bytes) -> str:
    """The disassembly of ``cubin`` (Triton's bundled cuobjdump): which instructions a kernel uses."""
    return _cuobjdump_output(cubin, "-sass")


def compile_job(job: dict, cc: int):
    """``triton.compile`` of one job of a kernel module's ``compile_configs()`` for ``sm_<cc>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cc, 32)
    return triton.compile(_ast_source(job["fn"], job, target), target=target,
                          options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})


def _ast_source(fn, job: dict, target):
    """``ASTSource`` for one job, in the format of the installed Triton.

    Triton >= 3.3 (3.6 and 3.8 included) takes a signature over every parameter, constexprs typed
    ``"constexpr"``, constexpr values keyed by name, and attributes keyed by ``(index,)``; older
    versions keyed constants by index and left constexprs out of the signature.
    """
    from triton.compiler import ASTSource

    signature = {name: job["signature"].get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in job["constexprs"]]
    if missing:
        raise ValueError(f"{job['name']}: no type or value for {missing}")
    attrs = {}
    try:
        from triton.compiler.compiler import make_backend

        backend = make_backend(target)
        attrs = {(fn.arg_names.index(a),): backend.parse_attr("D") for a in job.get("divisible", ())}
    except Exception:  # noqa: BLE001 - divisibility hints are an optimisation; compile without them
        attrs = {}
    try:
        return ASTSource(fn, signature, job["constexprs"], attrs)
    except (TypeError, AssertionError, KeyError):
        # Older signature format: runtime arguments only, constants keyed by parameter index.
        sig = {fn.arg_names.index(n): t for n, t in signature.items() if t != "constexpr"}
        consts = {fn.arg_names.index(n): v for n, v in job["constexprs"].items()}
        return ASTSource(fn, sig, consts)


def _compile_one(module_name: str, index: int, cc: int) -> dict:
    """Compile job ``index`` of ``fastbert.kernels.<module_name>`` for ``sm_<cc>``; a result row."""
    module = importlib.import_module(f"fastbert.kernels.{module_name}")
    job = module.compile_configs()[index]
    row = {"kernel": job["kernel"], "config": job["name"], "arch": f"sm_{cc}"}
    started = time.perf_counter()
    try:
        fn = job["fn"]
        if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("the kernel was defined under TRITON_INTERPRET=1 and cannot be compiled")
        compiled = compile_job(job, cc)
        usage = _resource_usage(compiled.asm["cubin"])
        row.update(regs=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"],
                   shared=max(usage["SHARED"], int(getattr(compiled.metadata, "shared", 0) or 0)),
                   spills=usage["STACK"] + usage["LOCAL"], error=None)
    except Exception as exc:  # noqa: BLE001 - reported as a row, turned into the exit status
        message = str(exc).strip().splitlines()
        row.update(error=f"{type(exc).__name__}: {message[-1] if message else ''}"[:300])
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _worker_init() -> None:
    # Kernels decorated under the interpreter cannot be compiled: make sure the worker defines the
    # real JIT functions (Triton reads TRITON_INTERPRET when @triton.jit runs).
    os.environ.pop("TRITON_INTERPRET", None)


def _jobs(kernels) -> list[tuple[str, int, tuple[int, ...] | None]]:
    # Listing the jobs only reads the configuration lists, so the kernel modules may be imported here
    # whatever TRITON_INTERPRET says; compiling happens where the kernels are real JIT functions.
    # A job's "archs" (compute capabilities) limits it to the GPUs it is meant for (None: every one).
    out = []
    for name in kernels:
        module = importlib.import_module(f"fastbert.kernels.{name}")
        out += [(name, i, job.get("archs")) for i, job in enumerate(module.compile_configs())]
    return out


def _compilable_here(kernels) -> bool:
    """Whether this process holds real (not interpreted) kernels and may compile them itself."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    for name in kernels:
        module = sys.modules.get(f"fastbert.kernels.{name}")
        if module is not None and any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values()):
            return False
    return True


def compile_all(archs: list[int], kernels=None, jobs: int = 0) -> list[dict]:
    """Compile every configuration of ``kernels`` (default: all) for every architecture; one row
    dict each, in job order. ``jobs``: worker processes (0: one per CPU core); with one, compiles in
    this process when it can."""
    kernels = tuple(kernels or kernel_modules())
    tasks = [(name, i, cc) for name, i, meant_for in _jobs(kernels) for cc in archs
             if meant_for is None or cc in meant_for]
    workers = min(jobs or os.cpu_count() or 1, len(tasks)) or 1
    if workers == 1 and _compilable_here(kernels):
        return [_compile_one(*t) for t in tasks]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited Triton state
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                initializer=_worker_init) as pool:
        return list(pool.map(_compile_one, *zip(*tasks)))


def format_rows(rows: list[dict]) -> str:
    # The configuration column is one wider than its longest name (at least 36): columns never touch.
    width = max([36] + [len(r["config"]) + 1 for r in rows])
    header = f"{'kernel':<26} {'configuration':<{width}} {'arch':<7} {'regs':>5} {'spills':>6} {'shared':>8} {'time':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['kernel']:<26} {r['config']:<{width}} {r['arch']:<7} ERROR {r['error']}")
            continue
        spill = f"{r['spills']}B" if r["spills"] else "0"
        lines.append(f"{r['kernel']:<26} {r['config']:<{width}} {r['arch']:<7} {r['regs']:>5} {spill:>6} "
                     f"{r['shared']:>8} {r['seconds']:>5.1f}s")
    return "\n".join(lines)


def run(args) -> int:
    try:
        archs = _parse_archs(args.arch)
    except ValueError as exc:
        print(f"fastbert compile-kernels: {exc}", file=sys.stderr)
        return 2
    if (getattr(args, "jobs", 0) or 0) < 0:
        print(f"fastbert compile-kernels: --jobs {args.jobs}: give a number of processes, or 0 for one per core",
              file=sys.stderr)
        return 2
    try:
        import triton

        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        print(f"fastbert compile-kernels: triton is not usable: {exc}", file=sys.stderr)
        return 2
    available = kernel_modules()
    kernels = tuple(getattr(args, "kernel", None) or available)
    unknown = sorted(set(kernels) - set(available))
    if unknown:
        print(f"fastbert compile-kernels: unknown kernel {', '.join(unknown)}; available: {', '.join(available)}",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = compile_all(archs, kernels, getattr(args, "jobs", 0) or 0)
    print(format_rows(rows))
    errors = [r for r in rows if r["error"]]
    spills = [r for r in rows if not r["error"] and r["spills"]]
    configurations = len({(r["kernel"], r["config"]) for r in rows})
    print(f"\n{len(rows)} compilations ({configurations} configurations, {len(archs)} architectures) "
          f"with triton {triton.__version__} in {time.perf_counter() - started:.0f}s: "
          f"{len(errors)} failed, {len(spills)} spill")
    for r in errors:
        print(f"FAILED {r['kernel']} [{r['config']}] {r['arch']}: {r['error']}", file=sys.stderr)
    for r in spills:
        print(f"SPILL {r['kernel']} [{r['config']}] {r['arch']}: stack {r['stack']} B, local {r['local']} B",
              file=sys.stderr)
    return 1 if errors or spills else 0
