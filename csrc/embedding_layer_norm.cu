// Embedding gather-sum + LayerNorm over packed tokens, in one pass over memory.
//
//   out[t, :] = LayerNorm(word[ids[t]] + token_type[types[t]] + position[positions[t]]) * gamma + beta
//
// Layout of the work: blockDim.x threads share one token row (a multiple of 32, so a warp never
// spans two rows), blockDim.y rows per block. Each thread keeps its part of the row in registers
// (up to kItems vectors), so the tables are read once and the output written once. The sum and the
// statistics are fp32 whatever the storage type; the variance is computed in a second pass over the
// registers (mean first, then the mean of squared deviations), not as E[x^2] - mean^2.
//
// Vectorized path: 16-byte loads and stores when hidden is a multiple of 16 / sizeof(T) and every
// table is 16-byte aligned (384, 768, 1024, 4096 in any dtype; 312 too). Otherwise the same kernel
// with one element per access (97, odd sizes, misaligned views). Rows too long for the registers
// (more than 1024 threads x kItems vectors) take a loop that re-reads the tables from L2.
//
// Out-of-range ids, positions or types are never dereferenced: the row is written as NaN and
// *error_flag is set, which the host reads back and turns into an exception.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "embedding_layer_norm.h"

namespace fastbert {
namespace {

constexpr int kItems = 4;          // vectors per thread kept in registers
constexpr int kMaxThreadsX = 1024;  // threads per row, at most
constexpr int kThreadsPerBlock = 128;  // rows are packed into blocks of about this many threads

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// N consecutive elements moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of `x` over the blockDim.x threads of this thread's row. Called by every thread of the block
// (it may synchronize the block); `scratch` holds one float per warp of the block (at most 32).
__device__ __forceinline__ float row_sum(float x, float* scratch) {
  x = warp_sum(x);
  if (blockDim.x == 32) return x;  // uniform across the block
  const int warps_per_row = blockDim.x / 32;
  const int warp = (threadIdx.y * blockDim.x + threadIdx.x) / 32;
  if ((threadIdx.x & 31) == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  const int first = threadIdx.y * warps_per_row;
  for (int w = 0; w < warps_per_row; ++w) total += scratch[first + w];
  return total;
}

struct RowIndex {
  int64_t id, position, type;
  bool valid;  // a real token whose three indices are inside their tables
};

__device__ __forceinline__ RowIndex load_row_index(const EmbeddingLayerNormArgs& a, int64_t row, bool in_rows) {
  RowIndex r{0, 0, 0, false};
  if (!in_rows) return r;
  const int64_t id = a.input_ids[row], pos = a.position_ids[row], type = a.token_type_ids[row];
  // Unsigned comparison: negative values become huge and fail too.
  r.valid = static_cast<uint64_t>(id) < static_cast<uint64_t>(a.vocab) &&
            static_cast<uint64_t>(pos) < static_cast<uint64_t>(a.max_positions) &&
            static_cast<uint64_t>(type) < static_cast<uint64_t>(a.type_vocab);
  if (r.valid) {
    r.id = id;
    r.position = pos;
    r.type = type;
  } else if (a.error_flag != nullptr && threadIdx.x == 0) {
    *a.error_flag = 1;  // every writer stores the same value: no atomics needed
  }
  return r;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreadsX) embedding_layer_norm_kernel(EmbeddingLayerNormArgs a) {
  using P = Pack<T, VEC>;
  using C = Convert<T>;
  __shared__ float scratch_mean[32];
  __shared__ float scratch_var[32];

  const int hidden = static_cast<int>(a.hidden);
  const int nvec = hidden / VEC;
  const float inv_hidden = 1.f / static_cast<float>(hidden);
  const T* word = static_cast<const T*>(a.word_weight);
  const T* position = static_cast<const T*>(a.position_weight);
  const T* token_type = static_cast<const T*>(a.token_type_weight);
  const P* gamma = reinterpret_cast<const P*>(a.ln_weight);
  const P* beta = reinterpret_cast<const P*>(a.ln_bias);

  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * blockDim.y; first_row < a.tokens;
       first_row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool in_rows = row < a.tokens;
    const RowIndex r = load_row_index(a, row, in_rows);

    float x[kItems][VEC];
    float sum = 0.f;
    const P* w = reinterpret_cast<const P*>(word + r.id * a.hidden);
    const P* p = reinterpret_cast<const P*>(position + r.position * a.hidden);
    const P* t = reinterpret_cast<const P*>(token_type + r.type * a.hidden);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (r.valid && v < nvec) {
        const P wv = w[v], tv = t[v], pv = p[v];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // The order of transformers: (word + token_type) + position.
          x[i][j] = (C::load(wv.v[j]) + C::load(tv.v[j])) + C::load(pv.v[j]);
          sum += x[i][j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[i][j] = 0.f;
      }
    }
    const float mean = row_sum(sum, scratch_mean) * inv_hidden;

    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (r.valid && v < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = x[i][j] - mean;
          squares += d * d;
        }
      }
    }
    const float rstd = rsqrtf(row_sum(squares, scratch_var) * inv_hidden + a.eps);

