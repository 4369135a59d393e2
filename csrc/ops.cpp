// fastbert._C: registers torch.ops.fastbert.embedding_layer_norm (CPU and, when built with CUDA, CUDA
// kernels). Importing the module is what registers the op; the module itself only exposes a few
// facts about the build.
//
// The namespace is opened as a FRAGMENT (what TORCH_LIBRARY_FRAGMENT does), not with TORCH_LIBRARY:
// fastbert's Triton ops are defined from Python (torch.library.triton_op / custom_op) in the same
// "fastbert" namespace, and a fragment coexists with those, and even with a Python
// torch.library.Library("fastbert", "DEF"), in either import order, whereas a TORCH_LIBRARY block
// claims the namespace: it and a Python DEF library fail in one order and abort the process in the
// other (see tests/test_extension_build.py and register_ops below).
//
// The fake (meta) implementation is registered in Python, in fastbert/_extension.py; the op names
// that module with set_python_module, so torch imports it when it needs the fake implementation.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#ifdef FASTBERT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "embedding_layer_norm.h"

namespace fastbert {
namespace {

constexpr const char* kOp = "fastbert::embedding_layer_norm";

// ---------------------------------------------------------------------------------------------
// No iostreams in this .so.
//
// TORCH_CHECK*(cond, a, b, ...) formats its arguments with c10::str, an inline template that
// instantiates std::ostringstream and operator<< here. On one GPU image (gcc 13, torch 2.11)
// libstdc++'s stream code ended up inside _C.so itself, its locale machinery uninitialised, and every
// exception the op raised crashed the process (SIGSEGV in std::basic_ostream::_M_insert<long>, called
// from check_range_on_host). So every check passes one `const char*`, msg(...).c_str():
// c10::detail::torchCheckMsgImpl has a plain overload for a single C string, where a single
// std::string still goes through c10::str's ostringstream (c10/util/StringUtil.h specializes
// _str_wrapper<std::string>, but c10::str instantiates _str_wrapper<const std::string&>). The error
// objects are built by libc10. Inline torch code that streams (at::empty's range check, CUDAGuard's
// device checks) is avoided too. tests/test_extension_build.py checks the built .so (objdump, nm) and
// lists what torch's headers still leave in it, none of which runs when the op raises.

// Message pieces: integers by std::to_string, shapes as torch prints them, dtypes by c10::toString
// (a switch returning const char*), devices by Device::str() (defined in libc10.so: its streams are
// libc10's).
std::string piece(const char* s) { return s; }
std::string piece(c10::ScalarType t) { return c10::toString(t); }
std::string piece(const c10::Device& d) { return d.str(); }
std::string piece(c10::IntArrayRef sizes) {  // "[2, 3]"
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string piece(T n) {
  return std::to_string(n);
}

// The message for a TORCH_CHECK*: pass msg(...).c_str() (see above).
template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  ((s += piece(args)), ...);
  return s;
}

// at::empty without c10::fromIntArrayRefSlow (its check that each size fits a SymInt streams the
// size): our sizes come from tensors, so they are non-negative and fit.
at::Tensor empty(c10::IntArrayRef shape, const at::TensorOptions& options) {
  return at::empty_symint(c10::fromIntArrayRefKnownNonNegative(shape), options);
}

#ifdef FASTBERT_WITH_CUDA
// What c10::cuda::CUDAGuard does (make `device` current, restore the previous device at the end of
// the scope), with libc10_cuda's functions only: CUDAGuard instantiates CUDAGuardImpl's inline
// methods here, and their TORCH_CHECKs stream a Device.
class DeviceScope {
 public:
  explicit DeviceScope(c10::DeviceIndex device) : previous_(c10::cuda::ExchangeDevice(device)) {}
  ~DeviceScope() {
    // Like CUDAGuard, never throw from here; CUDAGuard only warns when the restore fails.
    try {
      if (c10::cuda::MaybeSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
    } catch (...) {
    }
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  c10::DeviceIndex previous_;
};
#endif

// ---------------------------------------------------------------------------------------------
// Argument checks, shared by the CPU and CUDA implementations.

struct Inputs {
  at::Tensor ids, positions, types, word, position, token_type, gamma, beta;
  FloatKind kind;
  int64_t tokens, hidden;
};

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& table) {
  TORCH_CHECK_VALUE(t.dim() == 1,
                    msg(kOp, ": ", name, " must be a 1-D tensor of packed tokens, got shape ", t.sizes()).c_str());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong,
                   msg(kOp, ": ", name, " must be int64, got ", t.scalar_type()).c_str());
  TORCH_CHECK_VALUE(t.device() == table.device(), msg(kOp, ": ", name, " is on ", t.device(),
                                                      " but the embedding tables are on ", table.device()).c_str());
}

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& word, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim,
                    msg(kOp, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes()).c_str());
  TORCH_CHECK_TYPE(t.scalar_type() == word.scalar_type(),
                   msg(kOp, ": ", name, " is ", t.scalar_type(), " but word_weight is ", word.scalar_type(),
                       " (all tables and LayerNorm parameters share a dtype)").c_str());
  TORCH_CHECK_VALUE(t.device() == word.device(),
                    msg(kOp, ": ", name, " is on ", t.device(), " but word_weight is on ", word.device()).c_str());
  TORCH_CHECK_VALUE(t.size(dim - 1) == word.size(1),
                    msg(kOp, ": ", name, " has shape ", t.sizes(), " but the hidden size (word_weight.shape[1]) is ",
                        word.size(1)).c_str());
}

