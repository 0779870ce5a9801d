// Torch binding of the block copy: checks, the CPU kernels, and the calls into the CUDA path
// (block_copy_cuda_host.cpp + block_copy_cuda.cu, linked only when KVHANDOFF_WITH_CUDA is
// defined). Three copies: gather (blocks -> packed buffer), scatter (packed buffer -> blocks),
// copy_blocks (blocks of one set of layers -> blocks of another, no buffer in between), and
// copy_regions (one list of byte regions -> another, the stream cut at different places).
//
// Every check that the Python side makes (kvhandoff/cuda_ext/_checks.py) is repeated here
// before any byte moves; a failure raises a plain RuntimeError and the Python caller re-runs
// its own checks to raise the typed error. Checking here keeps the per-call cost free of a
// Python loop over the layers.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "block_copy_host.h"

namespace {

// Below this many bytes per parallel task one thread copies alone: waking the pool costs
// more than the copy saves.
constexpr int64_t kGrainBytes = 128 * 1024;
// A block is split into chunks no smaller than this, and only when there are too few
// (tensor, block) pairs to give every thread several tasks (few, large blocks).
constexpr int64_t kMinChunkBytes = 64 * 1024;
constexpr int64_t kTasksPerThread = 4;

struct Plan {
  std::vector<char*> bases;  // base address of every tensor
  const int64_t* ids = nullptr;
  int64_t num_ids = 0;
  int64_t block_nbytes = 0;
  int64_t needed = 0;  // bytes of the packed buffer this call uses
  char* packed = nullptr;
  at::Device device = at::kCPU;
};

// Checks one layer list (non-empty, one dtype/device/shape, contiguous); returns the bytes of
// one block of one tensor.
int64_t check_layers(const std::vector<at::Tensor>& layers) {
  TORCH_CHECK(!layers.empty(), "layers is empty");
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() >= 1, "layers[0] must have at least 1 dimension");
  for (size_t i = 0; i < layers.size(); ++i) {
    const at::Tensor& layer = layers[i];
    TORCH_CHECK(layer.scalar_type() == first.scalar_type(), "layers[", i, "] dtype differs");
    TORCH_CHECK(layer.device() == first.device(), "layers[", i, "] device differs");
    TORCH_CHECK(layer.sizes() == first.sizes(), "layers[", i, "] shape differs");
    TORCH_CHECK(layer.is_contiguous(), "layers[", i, "] is not contiguous");
  }
  int64_t block_elems = 1;
  for (int64_t d = 1; d < first.dim(); ++d) block_elems *= first.size(d);
  return block_elems * static_cast<int64_t>(first.element_size());
}

// Checks a block table against a pool of `num_blocks` (and, when `unique_ids`, that no id
// repeats); returns its ids.
const int64_t* check_ids(const at::Tensor& block_ids, int64_t num_blocks, bool unique_ids) {
  TORCH_CHECK(block_ids.device().is_cpu() && block_ids.scalar_type() == at::kLong &&
                  block_ids.dim() == 1 && block_ids.is_contiguous(),
              "block_ids must be a contiguous 1-D int64 CPU tensor");
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  const int64_t num_ids = block_ids.numel();
  for (int64_t j = 0; j < num_ids; ++j) {
    TORCH_CHECK(ids[j] >= 0 && ids[j] < num_blocks, "block id ", ids[j], " out of range");
  }
  if (unique_ids && num_ids > 1) {
    std::vector<uint8_t> seen(static_cast<size_t>(num_blocks), 0);
    for (int64_t j = 0; j < num_ids; ++j) {
      TORCH_CHECK(!seen[ids[j]], "duplicate destination block id ", ids[j]);
      seen[ids[j]] = 1;
    }
  }
  return ids;
}

std::vector<char*> bases_of(const std::vector<at::Tensor>& layers) {
  std::vector<char*> bases;
  bases.reserve(layers.size());
  for (const at::Tensor& layer : layers) bases.push_back(static_cast<char*>(layer.data_ptr()));
  return bases;
}

