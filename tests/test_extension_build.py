"""The C++/CUDA extension fastbert._C: built wherever it can be (`make test` builds it, so a missing
extension next to nvcc and a CUDA torch is a failure, not a skip), compiled for the GPUs we ship for,
its op registered with a fake implementation that torch.compile / FakeTensorMode use, coexisting with
the Python-defined ops of the same namespace, and setup.py's FASTBERT_BUILD_CUDA modes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbert import _extension

ROOT = Path(__file__).resolve().parents[1]
OP = "fastbert::embedding_layer_norm"


def _load_setup_py():
    spec = importlib.util.spec_from_file_location("fastbert_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


SETUP = _load_setup_py()


def _cuda_build_possible() -> tuple[bool, str]:
    """Whether setup.py should have built the CUDA extension here, and why (not)."""
    if os.environ.get("FASTBERT_BUILD_CUDA") == "0":
        return False, "FASTBERT_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    cuda_home, how = SETUP.find_cuda_home()
    if cuda_home is None:
        return False, f"no CUDA toolkit ({how})"
    toolkit = SETUP.nvcc_version(cuda_home)
    if toolkit is None or toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, f"nvcc {toolkit} at {cuda_home} does not match torch's CUDA {torch.version.cuda}"
    return True, f"nvcc {toolkit} at {cuda_home} ({how}), torch CUDA {torch.version.cuda}"


CUDA_BUILD, CUDA_BUILD_WHY = _cuda_build_possible()
needs_extension = pytest.mark.skipif(
    not _extension.is_built() and not CUDA_BUILD,
    reason=f"fastbert._C is not built and cannot be here: {CUDA_BUILD_WHY}",
)
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILD, reason=f"no CUDA build possible here: {CUDA_BUILD_WHY}")


def _expected_archs() -> set[str]:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", SETUP.DEFAULT_ARCHS)
    return {"sm_" + a.split("+")[0].replace(".", "") for a in re.split(r"[;\s]+", archs.strip()) if a}


def _sample_inputs(dtype=torch.float32, hidden=97, tokens=7, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (tokens,), generator=g)
    pos = torch.randint(0, 40, (tokens,), generator=g)
    types = torch.randint(0, 2, (tokens,), generator=g)
    tables = [torch.randn(rows, hidden, generator=g) for rows in (50, 40, 2)]
    ln = [torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)]
    return tuple(t.to(device) for t in (ids, pos, types)) + tuple(t.to(device, dtype) for t in (*tables, *ln)) + (1e-12,)


# ---------------------------------------------------------------------------------------------------
# Built and loadable.

@needs_extension
def test_extension_is_built_and_imports():
    assert _extension.is_built(), (
        f"fastbert._C did not import ({_extension.extension_status()}); with {CUDA_BUILD_WHY} setup.py should "
        "have built it: run `pip install --no-build-isolation -e . -v` and read the 'fastbert setup.py' lines")
    import fastbert._C as C

    assert torch.__version__.startswith(C.torch_version), "built against another torch: rebuild"
    assert "built" in _extension.extension_status()


def _require_cuda_kernels():
    assert _extension.has_cuda_kernels(), (
        f"fastbert._C was built without its CUDA kernel although {CUDA_BUILD_WHY}: {_extension.extension_status()}")


@needs_cuda_build
def test_extension_has_cuda_kernels():
    _require_cuda_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    status = _extension.extension_status()
    assert "built with CUDA" in status and "WARNING" not in status, status


def _cuobjdump() -> str | None:
    candidates = []
    cuda_home, _ = SETUP.find_cuda_home()
    if cuda_home:
        candidates.append(Path(cuda_home) / "bin" / "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@needs_cuda_build
def test_cubins_cover_target_architectures():
    _require_cuda_kernels()
    import fastbert._C as C

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit nor bundled with triton)")
    listing = subprocess.run([tool, "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    compiled = set(re.findall(r"\.(sm_\d+a?)\.cubin", listing))
    missing = _expected_archs() - compiled
    assert not missing, f"no cubin for {sorted(missing)} in {C.__file__}; cuobjdump lists:\n{listing}"
    # __CUDA_ARCH_LIST__, which built_cuda_archs reads, names sm_90a's cubin sm_90 (the GPU image sets
    # TORCH_CUDA_ARCH_LIST=9.0a): compare base architectures there.
    assert set(_extension.built_cuda_archs()) >= {re.sub(r"[af]$", "", a) for a in _expected_archs()}
    # No register spills: the row is meant to stay in registers.
    usage = subprocess.run([tool, "--dump-resource-usage", C.__file__], capture_output=True, text=True,
                           check=True).stdout
    spills = [line for line in usage.splitlines() if re.search(r"\b(LOCAL|STACK):[1-9]", line)]
    assert not spills, "register spills:\n" + "\n".join(spills)


def _sass_memory_ops(tool: str, path: str, arch: str) -> dict[str, dict[str, int]]:
    """{kernel name: {SASS global load/store opcode: count}} for one architecture."""
    sass = subprocess.run([tool, "-sass", "-arch", arch, path], capture_output=True, text=True, check=True).stdout
    ops: dict[str, dict[str, int]] = {}
    name = None
    for line in sass.splitlines():
        header = re.search(r"Function : (\S+)", line)
        if header:
            name = header.group(1)
            ops[name] = {}
        elif name:
            for op in re.findall(r"\b((?:LDG|STG)[A-Z0-9._]*)", line):
                ops[name][op] = ops[name].get(op, 0) + 1
    return ops


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_120"])
def test_vectorized_kernels_move_16_bytes_per_access(arch):
    """The vector path (Pack of 16 bytes: 4 floats, 8 halves) compiles to 128-bit loads and stores only."""
    _require_cuda_kernels()
    import fastbert._C as C

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit nor bundled with triton)")
    if arch not in _expected_archs():
        pytest.skip(f"{arch} is not in TORCH_CUDA_ARCH_LIST")
    ops = _sass_memory_ops(tool, C.__file__, arch)
    vector_kernels = {name: counts for name, counts in ops.items()
                      if re.search(r"embedding_layer_norm_kernelI(fLi4|6__halfLi8|13__nv_bfloat16Li8)E", name)}
    assert len(vector_kernels) == 3, sorted(ops)
    for name, counts in vector_kernels.items():
        assert counts.get("LDG.E.128", 0) > 0 and counts.get("STG.E.128", 0) > 0, (name, counts)
        narrow = {op: n for op, n in counts.items()
                  if op not in ("LDG.E.128", "STG.E.128", "LDG.E.64")  # 64-bit: the int64 indices
                  and not (op == "STG.E" and n == 1)}  # the error flag
        assert not narrow, f"{name}: narrow global accesses {narrow}"


# ---------------------------------------------------------------------------------------------------
# No iostreams in the .so.

# libstdc++'s stream and locale code, as nm -C and objdump -C spell it.
_STREAM = re.compile(r"basic_ostream|basic_ostringstream|basic_stringbuf|basic_ios<|ios_base|std::locale\b"
                     r"|std::ostream")
# What torch's headers leave in the .so whatever csrc/ does (any extension that includes ATen and registers
# an op with torch::Library), none of which runs when the op raises: {function: the stream code it may call}.
_TORCH_LEFTOVERS = {
    # The static std::ios_base::Init of <iostream> (gcc <= 12; gcc 13 references std::ios_base_library_init
    # instead, and calls nothing), which torch/headeronly/util/Float8_e4m3fn.h includes.
    r"_GLOBAL__sub_I_ops\.cpp": r"std::ios_base::Init::.*",
    # c10::str("Expected SymFloat or double but got ", tagKind()) of IValue::toSymFloat/toSymBool, inlined in
    # the boxed wrapper that torch::Library::impl generates for our double and bool arguments: GCC drops the
    # call (the check cannot fail there) but keeps this out-of-line copy, which nothing calls.
    r"c10::detail::_str_wrapper<char const\*, std::__cxx11::basic_string<.*> const&>::call\(.*": r".*",
    r"std::__cxx11::basic_stringbuf<.*>::~basic_stringbuf\(\)": r".*",  # called by the one above
}


def _binutil(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"no {tool} (binutils)")
    return path


def _stream_callers(so: str) -> dict[str, set[str]]:
    """{function in the .so: the stream and locale functions it calls (through the PLT or not)}."""
    listing = subprocess.run([_binutil("objdump"), "-d", "-C", "--no-show-raw-insn", so], capture_output=True,
                             text=True, check=True).stdout
    callers: dict[str, set[str]] = {}
    function = None
    for line in listing.splitlines():
        header = re.match(r"[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = None if header.group(1).endswith("@plt") else header.group(1)
            continue
        call = re.search(r"\s(?:call|jmp)\s+[0-9a-f]+ <(.*)>$", line)
        if function and call and "+0x" not in call.group(1) and _STREAM.search(call.group(1)):
            callers.setdefault(function, set()).add(call.group(1).removesuffix("@plt"))
    return callers


def _is_leftover(function: str, callees: set[str] = frozenset()) -> bool:
    return any(re.fullmatch(name, function) and all(re.fullmatch(allowed, c) for c in callees)
               for name, allowed in _TORCH_LEFTOVERS.items())


def test_extension_has_no_iostream_code():
    """Nothing in fastbert._C formats with iostreams: the error messages are built from std::to_string,
    c10::toString and Device::str() (libc10's), then handed to TORCH_CHECK* as one C string (csrc/ops.cpp,
    msg()). TORCH_CHECK*(cond, a, b, ...) would format with c10::str, which instantiates std::ostringstream
    and operator<< in our .so. On one GPU image (gcc 13, torch 2.11) libstdc++'s stream code landed inside
    _C.so itself (as if linked statically), its locale machinery uninitialised, and every exception the op
    raised crashed the process: SIGSEGV in std::basic_ostream::_M_insert<long> (codecvt::do_unshift), called
    from c10::str in check_range_on_host. The symptom cannot be reproduced where the stream code resolves to
    the system libstdc++.so, so this checks the cause with binutils instead: which functions of the .so call
    stream or locale code (objdump), and which such symbols the .so defines (nm); only the leftovers of
    torch's headers listed in _TORCH_LEFTOVERS, which never run, may."""
    if not _extension.is_built():  # test_extension_is_built_and_imports says whether it should be
        pytest.skip(f"fastbert._C is not built: {_extension.extension_status()}")
    import fastbert._C as C

    callers = _stream_callers(C.__file__)
    offenders = {f: sorted(c) for f, c in callers.items() if not _is_leftover(f, c)}
    assert not offenders, (
        "functions of fastbert._C call iostream/locale code (a TORCH_CHECK* with several message arguments? "
        "use msg(...).c_str() in csrc/ops.cpp):\n"
        + "\n".join(f"{f}\n    calls {c[0]}" + (f" and {len(c) - 1} more" if len(c) > 1 else "")
                    for f, c in offenders.items()))

    symbols = subprocess.run([_binutil("nm"), "-C", "--defined-only", C.__file__], capture_output=True, text=True,
                             check=True).stdout
    defined = {line.split(maxsplit=2)[2] for line in symbols.splitlines() if len(line.split(maxsplit=2)) == 3}
    stream_code = sorted(name for name in defined if _STREAM.search(name) and not _is_leftover(name))
    assert not stream_code, ("fastbert._C defines iostream/locale code (libstdc++ linked into it?):\n"
                             + "\n".join(stream_code))


