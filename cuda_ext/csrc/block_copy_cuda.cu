// CUDA block gather/scatter/copy over all layers in one launch, and a list of independent
// copies (the pieces of a region copy) in one launch. No torch headers here (see
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

// The CTA's threads copy vectors [begin, end) from src to dst, each thread issuing kUnroll
// loads before the matching stores.
template <typename VecT>
__device__ __forceinline__ void copy_range(const VecT* __restrict__ src, VecT* __restrict__ dst,
                                           int64_t begin, int64_t end) {
  const int64_t step = blockDim.x;
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

  for (int64_t t = blockIdx.y; t < num_tensors; t += gridDim.y) {
    VecT* pool = reinterpret_cast<VecT*>(table[t]) + block_id * block_vecs;
    VecT* pack = reinterpret_cast<VecT*>(packed) + (t * num_ids + j) * block_vecs;
    copy_range(gather ? pool : pack, gather ? pack : pool, begin, end);
  }
}

// Same grid as block_copy_kernel; CTA (j, c, t) copies chunk c of block sids[j] of source
// tensor t to block dids[j] of destination tensor t.
template <typename VecT>
__global__ void block_between_kernel(const int64_t* __restrict__ table, int64_t num_tensors,
                                     int64_t num_ids, int64_t block_vecs, int64_t chunk_vecs,
                                     int64_t chunks_per_block) {
  const int64_t j = blockIdx.x / chunks_per_block;
  const int64_t c = blockIdx.x % chunks_per_block;
  const int64_t src_id = table[2 * num_tensors + j];
  const int64_t dst_id = table[2 * num_tensors + num_ids + j];
  const int64_t begin = c * chunk_vecs;
  const int64_t end = begin + chunk_vecs < block_vecs ? begin + chunk_vecs : block_vecs;
  for (int64_t t = blockIdx.y; t < num_tensors; t += gridDim.y) {
    const VecT* src = reinterpret_cast<const VecT*>(table[t]) + src_id * block_vecs;
    VecT* dst = reinterpret_cast<VecT*>(table[num_tensors + t]) + dst_id * block_vecs;
    copy_range(src, dst, begin, end);
  }
}

template <typename VecT>
__device__ void copy_piece(const char* src, char* dst, int64_t nbytes) {
  copy_range(reinterpret_cast<const VecT*>(src), reinterpret_cast<VecT*>(dst), 0,
             nbytes / static_cast<int64_t>(sizeof(VecT)));
}

// One CTA per piece (the host cuts pieces to at most kChunkBytes, so CTAs stay balanced),
// striding when there are more pieces than CTAs. Each piece takes the widest access its two
// addresses and its size allow: the choice is uniform across the CTA, so no thread diverges.
__global__ void piece_copy_kernel(const int64_t* __restrict__ pieces, int64_t num_pieces) {
  for (int64_t p = blockIdx.x; p < num_pieces; p += gridDim.x) {
    char* dst = reinterpret_cast<char*>(pieces[3 * p]);
    const char* src = reinterpret_cast<const char*>(pieces[3 * p + 1]);
    const int64_t nbytes = pieces[3 * p + 2];
    const uint64_t mixed = reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src) |
                           static_cast<uint64_t>(nbytes);
    if ((mixed & 15) == 0) {
      copy_piece<uint4>(src, dst, nbytes);
    } else if ((mixed & 7) == 0) {
      copy_piece<uint2>(src, dst, nbytes);
    } else if ((mixed & 3) == 0) {
      copy_piece<uint32_t>(src, dst, nbytes);
    } else if ((mixed & 1) == 0) {
      copy_piece<uint16_t>(src, dst, nbytes);
    } else {
      copy_piece<uint8_t>(src, dst, nbytes);
    }
  }
}

// The grid shared by the gather/scatter and block-to-block kernels (see above).
struct BlockGrid {
  dim3 grid;
  unsigned threads = 0;
  int64_t block_vecs = 0;
  int64_t chunk_vecs = 0;
  int64_t chunks_per_block = 0;
  bool ok = false;
};