Plan check_and_plan(const std::vector<at::Tensor>& layers, const at::Tensor& block_ids,
                    const at::Tensor& buf, bool unique_ids) {
  Plan plan;
  plan.block_nbytes = check_layers(layers);
  const at::Tensor& first = layers[0];
  TORCH_CHECK(buf.scalar_type() == at::kByte, "packed buffer must be uint8");
  TORCH_CHECK(buf.dim() == 1, "packed buffer must be 1-D");
  TORCH_CHECK(buf.is_contiguous(), "packed buffer must be contiguous");
  TORCH_CHECK(buf.device() == first.device(), "packed buffer is on another device");
  plan.device = first.device();
  plan.ids = check_ids(block_ids, first.size(0), unique_ids);
  plan.num_ids = block_ids.numel();
  plan.needed = static_cast<int64_t>(layers.size()) * plan.num_ids * plan.block_nbytes;
  TORCH_CHECK(buf.numel() == plan.needed, "packed buffer is not exactly the blocks' size");
  if (plan.needed > 0) {
    plan.bases = bases_of(layers);
    plan.packed = static_cast<char*>(buf.data_ptr());
  }
  return plan;
}

// at::parallel_for over (tensor, block, chunk) tasks, each one memcpy. `locate(t, j, pair)`
// gives the (destination, source) addresses of block j of tensor t, `pair` being its index
// t * num_ids + j in the packed order. Tasks are numbered tensor-major, so for gather and
// scatter consecutive tasks touch consecutive bytes of the packed buffer and a thread's share
// of it is one contiguous range.
template <typename Locate>
void copy_pairs_cpu(int64_t num_tensors, int64_t num_ids, int64_t block_nbytes,
                    const Locate& locate) {
  const int64_t pairs = num_tensors * num_ids;
  const int64_t wanted_tasks = kTasksPerThread * at::get_num_threads();
  int64_t chunks = 1;
  if (pairs < wanted_tasks && block_nbytes >= 2 * kMinChunkBytes) {
    chunks = std::min((wanted_tasks + pairs - 1) / pairs, block_nbytes / kMinChunkBytes);
  }
  // Round chunks up to 64 bytes so every chunk but the last starts on a cache line.
  const int64_t chunk_nbytes = ((block_nbytes + chunks - 1) / chunks + 63) / 64 * 64;
  chunks = (block_nbytes + chunk_nbytes - 1) / chunk_nbytes;
  const int64_t tasks = pairs * chunks;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / chunk_nbytes);

  if (chunks == 1) {
    // Whole blocks (the common case, and the only one for small blocks): walk (tensor, id)
    // incrementally, with no division per block, since per-block overhead is what small
    // blocks are made of.
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      int64_t t = begin / num_ids;
      int64_t j = begin % num_ids;
      const size_t len = static_cast<size_t>(block_nbytes);
      for (int64_t pair = begin; pair < end; ++pair) {
        const auto [dst, src] = locate(t, j, pair);
        std::memcpy(dst, src, len);
        if (++j == num_ids) {
          j = 0;
          ++t;
        }
      }
    });
    return;
  }
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / chunks;
      const int64_t offset = (task % chunks) * chunk_nbytes;
      const int64_t len = std::min(chunk_nbytes, block_nbytes - offset);
      const auto [dst, src] = locate(pair / num_ids, pair % num_ids, pair);
      std::memcpy(dst + offset, src + offset, static_cast<size_t>(len));
    }
  });
}

void copy_blocks_cpu(const Plan& plan, bool gather) {
  const int64_t bn = plan.block_nbytes;
  const auto num_tensors = static_cast<int64_t>(plan.bases.size());
  if (gather) {
    copy_pairs_cpu(num_tensors, plan.num_ids, bn, [&](int64_t t, int64_t j, int64_t pair) {
      return std::pair<char*, const char*>(plan.packed + pair * bn,
                                           plan.bases[t] + plan.ids[j] * bn);
    });
  } else {
    copy_pairs_cpu(num_tensors, plan.num_ids, bn, [&](int64_t t, int64_t j, int64_t pair) {
      return std::pair<char*, const char*>(plan.bases[t] + plan.ids[j] * bn,
                                           plan.packed + pair * bn);
    });
  }
}

void run_packed_copy(const Plan& plan, bool gather) {
  if (plan.needed == 0) return;
  if (plan.device.is_cpu()) {
    copy_blocks_cpu(plan, gather);
    return;
  }
#ifdef KVHANDOFF_WITH_CUDA
  if (plan.device.is_cuda()) {
    kvhandoff::copy_blocks_cuda(plan.bases, plan.ids, plan.num_ids, plan.block_nbytes,
                                plan.packed, plan.device, gather);
    return;
  }
#endif
  TORCH_CHECK(false, "no block copy kernel for device ", plan.device);
}