    if (in_rows) {
      P* out = reinterpret_cast<P*>(static_cast<T*>(a.out) + row * a.hidden);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < nvec) {
          P o;
          if (r.valid) {
            const P g = gamma[v], b = beta[v];
#pragma unroll
            for (int j = 0; j < VEC; ++j) o.v[j] = C::store((x[i][j] - mean) * rstd * C::load(g.v[j]) + C::load(b.v[j]));
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) o.v[j] = C::store(NAN);
          }
          out[v] = o;
        }
      }
    }
    // No barrier needed before the next row group: its first write to scratch_mean comes after the
    // barrier in the variance reduction, which every thread passes only after reading scratch_mean.
  }
}

// Rows longer than the register budget: three passes, the tables re-read from L2 each time.
template <typename T>
__global__ void __launch_bounds__(kMaxThreadsX) embedding_layer_norm_long_rows_kernel(EmbeddingLayerNormArgs a) {
  using C = Convert<T>;
  __shared__ float scratch_mean[32];
  __shared__ float scratch_var[32];
  const T* word = static_cast<const T*>(a.word_weight);
  const T* position = static_cast<const T*>(a.position_weight);
  const T* token_type = static_cast<const T*>(a.token_type_weight);
  const T* gamma = static_cast<const T*>(a.ln_weight);
  const T* beta = static_cast<const T*>(a.ln_bias);
  const float inv_hidden = 1.f / static_cast<float>(a.hidden);

  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * blockDim.y; first_row < a.tokens;
       first_row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool in_rows = row < a.tokens;
    const RowIndex r = load_row_index(a, row, in_rows);
    const T* w = word + r.id * a.hidden;
    const T* p = position + r.position * a.hidden;
    const T* t = token_type + r.type * a.hidden;

    float sum = 0.f;
    if (r.valid)
      for (int64_t k = threadIdx.x; k < a.hidden; k += blockDim.x)
        sum += (C::load(w[k]) + C::load(t[k])) + C::load(p[k]);
    const float mean = row_sum(sum, scratch_mean) * inv_hidden;
    float squares = 0.f;
    if (r.valid)
      for (int64_t k = threadIdx.x; k < a.hidden; k += blockDim.x) {
        const float d = (C::load(w[k]) + C::load(t[k])) + C::load(p[k]) - mean;
        squares += d * d;
      }
    const float rstd = rsqrtf(row_sum(squares, scratch_var) * inv_hidden + a.eps);
    if (in_rows) {
      T* out = static_cast<T*>(a.out) + row * a.hidden;
      for (int64_t k = threadIdx.x; k < a.hidden; k += blockDim.x) {
        float y = NAN;
        if (r.valid) {
          const float xk = (C::load(w[k]) + C::load(t[k])) + C::load(p[k]);
          y = (xk - mean) * rstd * C::load(gamma[k]) + C::load(beta[k]);
        }
        out[k] = C::store(y);
      }
    }
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int round_up(int64_t x, int64_t m) { return static_cast<int>((x + m - 1) / m * m); }

// Threads per row and rows per block for rows of `nvec` accesses.
inline dim3 block_shape(int64_t nvec, int items) {
  int64_t per_thread = (nvec + items - 1) / items;
  int threads_x = round_up(per_thread < 32 ? 32 : per_thread, 32);
  if (threads_x > kMaxThreadsX) threads_x = kMaxThreadsX;
  int rows = kThreadsPerBlock / threads_x;
  return dim3(threads_x, rows < 1 ? 1 : rows, 1);
}

inline dim3 grid_shape(int64_t tokens, const dim3& block) {
  int64_t blocks = (tokens + block.y - 1) / block.y;
  const int64_t max_blocks = 0x7fffffff;  // the kernels loop over the rest
  return dim3(static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks), 1, 1);
}

template <typename T>
cudaError_t launch_typed(const EmbeddingLayerNormArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = a.hidden % kVec == 0 && aligned16(a.word_weight) && aligned16(a.position_weight) &&
                          aligned16(a.token_type_weight) && aligned16(a.ln_weight) && aligned16(a.ln_bias) &&
                          aligned16(a.out);
  const int64_t nvec = vectorized ? a.hidden / kVec : a.hidden;
  if (nvec <= static_cast<int64_t>(kMaxThreadsX) * kItems) {
    const dim3 block = block_shape(nvec, kItems);
    const dim3 grid = grid_shape(a.tokens, block);
    if (vectorized)
      embedding_layer_norm_kernel<T, kVec><<<grid, block, 0, stream>>>(a);
    else
      embedding_layer_norm_kernel<T, 1><<<grid, block, 0, stream>>>(a);
  } else {
    const dim3 block(kMaxThreadsX, 1, 1);
    embedding_layer_norm_long_rows_kernel<T><<<grid_shape(a.tokens, block), block, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

#define FASTBERT_STRINGIFY_(...) #__VA_ARGS__
#define FASTBERT_STRINGIFY(...) FASTBERT_STRINGIFY_(__VA_ARGS__)

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FASTBERT_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int compiled_cuda_runtime_version() { return CUDART_VERSION; }

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, embedding_layer_norm_kernel<float, 4>);
}

cudaError_t launch_embedding_layer_norm(FloatKind kind, const EmbeddingLayerNormArgs& args, cudaStream_t stream) {
  if (args.tokens == 0 || args.hidden == 0) return cudaSuccess;
  switch (kind) {
    case FloatKind::kFloat32:
      return launch_typed<float>(args, stream);
    case FloatKind::kFloat16:
      return launch_typed<__half>(args, stream);
    case FloatKind::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastbert
