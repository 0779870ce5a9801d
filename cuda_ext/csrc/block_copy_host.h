// Internal C++ interface between the torch binding (block_copy.cpp) and the host side of the
// CUDA path (block_copy_cuda_host.cpp). Kept apart from block_copy.h, which is plain C for nvcc.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

namespace kvhandoff {

// Queues one kernel launch on the current stream of `device` that copies blocks `ids` of
// every tensor (base addresses `bases`) to (gather) or from (scatter) the packed buffer.
// Arguments are already checked by the binding. Raises c10::Error if the launch fails.
void copy_blocks_cuda(const std::vector<char*>& bases, const int64_t* ids, int64_t num_ids,
                      int64_t block_nbytes, char* packed, c10::Device device, bool gather);

// Queues one kernel launch that copies block sids[j] of every source tensor (base addresses
// `src`) to block dids[j] of the matching destination tensor (`dst`), j < num_ids.
void copy_between_cuda(const std::vector<char*>& src, const int64_t* sids,
                       const std::vector<char*>& dst, const int64_t* dids, int64_t num_ids,
                       int64_t block_nbytes, c10::Device device);

// Queues one kernel launch that performs every copy of `pieces`, a list of (destination
// address, source address, nbytes) triples on `device`.
void copy_pieces_cuda(const std::vector<int64_t>& pieces, c10::Device device);

}  // namespace kvhandoff