// Packs blocks `block_ids` of every tensor into `out`; returns the used prefix of `out`.
at::Tensor gather(const std::vector<at::Tensor>& layers, const at::Tensor& block_ids,
                  const at::Tensor& out) {
  const Plan plan = check_and_plan(layers, block_ids, out, /*unique_ids=*/false);
  run_packed_copy(plan, /*gather=*/true);
  return out;
}

// Writes the packed blocks in `buf` back to blocks `block_ids` of every tensor.
void scatter(const at::Tensor& buf, const std::vector<at::Tensor>& layers,
             const at::Tensor& block_ids) {
  const Plan plan = check_and_plan(layers, block_ids, buf, /*unique_ids=*/true);
  run_packed_copy(plan, /*gather=*/false);
}

// Copies block src_ids[j] of src_layers[t] to block dst_ids[j] of dst_layers[t], every t and
// j, in one pass: the gather of the source and the scatter into the destination with no
// buffer in between. Overlap between the sides is refused by the Python checks.
void copy_blocks(const std::vector<at::Tensor>& src_layers, const at::Tensor& src_ids,
                 const std::vector<at::Tensor>& dst_layers, const at::Tensor& dst_ids) {
  const int64_t bn = check_layers(src_layers);
  TORCH_CHECK(check_layers(dst_layers) == bn, "the two sides' blocks differ in size");
  const at::Tensor& src0 = src_layers[0];
  const at::Tensor& dst0 = dst_layers[0];
  TORCH_CHECK(src_layers.size() == dst_layers.size(), "the two sides' layer counts differ");
  TORCH_CHECK(src0.sizes().slice(1) == dst0.sizes().slice(1), "the block shapes differ");
  TORCH_CHECK(src0.scalar_type() == dst0.scalar_type(), "the dtypes differ");
  TORCH_CHECK(src0.device() == dst0.device(), "the devices differ");
  const int64_t* sids = check_ids(src_ids, src0.size(0), /*unique_ids=*/false);
  const int64_t* dids = check_ids(dst_ids, dst0.size(0), /*unique_ids=*/true);
  const int64_t num_ids = src_ids.numel();
  TORCH_CHECK(dst_ids.numel() == num_ids, "the two sides name different numbers of blocks");
  if (num_ids == 0 || bn == 0) return;
  const std::vector<char*> src = bases_of(src_layers);
  const std::vector<char*> dst = bases_of(dst_layers);
  if (src0.device().is_cpu()) {
    copy_pairs_cpu(static_cast<int64_t>(src.size()), num_ids, bn,
                   [&](int64_t t, int64_t j, int64_t /*pair*/) {
                     return std::pair<char*, const char*>(dst[t] + dids[j] * bn,
                                                          src[t] + sids[j] * bn);
                   });
    return;
  }
#ifdef KVHANDOFF_WITH_CUDA
  if (src0.device().is_cuda()) {
    kvhandoff::copy_between_cuda(src, sids, dst, dids, num_ids, bn, src0.device());
    return;
  }
#endif
  TORCH_CHECK(false, "no block copy kernel for device ", src0.device());
}

// A side of a region copy: the regions' addresses and their running end offsets in the
// stream (ends[i] = lengths[0] + ... + lengths[i]).
struct RegionSide {
  const int64_t* addresses = nullptr;
  std::vector<int64_t> ends;
};

RegionSide check_side(const at::Tensor& addresses, const at::Tensor& lengths) {
  for (const at::Tensor* t : {&addresses, &lengths}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->is_contiguous(),
                "region arrays must be contiguous 1-D int64 CPU tensors");
  }
  TORCH_CHECK(addresses.numel() == lengths.numel(), "as many addresses as lengths");
  RegionSide side;
  side.addresses = addresses.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  side.ends.resize(static_cast<size_t>(lengths.numel()));
  int64_t total = 0;
  for (int64_t i = 0; i < lengths.numel(); ++i) {
    TORCH_CHECK(len[i] >= 0, "a region length is negative");
    total += len[i];
    side.ends[static_cast<size_t>(i)] = total;
  }
  return side;
}