# ---------------------------------------------------------------------------------------------------
# Registration and the fake implementation.

@needs_extension
def test_op_registered_with_cpu_kernel():
    assert _extension.is_built()
    assert hasattr(torch.ops.fastbert, "embedding_layer_norm")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")
    schema = str(torch.ops.fastbert.embedding_layer_norm.default._schema)
    assert schema.startswith("fastbert::embedding_layer_norm(Tensor input_ids, Tensor position_ids"), schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA") == _extension.has_cuda_kernels()


@needs_extension
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [97, 384])
def test_opcheck_cpu(dtype, hidden, requires_grad):
    """Schema, fake implementation, autograd registration and AOT dispatch (with dynamic shapes)."""
    assert _extension.is_built()
    args = list(_sample_inputs(dtype, hidden))
    if requires_grad:
        args[3:8] = [t.requires_grad_() for t in args[3:8]]
    torch.library.opcheck(torch.ops.fastbert.embedding_layer_norm.default, tuple(args))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_cuda_tensors_give_shape_dtype_device(dtype):
    """What torch.compile and CUDA-graph capture see: works without a GPU, from fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    assert _extension.is_built()
    with FakeTensorMode():
        args = _sample_inputs(dtype, hidden=768, tokens=11, device="cuda")
        out = torch.ops.fastbert.embedding_layer_norm(*args)
    assert isinstance(out, FakeTensor)
    assert out.shape == (11, 768) and out.dtype == dtype and out.device.type == "cuda"


@needs_extension
def test_torch_compile_fullgraph_takes_the_op():
    assert _extension.is_built()

    def f(*args):
        return torch.ops.fastbert.embedding_layer_norm(*args) * 2

    args = _sample_inputs(torch.float32, hidden=64, tokens=5)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(*args), f(*args))


def test_status_string_is_informative():
    status = _extension.extension_status()
    if _extension.is_built():
        assert status.startswith("built"), status
    else:
        assert status.startswith(("not built", "not loadable")), status


# ---------------------------------------------------------------------------------------------------
# The namespace: Python-defined ops (triton_op / custom_op, even a Library("fastbert", "DEF")) and the
# extension in either order. Each case in a fresh interpreter: registrations cannot be undone.

_PROBE = r"""
import importlib.util, sys, torch
def python_ops():
    @torch.library.custom_op("fastbert::_probe_custom", mutates_args=())
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
    @torch.library.triton_op("fastbert::_probe_triton", mutates_args=())
    def g(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
def python_def_library():
    global LIB
    LIB = torch.library.Library("fastbert", "DEF")
    LIB.define("_probe_def(Tensor x) -> Tensor")
def python_same_name():
    global LIB2
    LIB2 = torch.library.Library("fastbert", "FRAGMENT")
    LIB2.define("embedding_layer_norm(Tensor x) -> Tensor")
def extension():
    # The .so alone (importing the fastbert package would cost seconds of transformers imports).
    spec = importlib.util.spec_from_file_location("fastbert._C", EXTENSION_PATH)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ImportError as error:
        print("IMPORT ERROR:", error)
        raise SystemExit(3)
    assert hasattr(torch.ops.fastbert, "embedding_layer_norm")
EXTENSION_PATH = sys.argv[1]
steps = {"ops": python_ops, "def": python_def_library, "same-name": python_same_name, "ext": extension}
for step in sys.argv[2:]:
    steps[step]()
print("OK")
"""
# Every process gets a fresh interpreter (registrations cannot be undone); the sequences cover Python
# DEF and FRAGMENT (custom_op, triton_op) libraries before the extension, and after it.
_SEQUENCES = {"python-first": ("def", "ops", "ext"), "extension-first": ("ext", "def", "ops"),
              "same-name": ("same-name", "ext")}
_SETUP_RUNS = {  # setup.py --name: metadata only, no compile
    "build-0": {"FASTBERT_BUILD_CUDA": "0"},
    "build-1-no-toolkit": {"FASTBERT_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent/fastbert-no-cuda-here"},
    "unset-no-toolkit": {"FASTBERT_BUILD_CUDA": None, "CUDA_HOME": "/nonexistent/fastbert-no-cuda-here"},
}


@pytest.fixture(scope="module")
def subprocess_results():
    """All the subprocess checks of this file, started at once (each spends seconds importing torch)."""
    commands = {}
    if _extension.is_built():
        path = _extension.load().__file__
        for name, steps in _SEQUENCES.items():
            commands[name] = ([sys.executable, "-c", _PROBE, path, *steps], None)
    for name, updates in _SETUP_RUNS.items():
        env = dict(os.environ)
        for key, value in updates.items():  # None: unset
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        commands[name] = ([sys.executable, "setup.py", "--name"], env)
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                    env=env) for name, (cmd, env) in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@needs_extension
@pytest.mark.parametrize("sequence", ["python-first", "extension-first"])
def test_namespace_shared_with_python_ops(subprocess_results, sequence):
    assert _extension.is_built()
    result = subprocess_results[sequence]
    assert result.returncode == 0 and "OK" in result.stdout, f"{result.stdout}\n{result.stderr[-3000:]}"


@needs_extension
def test_registration_clash_is_an_import_error(subprocess_results):
    """A Python op already named fastbert::embedding_layer_norm: an ImportError naming it, no abort."""
    assert _extension.is_built()
    result = subprocess_results["same-name"]
    assert result.returncode == 3, f"expected a clean ImportError, got exit {result.returncode}:\n" \
                                   f"{result.stdout}\n{result.stderr[-3000:]}"
    assert "could not register torch.ops.fastbert::embedding_layer_norm" in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------------
# setup.py: the toolkit it finds and the FASTBERT_BUILD_CUDA modes (metadata only: no compile).

def test_setup_finds_the_toolkit_nvcc_uses(monkeypatch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    root, how = SETUP.find_cuda_home()
    assert root is not None, how
    assert os.path.isfile(os.path.join(root, "bin", "nvcc")), root
    assert SETUP.cuda_root_from_nvcc(nvcc) == root


def test_setup_build_cuda_0_skips_the_extension(subprocess_results):
    result = subprocess_results["build-0"]
    assert result.returncode == 0, result.stderr
    assert "FASTBERT_BUILD_CUDA=0: not building" in result.stderr


def test_setup_build_cuda_1_fails_loudly_without_a_toolkit(subprocess_results):
    result = subprocess_results["build-1-no-toolkit"]
    assert result.returncode != 0
    assert "FASTBERT_BUILD_CUDA=1, but" in result.stderr, result.stderr


def test_setup_unset_falls_back_without_a_toolkit(subprocess_results):
    result = subprocess_results["unset-no-toolkit"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("fastbert")
    assert "CPU kernel only" in result.stderr or "not building" in result.stderr, result.stderr
