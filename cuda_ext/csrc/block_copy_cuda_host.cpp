// Host side of the CUDA block copy: builds the pointer tables, moves them to the GPU and calls
// the launchers in block_copy_cuda.cu. Compiled only with KVHANDOFF_WITH_CUDA; it includes the
// light ATen/c10 headers only, so it can be syntax-checked quickly on a machine without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>

#include "block_copy.h"
#include "block_copy_host.h"

namespace kvhandoff {

namespace {

// One pinned host table of `n` int64 and one asynchronous copy to `device`: the caching host
// allocator keeps the pinned block alive until the copy has run, and the device table is freed
// into the caching allocator in stream order after the kernel.
at::Tensor pinned_table(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
}

// The widest access (16, 8, 4, 2 or 1 bytes) that `mixed`, the OR of every address and size
// a kernel will use, is aligned to.
int widest_access(uintptr_t mixed) {
  int vec_nbytes = 16;
  while (vec_nbytes > 1 && (mixed & static_cast<uintptr_t>(vec_nbytes - 1)) != 0) {
    vec_nbytes /= 2;
  }
  return vec_nbytes;
}

cudaStream_t current_stream(c10::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// A CTA of the piece kernel copies at most this much, so one long region (a run of adjacent
// blocks) spreads over many SMs; it matches kChunkBytes of block_copy_cuda.cu.
constexpr int64_t kPieceBytes = 64 * 1024;

}  // namespace

void copy_blocks_cuda(const std::vector<char*>& bases, const int64_t* ids, int64_t num_ids,
                      int64_t block_nbytes, char* packed, c10::Device device, bool gather) {
  const c10::cuda::CUDAGuard device_guard(device);
  const auto num_tensors = static_cast<int64_t>(bases.size());
  // One pinned host table (tensor base addresses, then block ids) and one asynchronous copy:
  // the caching host allocator keeps the pinned block alive until the copy has run, and the
  // device table is freed into the caching allocator in stream order after the kernel.
  at::Tensor host = pinned_table(num_tensors + num_ids);
  int64_t* h = host.data_ptr<int64_t>();
  uintptr_t mixed = reinterpret_cast<uintptr_t>(packed) | static_cast<uintptr_t>(block_nbytes);
  for (int64_t t = 0; t < num_tensors; ++t) {
    h[t] = reinterpret_cast<int64_t>(bases[t]);
    mixed |= reinterpret_cast<uintptr_t>(bases[t]);
  }
  std::memcpy(h + num_tensors, ids, static_cast<size_t>(num_ids) * sizeof(int64_t));
  // The widest access every address and the block size are aligned to: 16-byte vectors for
  // any pool from the caching allocator with a block size that is a multiple of 16.
  const int vec_nbytes = widest_access(mixed);
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const cudaStream_t stream = current_stream(device);
  const char* err = kvhandoff_block_copy_cuda(table.data_ptr<int64_t>(), num_tensors, num_ids,
                                              block_nbytes, packed, vec_nbytes, gather ? 1 : 0,
                                              stream);
  TORCH_CHECK(err == nullptr, "block copy kernel launch failed: ", err);
}

void copy_between_cuda(const std::vector<char*>& src, const int64_t* sids,
                       const std::vector<char*>& dst, const int64_t* dids, int64_t num_ids,
                       int64_t block_nbytes, c10::Device device) {
  const c10::cuda::CUDAGuard device_guard(device);
  const auto num_tensors = static_cast<int64_t>(src.size());
  at::Tensor host = pinned_table(2 * num_tensors + 2 * num_ids);
  int64_t* h = host.data_ptr<int64_t>();
  uintptr_t mixed = static_cast<uintptr_t>(block_nbytes);
  for (int64_t t = 0; t < num_tensors; ++t) {
    h[t] = reinterpret_cast<int64_t>(src[t]);
    h[num_tensors + t] = reinterpret_cast<int64_t>(dst[t]);
    mixed |= reinterpret_cast<uintptr_t>(src[t]) | reinterpret_cast<uintptr_t>(dst[t]);
  }
  const size_t ids_nbytes = static_cast<size_t>(num_ids) * sizeof(int64_t);
  std::memcpy(h + 2 * num_tensors, sids, ids_nbytes);
  std::memcpy(h + 2 * num_tensors + num_ids, dids, ids_nbytes);
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const char* err = kvhandoff_block_between_cuda(table.data_ptr<int64_t>(), num_tensors,
                                                 num_ids, block_nbytes,
                                                 widest_access(mixed), current_stream(device));
  TORCH_CHECK(err == nullptr, "block copy kernel launch failed: ", err);
}

void copy_pieces_cuda(const std::vector<int64_t>& pieces, c10::Device device) {
  const c10::cuda::CUDAGuard device_guard(device);
  int64_t num_pieces = 0;
  for (size_t p = 2; p < pieces.size(); p += 3) {
    num_pieces += (pieces[p] + kPieceBytes - 1) / kPieceBytes;
  }
  if (num_pieces == 0) return;
  at::Tensor host = pinned_table(3 * num_pieces);
  int64_t* h = host.data_ptr<int64_t>();
  for (size_t p = 0; p + 2 < pieces.size(); p += 3) {
    for (int64_t offset = 0; offset < pieces[p + 2]; offset += kPieceBytes) {
      *h++ = pieces[p] + offset;
      *h++ = pieces[p + 1] + offset;
      *h++ = std::min(kPieceBytes, pieces[p + 2] - offset);
    }
  }
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const char* err = kvhandoff_piece_copy_cuda(table.data_ptr<int64_t>(), num_pieces,
                                              current_stream(device));
  TORCH_CHECK(err == nullptr, "region copy kernel launch failed: ", err);
}

}  // namespace kvhandoff
