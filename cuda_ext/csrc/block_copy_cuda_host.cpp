// Host side of the CUDA block copy: builds the pointer table, moves it to the GPU and calls
// the launcher in block_copy_cuda.cu. Compiled only with KVHANDOFF_WITH_CUDA; it includes the
// light ATen/c10 headers only, so it can be syntax-checked quickly on a machine without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "block_copy.h"
#include "block_copy_host.h"

namespace kvhandoff {

void copy_blocks_cuda(const std::vector<char*>& bases, const int64_t* ids, int64_t num_ids,
                      int64_t block_nbytes, char* packed, c10::Device device, bool gather) {
  const c10::cuda::CUDAGuard device_guard(device);
  const auto num_tensors = static_cast<int64_t>(bases.size());
  // One pinned host table (tensor base addresses, then block ids) and one asynchronous copy:
  // the caching host allocator keeps the pinned block alive until the copy has run, and the
  // device table is freed into the caching allocator in stream order after the kernel.
  at::Tensor host = at::empty({num_tensors + num_ids},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  uintptr_t mixed = reinterpret_cast<uintptr_t>(packed) | static_cast<uintptr_t>(block_nbytes);
  for (int64_t t = 0; t < num_tensors; ++t) {
    h[t] = reinterpret_cast<int64_t>(bases[t]);
    mixed |= reinterpret_cast<uintptr_t>(bases[t]);
  }
  std::memcpy(h + num_tensors, ids, static_cast<size_t>(num_ids) * sizeof(int64_t));
  // The widest access every address and the block size are aligned to: 16-byte vectors for
  // any pool from the caching allocator with a block size that is a multiple of 16.
  int vec_nbytes = 16;
  while (vec_nbytes > 1 && (mixed & static_cast<uintptr_t>(vec_nbytes - 1)) != 0) {
    vec_nbytes /= 2;
  }
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* err = kvhandoff_block_copy_cuda(table.data_ptr<int64_t>(), num_tensors, num_ids,
                                              block_nbytes, packed, vec_nbytes, gather ? 1 : 0,
                                              stream);
  TORCH_CHECK(err == nullptr, "block copy kernel launch failed: ", err);
}

}  // namespace kvhandoff