template <typename VecT>
BlockGrid block_grid(int64_t num_tensors, int64_t num_ids, int64_t block_nbytes) {
  BlockGrid g;
  g.block_vecs = block_nbytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t max_chunk_vecs = kChunkBytes / static_cast<int64_t>(sizeof(VecT));
  g.chunks_per_block = (g.block_vecs + max_chunk_vecs - 1) / max_chunk_vecs;
  g.chunk_vecs = (g.block_vecs + g.chunks_per_block - 1) / g.chunks_per_block;
  int64_t threads = (g.chunk_vecs + kUnroll - 1) / kUnroll;
  threads = (threads + 31) / 32 * 32;
  threads = threads < kMinThreads ? kMinThreads : threads;
  threads = threads > kMaxThreads ? kMaxThreads : threads;
  g.threads = static_cast<unsigned>(threads);
  const int64_t grid_x = num_ids * g.chunks_per_block;
  if (grid_x > 0x7fffffffLL) return g;
  const int64_t grid_y = num_tensors < kMaxGridY ? num_tensors : kMaxGridY;
  g.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  g.ok = true;
  return g;
}

template <typename VecT>
cudaError_t launch(const int64_t* table, int64_t num_tensors, int64_t num_ids,
                   int64_t block_nbytes, void* packed, bool gather, cudaStream_t stream) {
  const BlockGrid g = block_grid<VecT>(num_tensors, num_ids, block_nbytes);
  if (!g.ok) return cudaErrorInvalidConfiguration;
  block_copy_kernel<VecT><<<g.grid, g.threads, 0, stream>>>(
      table, num_tensors, num_ids, g.block_vecs, g.chunk_vecs, g.chunks_per_block,
      static_cast<char*>(packed), gather);
  return cudaGetLastError();
}

template <typename VecT>
cudaError_t launch_between(const int64_t* table, int64_t num_tensors, int64_t num_ids,
                           int64_t block_nbytes, cudaStream_t stream) {
  const BlockGrid g = block_grid<VecT>(num_tensors, num_ids, block_nbytes);
  if (!g.ok) return cudaErrorInvalidConfiguration;
  block_between_kernel<VecT><<<g.grid, g.threads, 0, stream>>>(
      table, num_tensors, num_ids, g.block_vecs, g.chunk_vecs, g.chunks_per_block);
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

extern "C" const char* kvhandoff_block_between_cuda(const int64_t* table, int64_t num_tensors,
                                                    int64_t num_ids, int64_t block_nbytes,
                                                    int vec_nbytes, void* stream) {
  if (num_tensors <= 0 || num_ids <= 0 || block_nbytes <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (vec_nbytes) {
    case 16: err = launch_between<uint4>(table, num_tensors, num_ids, block_nbytes, s); break;
    case 8: err = launch_between<uint2>(table, num_tensors, num_ids, block_nbytes, s); break;
    case 4: err = launch_between<uint32_t>(table, num_tensors, num_ids, block_nbytes, s); break;
    case 2: err = launch_between<uint16_t>(table, num_tensors, num_ids, block_nbytes, s); break;
    case 1: err = launch_between<uint8_t>(table, num_tensors, num_ids, block_nbytes, s); break;
    default: return "kvhandoff_block_between_cuda: vec_nbytes must be 16, 8, 4, 2 or 1";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

extern "C" const char* kvhandoff_piece_copy_cuda(const int64_t* pieces, int64_t num_pieces,
                                                 void* stream) {
  if (num_pieces <= 0) return nullptr;
  // Pieces are at most kChunkBytes: kMaxThreads threads of kUnroll 16-byte vectors cover one
  // in a few passes; the grid strides beyond 2^20 pieces.
  const int64_t grid = num_pieces < (1 << 20) ? num_pieces : (1 << 20);
  piece_copy_kernel<<<static_cast<unsigned>(grid), kMaxThreads, 0,
                      static_cast<cudaStream_t>(stream)>>>(pieces, num_pieces);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
