// Torch binding of the block copy: checks, the CPU kernel, and the call into the CUDA path
// (block_copy_cuda_host.cpp + block_copy_cuda.cu, linked only when KVHANDOFF_WITH_CUDA is
// defined).
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

Plan check_and_plan(const std::vector<at::Tensor>& layers, const at::Tensor& block_ids,
                    const at::Tensor& buf, bool unique_ids) {
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
  TORCH_CHECK(buf.scalar_type() == at::kByte, "packed buffer must be uint8");
  TORCH_CHECK(buf.dim() == 1, "packed buffer must be 1-D");
  TORCH_CHECK(buf.is_contiguous(), "packed buffer must be contiguous");
  TORCH_CHECK(buf.device() == first.device(), "packed buffer is on another device");
  TORCH_CHECK(block_ids.device().is_cpu() && block_ids.scalar_type() == at::kLong &&
                  block_ids.dim() == 1 && block_ids.is_contiguous(),
              "block_ids must be a contiguous 1-D int64 CPU tensor");

  Plan plan;
  plan.device = first.device();
  const int64_t num_blocks = first.size(0);
  int64_t block_elems = 1;
  for (int64_t d = 1; d < first.dim(); ++d) block_elems *= first.size(d);
  plan.block_nbytes = block_elems * static_cast<int64_t>(first.element_size());
  plan.num_ids = block_ids.numel();
  plan.ids = block_ids.data_ptr<int64_t>();
  for (int64_t j = 0; j < plan.num_ids; ++j) {
    TORCH_CHECK(plan.ids[j] >= 0 && plan.ids[j] < num_blocks, "block id ", plan.ids[j],
                " out of range");
  }
  if (unique_ids && plan.num_ids > 1) {
    std::vector<uint8_t> seen(static_cast<size_t>(num_blocks), 0);
    for (int64_t j = 0; j < plan.num_ids; ++j) {
      TORCH_CHECK(!seen[plan.ids[j]], "duplicate destination block id ", plan.ids[j]);
      seen[plan.ids[j]] = 1;
    }
  }
  plan.needed = static_cast<int64_t>(layers.size()) * plan.num_ids * plan.block_nbytes;
  TORCH_CHECK(buf.numel() >= plan.needed, "packed buffer too small");
  if (plan.needed > 0) {
    plan.bases.reserve(layers.size());
    for (const at::Tensor& layer : layers) {
      plan.bases.push_back(static_cast<char*>(layer.data_ptr()));
    }
    plan.packed = static_cast<char*>(buf.data_ptr());
  }
  return plan;
}

// at::parallel_for over (tensor, block, chunk) tasks, each one memcpy. Tasks are numbered
// tensor-major, so consecutive tasks write (gather) or read (scatter) consecutive bytes of the
// packed buffer and a thread's share of it is one contiguous range.
void copy_blocks_cpu(const Plan& plan, bool gather) {
  const int64_t num_tensors = static_cast<int64_t>(plan.bases.size());
  const int64_t pairs = num_tensors * plan.num_ids;
  const int64_t block_nbytes = plan.block_nbytes;
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
      int64_t t = begin / plan.num_ids;
      int64_t j = begin % plan.num_ids;
      char* packed = plan.packed + begin * block_nbytes;
      const size_t len = static_cast<size_t>(block_nbytes);
      for (int64_t pair = begin; pair < end; ++pair) {
        char* pool = plan.bases[t] + plan.ids[j] * block_nbytes;
        if (gather) {
          std::memcpy(packed, pool, len);
        } else {
          std::memcpy(pool, packed, len);
        }
        packed += block_nbytes;
        if (++j == plan.num_ids) {
          j = 0;
          ++t;
        }
      }
    });
    return;
  }
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / chunks;  // == t * num_ids + j, the packed block index
      const int64_t t = pair / plan.num_ids;
      const int64_t j = pair % plan.num_ids;
      const int64_t offset = (task % chunks) * chunk_nbytes;
      const int64_t len = std::min(chunk_nbytes, block_nbytes - offset);
      char* pool = plan.bases[t] + plan.ids[j] * block_nbytes + offset;
      char* packed = plan.packed + pair * block_nbytes + offset;
      if (gather) {
        std::memcpy(packed, pool, static_cast<size_t>(len));
      } else {
        std::memcpy(pool, packed, static_cast<size_t>(len));
      }
    }
  });
}

void copy_blocks(const Plan& plan, bool gather) {
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
  copy_blocks(plan, /*gather=*/true);
  return out.narrow(0, 0, plan.needed);
}

// Writes the packed blocks in `buf` back to blocks `block_ids` of every tensor.
void scatter(const at::Tensor& buf, const std::vector<at::Tensor>& layers,
             const at::Tensor& block_ids) {
  const Plan plan = check_and_plan(layers, block_ids, buf, /*unique_ids=*/true);
  copy_blocks(plan, /*gather=*/false);
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
  m.doc() = "kvhandoff multi-layer KV block gather/scatter (CPU and CUDA)";
  // The GIL is released during the copy so the engine's other threads keep running.
  m.def("gather", &gather, "pack blocks of every layer into one buffer",
        py::call_guard<py::gil_scoped_release>());
  m.def("scatter", &scatter, "unpack a buffer into blocks of every layer",
        py::call_guard<py::gil_scoped_release>());
  m.def("with_cuda", &with_cuda, "whether the CUDA kernel is linked in");
}