int64_t total_of(const RegionSide& side) { return side.ends.empty() ? 0 : side.ends.back(); }

// Calls piece(dst, src, nbytes) for every maximal run of stream bytes [lo, hi) that lies in
// one source region and one destination region, in stream order: a two-pointer merge of the
// two region lists, started by a binary search so any sub-range of the stream can be walked
// on its own.
template <typename Piece>
void walk_pieces(const RegionSide& src, const RegionSide& dst, int64_t lo, int64_t hi,
                 const Piece& piece) {
  size_t i = std::upper_bound(src.ends.begin(), src.ends.end(), lo) - src.ends.begin();
  size_t j = std::upper_bound(dst.ends.begin(), dst.ends.end(), lo) - dst.ends.begin();
  int64_t pos = lo;
  while (pos < hi) {
    const int64_t src_end = src.ends[i];
    const int64_t dst_end = dst.ends[j];
    const int64_t end = std::min({src_end, dst_end, hi});
    const int64_t src_start = i == 0 ? 0 : src.ends[i - 1];
    const int64_t dst_start = j == 0 ? 0 : dst.ends[j - 1];
    if (end > pos) {
      piece(reinterpret_cast<char*>(dst.addresses[j] + (pos - dst_start)),
            reinterpret_cast<const char*>(src.addresses[i] + (pos - src_start)), end - pos);
    }
    pos = end;
    // Empty regions end where they start: these loops step over them too.
    while (i < src.ends.size() && src.ends[i] <= pos) ++i;
    while (j < dst.ends.size() && dst.ends[j] <= pos) ++j;
  }
}

// Copies the bytes of the source regions, back to back, over the destination regions (both
// lists as int64 address/length arrays; the Python side checked that every region lies in a
// tensor it keeps alive, that the totals match and that the sides do not overlap). CPU: the
// stream is cut into equal byte ranges, one parallel task each, so a thread's share is the
// same whatever the regions' sizes. GPU: one kernel over the list of pieces.
void copy_regions(const at::Tensor& src_addresses, const at::Tensor& src_lengths,
                  const at::Tensor& dst_addresses, const at::Tensor& dst_lengths,
                  c10::Device device) {
  const RegionSide src = check_side(src_addresses, src_lengths);
  const RegionSide dst = check_side(dst_addresses, dst_lengths);
  const int64_t total = total_of(src);
  TORCH_CHECK(total == total_of(dst), "the two sides hold different numbers of bytes");
  if (total == 0) return;
  if (device.is_cpu()) {
    at::parallel_for(0, total, kGrainBytes, [&](int64_t begin, int64_t end) {
      walk_pieces(src, dst, begin, end, [](char* d, const char* s, int64_t n) {
        std::memcpy(d, s, static_cast<size_t>(n));
      });
    });
    return;
  }
#ifdef KVHANDOFF_WITH_CUDA
  if (device.is_cuda()) {
    std::vector<int64_t> pieces;  // (destination, source, nbytes) triples
    pieces.reserve(3 * std::max(src.ends.size(), dst.ends.size()));
    walk_pieces(src, dst, 0, total, [&](char* d, const char* s, int64_t n) {
      pieces.push_back(reinterpret_cast<int64_t>(d));
      pieces.push_back(reinterpret_cast<int64_t>(s));
      pieces.push_back(n);
    });
    kvhandoff::copy_pieces_cuda(pieces, device);
    return;
  }
#endif
  TORCH_CHECK(false, "no region copy kernel for device ", device);
}

bool with_cuda() {
#ifdef KVHANDOFF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvhandoff multi-layer KV block gather/scatter/copy (CPU and CUDA)";
  // The GIL is released during the copy so the engine's other threads keep running.
  m.def("gather", &gather, "pack blocks of every layer into one buffer",
        py::call_guard<py::gil_scoped_release>());
  m.def("scatter", &scatter, "unpack a buffer into blocks of every layer",
        py::call_guard<py::gil_scoped_release>());
  m.def("copy_blocks", &copy_blocks, "copy blocks of one set of layers into another",
        py::call_guard<py::gil_scoped_release>());
  m.def("copy_regions", &copy_regions, "copy one region list's bytes over another's",
        py::call_guard<py::gil_scoped_release>());
  m.def("with_cuda", &with_cuda, "whether the CUDA kernel is linked in");
}
