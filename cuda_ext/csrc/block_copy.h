// The boundary between the torch binding (block_copy.cpp) and the CUDA kernel
// (block_copy_cuda.cu). Plain C types only: the .cu file includes no torch header, so
// `nvcc -c block_copy_cuda.cu` checks it in seconds on any machine with nvcc, GPU or not.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Copies blocks between the paged pool and a packed buffer on the GPU, all tensors at once,
// in one kernel launch on `stream` (a cudaStream_t). Returns NULL on success, otherwise the
// CUDA error string of the launch.
//
//   table         device memory, int64[num_tensors + num_ids]: the base address of every
//                 tensor (layer K/V), then the block ids (already range-checked by the caller)
//   block_nbytes  bytes of one block of one tensor
//   packed        device address of the packed buffer, tensor-major:
//                 packed[(t * num_ids + j) * block_nbytes ...] <-> tensor t, block ids[j]
//   vec_nbytes    16, 8, 4, 2 or 1: the widest access that every base address, `packed` and
//                 `block_nbytes` are aligned to (the caller computes it)
//   gather        nonzero: pool -> packed; zero: packed -> pool (scatter)
const char* kvhandoff_block_copy_cuda(const int64_t* table, int64_t num_tensors,
                                      int64_t num_ids, int64_t block_nbytes, void* packed,
                                      int vec_nbytes, int gather, void* stream);

// Copies blocks between two sets of tensors in one launch: block sids[j] of source tensor t to
// block dids[j] of destination tensor t.
//
//   table         device memory, int64[2 * num_tensors + 2 * num_ids]: the source tensors'
//                 base addresses, the destination tensors', then sids, then dids
//   vec_nbytes    the widest access every base address and `block_nbytes` are aligned to
const char* kvhandoff_block_between_cuda(const int64_t* table, int64_t num_tensors,
                                         int64_t num_ids, int64_t block_nbytes, int vec_nbytes,
                                         void* stream);

// Performs a list of independent copies in one launch.
//
//   pieces        device memory, int64[3 * num_pieces]: (destination address, source
//                 address, nbytes) of each copy; the copies must not overlap
//   Each piece picks the widest access its own two addresses and size are aligned to.
const char* kvhandoff_piece_copy_cuda(const int64_t* pieces, int64_t num_pieces,
                                      void* stream);

#ifdef __cplusplus
}
#endif
