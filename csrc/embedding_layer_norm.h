// Interface between the host glue (ops.cpp, compiled by the C++ compiler against ATen) and the CUDA
// kernels (embedding_layer_norm.cu, compiled by nvcc against the CUDA runtime only). Keeping ATen out
// of the .cu file keeps the build short: nvcc parses it once per GPU architecture.
#pragma once

#include <cstdint>

#ifdef FASTBERT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastbert {

// Storage type of the tables, the LayerNorm parameters and the output (all the same).
enum class FloatKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One call: out[t, :] = LayerNorm(word[ids[t]] + token_type[types[t]] + position[positions[t]]).
// Every table is a contiguous [rows, hidden] matrix; ids, positions and types are [tokens] int64.
struct EmbeddingLayerNormArgs {
  const int64_t* input_ids;
  const int64_t* position_ids;
  const int64_t* token_type_ids;
  const void* word_weight;        // [vocab, hidden]
  const void* position_weight;    // [max_positions, hidden]
  const void* token_type_weight;  // [type_vocab, hidden]
  const void* ln_weight;          // [hidden]
  const void* ln_bias;            // [hidden]
  void* out;                      // [tokens, hidden]
  int64_t tokens;
  int64_t hidden;
  int64_t vocab;
  int64_t max_positions;
  int64_t type_vocab;
  float eps;
  // Set to 1 by the kernel when some token's id, position or type is outside its table (that row of
  // `out` is then NaN and no table is read out of bounds). May be null (no report, e.g. while a CUDA
  // graph is being captured).
  int* error_flag;
};

#ifdef FASTBERT_WITH_CUDA
// Enqueues the kernel on `stream`; returns the launch status (cudaSuccess when it was enqueued).
cudaError_t launch_embedding_layer_norm(FloatKind kind, const EmbeddingLayerNormArgs& args, cudaStream_t stream);

// cudaSuccess when the current device can run these kernels (a cubin or PTX for it is in the binary),
// cudaErrorNoKernelImageForDevice when it cannot.
cudaError_t probe_kernel_image();

// The GPU architectures nvcc compiled for, as nvcc's __CUDA_ARCH_LIST__ ("800,900,1200").
const char* compiled_cuda_archs();

// CUDART_VERSION of the toolkit the kernels were compiled with (13000 for 13.0).
int compiled_cuda_runtime_version();
#endif

}  // namespace fastbert