Inputs check_inputs(const at::Tensor& input_ids, const at::Tensor& position_ids, const at::Tensor& token_type_ids,
                    const at::Tensor& word_weight, const at::Tensor& position_weight,
                    const at::Tensor& token_type_weight, const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  TORCH_CHECK_VALUE(word_weight.dim() == 2,
                    msg(kOp, ": word_weight must be [vocab, hidden], got shape ", word_weight.sizes()).c_str());
  Inputs in;
  switch (word_weight.scalar_type()) {
    case at::kFloat: in.kind = FloatKind::kFloat32; break;
    case at::kHalf: in.kind = FloatKind::kFloat16; break;
    case at::kBFloat16: in.kind = FloatKind::kBFloat16; break;
    default:
      TORCH_CHECK_TYPE(false, msg(kOp, ": supports float32, float16 and bfloat16 tables, got ",
                                  word_weight.scalar_type()).c_str());
  }
  check_float_tensor(position_weight, "position_weight", word_weight, 2);
  check_float_tensor(token_type_weight, "token_type_weight", word_weight, 2);
  check_float_tensor(ln_weight, "ln_weight", word_weight, 1);
  check_float_tensor(ln_bias, "ln_bias", word_weight, 1);
  check_index_tensor(input_ids, "input_ids", word_weight);
  check_index_tensor(position_ids, "position_ids", word_weight);
  check_index_tensor(token_type_ids, "token_type_ids", word_weight);
  TORCH_CHECK_VALUE(position_ids.size(0) == input_ids.size(0) && token_type_ids.size(0) == input_ids.size(0),
                    msg(kOp, ": input_ids, position_ids and token_type_ids must have one entry per token, got lengths ",
                        input_ids.size(0), ", ", position_ids.size(0), " and ", token_type_ids.size(0)).c_str());
  in.ids = input_ids.contiguous();
  in.positions = position_ids.contiguous();
  in.types = token_type_ids.contiguous();
  in.word = word_weight.contiguous();
  in.position = position_weight.contiguous();
  in.token_type = token_type_weight.contiguous();
  in.gamma = ln_weight.contiguous();
  in.beta = ln_bias.contiguous();
  in.tokens = input_ids.size(0);
  in.hidden = word_weight.size(1);
  return in;
}

// Raises IndexError naming the first index outside [0, limit), if there is one. `values` is on the CPU.
void check_range_on_host(const at::Tensor& values, const char* name, int64_t limit, const char* table) {
  const int64_t* v = values.data_ptr<int64_t>();
  const int64_t n = values.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(v[i] >= 0 && v[i] < limit, msg(kOp, ": ", name, "[", i, "] = ", v[i], " is out of range [0, ",
                                                     limit, ") (the ", table, " has ", limit, " rows)").c_str());
  }
}

void check_ranges_on_host(const Inputs& in) {
  check_range_on_host(in.ids, "input_ids", in.word.size(0), "word embedding table");
  check_range_on_host(in.positions, "position_ids", in.position.size(0), "position embedding table");
  check_range_on_host(in.types, "token_type_ids", in.token_type.size(0), "token type embedding table");
}

EmbeddingLayerNormArgs make_args(const Inputs& in, at::Tensor& out, double eps) {
  EmbeddingLayerNormArgs a;
  a.input_ids = in.ids.data_ptr<int64_t>();
  a.position_ids = in.positions.data_ptr<int64_t>();
  a.token_type_ids = in.types.data_ptr<int64_t>();
  a.word_weight = in.word.data_ptr();
  a.position_weight = in.position.data_ptr();
  a.token_type_weight = in.token_type.data_ptr();
  a.ln_weight = in.gamma.data_ptr();
  a.ln_bias = in.beta.data_ptr();
  a.out = out.data_ptr();
  a.tokens = in.tokens;
  a.hidden = in.hidden;
  a.vocab = in.word.size(0);
  a.max_positions = in.position.size(0);
  a.type_vocab = in.token_type.size(0);
  a.eps = static_cast<float>(eps);
  a.error_flag = nullptr;
  return a;
}

// ---------------------------------------------------------------------------------------------
// CPU: the arithmetic of the CUDA kernel (the sum of the three rows in fp32, in transformers' order;
// two-pass statistics), one token per iteration. The statistics accumulate in double here: a
// sequential fp32 sum over a 4096-wide row drifts by ~1e-5 at the output, where the GPU's tree
// reductions (and torch's cascade sums) stay near 1e-6.

template <typename T>
void embedding_layer_norm_cpu_typed(const EmbeddingLayerNormArgs& a) {
  const T* word = static_cast<const T*>(a.word_weight);
  const T* position = static_cast<const T*>(a.position_weight);
  const T* token_type = static_cast<const T*>(a.token_type_weight);
  const T* gamma = static_cast<const T*>(a.ln_weight);
  const T* beta = static_cast<const T*>(a.ln_bias);
  T* out = static_cast<T*>(a.out);
  const int64_t h = a.hidden;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  at::parallel_for(0, a.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(h);
    for (int64_t row = begin; row < end; ++row) {
      const T* w = word + a.input_ids[row] * h;
      const T* p = position + a.position_ids[row] * h;
      const T* t = token_type + a.token_type_ids[row] * h;
      double sum = 0.0;
      for (int64_t k = 0; k < h; ++k) {
        x[k] = (static_cast<float>(w[k]) + static_cast<float>(t[k])) + static_cast<float>(p[k]);
        sum += x[k];
      }
      const float mean = static_cast<float>(sum / static_cast<double>(h));
      double squares = 0.0;
      for (int64_t k = 0; k < h; ++k) {
        const double d = static_cast<double>(x[k]) - mean;
        squares += d * d;
      }
      const float rstd = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(h) + a.eps));
      T* o = out + row * h;
      for (int64_t k = 0; k < h; ++k)
        o[k] = static_cast<T>((x[k] - mean) * rstd * static_cast<float>(gamma[k]) + static_cast<float>(beta[k]));
    }
  });
}

at::Tensor embedding_layer_norm_cpu(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                    const at::Tensor& token_type_ids, const at::Tensor& word_weight,
                                    const at::Tensor& position_weight, const at::Tensor& token_type_weight,
                                    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                                    bool /*check_indices: the host check is cheap and keeps the CPU kernel safe*/) {
  Inputs in = check_inputs(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                           ln_weight, ln_bias);
  check_ranges_on_host(in);
  at::Tensor out = empty({in.tokens, in.hidden}, in.word.options());
  if (in.tokens == 0 || in.hidden == 0) return out;
  const EmbeddingLayerNormArgs a = make_args(in, out, eps);
  switch (in.kind) {
    case FloatKind::kFloat32: embedding_layer_norm_cpu_typed<float>(a); break;
    case FloatKind::kFloat16: embedding_layer_norm_cpu_typed<c10::Half>(a); break;
    case FloatKind::kBFloat16: embedding_layer_norm_cpu_typed<c10::BFloat16>(a); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// CUDA: the kernel never reads outside the tables; it flags bad indices in a device int that is
// read back here (one 4-byte copy, which waits for the kernel), except while a CUDA graph is being
// captured, where no host sync is allowed: then the offending rows are NaN and nothing is raised.

#ifdef FASTBERT_WITH_CUDA
at::Tensor embedding_layer_norm_cuda(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                     const at::Tensor& token_type_ids, const at::Tensor& word_weight,
                                     const at::Tensor& position_weight, const at::Tensor& token_type_weight,
                                     const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                                     bool check_indices) {
  Inputs in = check_inputs(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                           ln_weight, ln_bias);
  const DeviceScope device_scope(in.word.device().index());
  at::Tensor out = empty({in.tokens, in.hidden}, in.word.options());
  if (in.tokens == 0 || in.hidden == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(in.word.device().index()).stream();

  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  // check_indices=False: the caller validated the indices already (the model does, once per batch),
  // so skip the read-back and its sync. The kernel stays safe either way.
  const bool report = check_indices && capture == cudaStreamCaptureStatusNone;

  EmbeddingLayerNormArgs a = make_args(in, out, eps);
  at::Tensor flag;
  if (report) {
    flag = empty({1}, in.ids.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr<int>(), 0, sizeof(int), stream));
    a.error_flag = flag.data_ptr<int>();
  }
  C10_CUDA_CHECK(launch_embedding_layer_norm(in.kind, a, stream));
  if (report) {
    int bad = 0;
    c10::cuda::memcpy_and_sync(&bad, flag.data_ptr<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream);
    if (bad) {
      Inputs on_host = in;
      on_host.ids = in.ids.cpu();
      on_host.positions = in.positions.cpu();
      on_host.types = in.types.cpu();
      check_ranges_on_host(on_host);
      TORCH_CHECK(false,
                  msg(kOp, ": the kernel flagged an out-of-range index that the host check did not find").c_str());
    }
  }
  return out;
}
#endif

// ---------------------------------------------------------------------------------------------
// The Python module: build facts, and a probe for whether the current GPU can run the kernels.

PyObject* py_cuda_kernel_image_available(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
#ifdef FASTBERT_WITH_CUDA
  try {
    const DeviceScope device_scope(static_cast<c10::DeviceIndex>(device));
    const cudaError_t status = probe_kernel_image();
    if (status == cudaSuccess) Py_RETURN_TRUE;
    (void)cudaGetLastError();  // clear the (non-sticky) error
    Py_RETURN_FALSE;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_kernel_image_available", py_cuda_kernel_image_available, METH_O,
     "cuda_kernel_image_available(device_index) -> bool: whether that GPU can run the compiled kernels"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "fastbert._C",
    "fastbert's C++/CUDA extension; importing it registers torch.ops.fastbert.embedding_layer_norm.",
    -1,
    methods,
};

// The registrations are what TORCH_LIBRARY_FRAGMENT(fastbert, m) / TORCH_LIBRARY_IMPL(fastbert, CPU|CUDA, m)
// would do, run from PyInit__C instead of a static initializer: a registration error (say, a Python
// library that already defined fastbert::embedding_layer_norm) then becomes an ImportError that
// fastbert/_extension.py reports, where a static initializer's exception would abort the process
// inside dlopen. The libraries live for the rest of the process, as static ones would.
bool register_ops() {
  static bool registered = false;
  if (registered) return true;
  try {
    auto* def = new torch::Library(torch::Library::FRAGMENT, "fastbert", std::nullopt, __FILE__, __LINE__);
    def->set_python_module("fastbert._extension");
    def->def(
        "embedding_layer_norm(Tensor input_ids, Tensor position_ids, Tensor token_type_ids, Tensor word_weight, "
        "Tensor position_weight, Tensor token_type_weight, Tensor ln_weight, Tensor ln_bias, float eps, "
        "bool check_indices=True) -> Tensor");
    auto* cpu = new torch::Library(torch::Library::IMPL, "fastbert", c10::DispatchKey::CPU, __FILE__, __LINE__);
    cpu->impl("embedding_layer_norm", &embedding_layer_norm_cpu);
#ifdef FASTBERT_WITH_CUDA
    auto* cuda = new torch::Library(torch::Library::IMPL, "fastbert", c10::DispatchKey::CUDA, __FILE__, __LINE__);
    cuda->impl("embedding_layer_norm", &embedding_layer_norm_cuda);
#endif
  } catch (const c10::Error& e) {
    PyErr_Format(PyExc_ImportError, "fastbert._C could not register torch.ops.%s: %s", kOp, e.what_without_backtrace());
    return false;
  } catch (const std::exception& e) {
    PyErr_Format(PyExc_ImportError, "fastbert._C could not register torch.ops.%s: %s", kOp, e.what());
    return false;
  }
  registered = true;
  return true;
}

}  // namespace
}  // namespace fastbert

PyMODINIT_FUNC PyInit__C(void) {
  if (!fastbert::register_ops()) return nullptr;
  PyObject* m = PyModule_Create(&fastbert::module_def);
  if (m == nullptr) return nullptr;
#ifdef FASTBERT_WITH_CUDA
  const bool with_cuda = true;
  const char* archs = fastbert::compiled_cuda_archs();
  const int cuda_version = fastbert::compiled_cuda_runtime_version();
#else
  const bool with_cuda = false;
  const char* archs = "";
  const int cuda_version = 0;
#endif
  PyObject* torch_version =
      PyUnicode_FromFormat("%d.%d.%d", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  if (PyModule_AddObject(m, "with_cuda", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", archs) < 0 ||
      PyModule_AddIntConstant(m, "cuda_runtime_version", cuda_version) < 0 || torch_version == nullptr ||
      PyModule_AddObject(m, "torch_version", torch_version) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
