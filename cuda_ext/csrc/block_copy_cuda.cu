// CUDA block gather/scatter over all layers in one launch. No torch headers here (see
// block_copy.h); the binding passes raw device pointers and the current stream.
#include <cuda_runtime.h>
#include <stdint.h>

#include "block_copy.h"

namespace {

// Each CTA copies at most this many bytes, so a huge block still spreads over several SMs
// while a typical 2-64 KiB block is one CTA with no chunk arithmetic to speak of.
constexpr int64_t kChunkBytes = 64 * 1024;
// Loads issued per thread before the matching stores: keeps several 16-byte loads in flight
// per thread, which a plain copy loop would serialize.
constexpr int kUnroll = 4;
constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 64;
// gridDim.y is limited to 65535; more tensors than this stride over blockIdx.y.
constexpr int64_t kMaxGridY = 65535;

// Launch grid:
//   gridDim.x = num_ids * chunks_per_block   (blockIdx.x -> block j, chunk c of that block)
//   gridDim.y = min(num_tensors, 65535)      (blockIdx.y -> tensor t, strided if more)
//   blockDim.x = threads in [64, 256], sized so each thread moves about kUnroll vectors of a
//                chunk per pass
// CTA (j, c, t) copies bytes [c * chunk, (c + 1) * chunk) of block ids[j] of tensor t between
// the pool (tensor base + ids[j] * block_nbytes) and the packed buffer
// (packed + (t * num_ids + j) * block_nbytes), with VecT-wide (up to 16-byte) accesses.
template <typename VecT>
__global__ void block_copy_kernel(const int64_t* __restrict__ table, int64_t num_tensors,
                                  int64_t num_ids, int64_t block_vecs, int64_t chunk_vecs,
                                  int64_t chunks_per_block, char* __restrict__ packed,
                                  bool gather) {
  const int64_t j = blockIdx.x / chunks_per_block;
  const int64_t c = blockIdx.x % chunks_per_block;
  const int64_t block_id = table[num_tensors + j];
  const int64_t begin = c * chunk_vecs;
  const int64_t end = begin + chunk_vecs < block_vecs ? begin + chunk_vecs : block_vecs;
  const int64_t step = blockDim.x;

  for (int64_t t = blockIdx.y; t < num_tensors; t += gridDim.y) {
    VecT* pool = reinterpret_cast<VecT*>(table[t]) + block_id * block_vecs;
    VecT* pack = reinterpret_cast<VecT*>(packed) + (t * num_ids + j) * block_vecs;
    const VecT* src = gather ? pool : pack;
    VecT* dst = gather ? pack : pool;
    for (int64_t base = begin + threadIdx.x; base < end; base += step * kUnroll) {
      VecT v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * step;
        if (i < end) v[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * step;
        if (i < end) dst[i] = v[u];
      }
    }
  }
}

template <typename VecT>
cudaError_t launch(const int64_t* table, int64_t num_tensors, int64_t num_ids,
                   int64_t block_nbytes, void* packed, bool gather, cudaStream_t stream) {
  const int64_t block_vecs = block_nbytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t max_chunk_vecs = kChunkBytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t chunks_per_block = (block_vecs + max_chunk_vecs - 1) / max_chunk_vecs;
  const int64_t chunk_vecs = (block_vecs + chunks_per_block - 1) / chunks_per_block;
  int64_t threads = (chunk_vecs + kUnroll - 1) / kUnroll;
  threads = (threads + 31) / 32 * 32;
  threads = threads < kMinThreads ? kMinThreads : threads;
  threads = threads > kMaxThreads ? kMaxThreads : threads;
  const int64_t grid_x = num_ids * chunks_per_block;
  if (grid_x > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const int64_t grid_y = num_tensors < kMaxGridY ? num_tensors : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  block_copy_kernel<VecT><<<grid, static_cast<unsigned>(threads), 0, stream>>>(
      table, num_tensors, num_ids, block_vecs, chunk_vecs, chunks_per_block,
      static_cast<char*>(packed), gather);
  return cudaGetLastError();
}

}  // namespace

extern "C" const char* kvhandoff_block_copy_cuda(const int64_t* table, int64_t num_tensors,
                                                 int64_t num_ids, int64_t block_nbytes,
                                                 void* packed, int vec_nbytes, int gather,
                                                 void* stream) {
  if (num_tensors <= 0 || num_ids <= 0 || block_nbytes <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool g = gather != 0;
  cudaError_t err;
  switch (vec_nbytes) {
    case 16: err = launch<uint4>(table, num_tensors, num_ids, block_nbytes, packed, g, s); break;
    case 8: err = launch<uint2>(table, num_tensors, num_ids, block_nbytes, packed, g, s); break;
    case 4: err = launch<uint32_t>(table, num_tensors, num_ids, block_nbytes, packed, g, s); break;
    case 2: err = launch<uint16_t>(table, num_tensors, num_ids, block_nbytes, packed, g, s); break;
    case 1: err = launch<uint8_t>(table, num_tensors, num_ids, block_nbytes, packed, g, s); break;
    default: return "kvhandoff_block_copy_cuda: vec_nbytes must be 16, 8, 4, 2 or 1";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
