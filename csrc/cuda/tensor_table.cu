// Host side of the multi-tensor launch: argument checks, per-dtype buckets,
// and the cache of device tables (see tensor_table.cuh, multi_tensor.cuh).
//
// The cache. A step's tables are keyed by what they encode: every pointer
// (param, grad, states, step count), size and group, compared on the host
// each call (a memcmp of 64 bytes per tensor). A hit launches with the cached
// device table: nothing is copied host-to-device in a steady-state step. A
// miss (first step, a storage reallocated, grads freed by
// zero_grad(set_to_none=True) and reallocated elsewhere) builds the table on
// the host and uploads it on the current stream:
//   * eagerly: one asynchronous copy from pinned memory;
//   * while a CUDA graph is being captured: small kernels that carry the
//     table in their by-value parameters (upload_words_kernel below). A
//     captured memcpy would re-read the host buffer at every replay, long
//     after it was freed; kernel parameters are copied into the graph. This
//     is what makes a capture whose backward allocates fresh grads work.
// A table built while capturing holds nothing until a replay runs its upload
// kernels. So it remembers that no eager upload has reached it: the first
// eager hit uploads it (an eager step between capture and first replay, with
// the grads the capture made), and a hit in another capture emits the upload
// kernels into that graph too (it may replay before the first one does).
// A table that was used while capturing is pinned in the cache for the life
// of the process, since a graph may replay it at any time. Other tables are
// evicted least-recently-used beyond kMaxUnpinned tables or kMaxUnpinnedBytes
// (a run whose grads land elsewhere every step leaves one stale table per
// step behind: 64 bytes per tensor each).
#include "tensor_table.cuh"
#include "../layout.h"
#include "../overlap.h"

#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>

namespace onecycle_fused {
namespace cuda_impl {
namespace {

constexpr size_t kMaxUnpinned = 64;
constexpr int64_t kMaxUnpinnedBytes = int64_t(16) << 20;

struct Entry {
  int device;
  int64_t chunk;  // elements per chunk (depends on the dtype)
  std::vector<mt::TensorSlot> slots;  // the key: what the table encodes
  at::Tensor table;  // device copy: header, slots, chunk_start
  int64_t total_chunks;
  bool pinned;  // read by a captured graph: never freed
  cudaStream_t stream;  // stream the table was allocated on
  // an eager upload was enqueued; false for a table built while capturing,
  // whose bytes only a replay of that graph writes
  bool written;
};

struct Cache {
  std::mutex mu;
  std::list<Entry> entries;  // most recently used first
  size_t unpinned = 0;  // count and device bytes of the unpinned tables
  int64_t unpinned_bytes = 0;
};

Cache& cache() {
  // Leaked on purpose: freeing device tensors from a static destructor at exit
  // can run after the CUDA runtime is gone.
  static Cache* c = new Cache();
  return *c;
}

int64_t chunk_elems(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return mt::chunk_elems<float>();
    case at::kHalf:
      return mt::chunk_elems<__half>();
    case at::kBFloat16:
      return mt::chunk_elems<__nv_bfloat16>();
    case at::kDouble:
      return mt::chunk_elems<double>();
    default:
      TORCH_CHECK(false, "internal error: no chunk size for ", dtype);
  }
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Copies up to kUploadWords 8-byte words into device memory from the
// kernel's own parameter buffer. Used instead of a host-to-device memcpy
// while a CUDA graph is being captured: the words are captured by value in
// the kernel node, so a replay never reads host memory that may be freed.
constexpr int kUploadWords = 480;  // 3840 bytes: under the 4 KiB parameter limit
struct UploadArgs {
  unsigned long long* dst;
  int nwords;
  unsigned long long words[kUploadWords];
};

__global__ void upload_words_kernel(UploadArgs a) {
  for (int i = threadIdx.x; i < a.nwords; i += blockDim.x) a.dst[i] = a.words[i];
}

// Writes `words` into `table` on `stream`: eagerly one asynchronous copy
// from pinned memory; while capturing, upload_words_kernel launches (captured
// by value, see above).
void write_table(const at::Tensor& table, const std::vector<uint64_t>& words, cudaStream_t stream, bool capturing) {
  const int64_t bytes = static_cast<int64_t>(words.size() * 8);
  TORCH_CHECK(table.numel() == bytes, "internal error: table of ", table.numel(), " bytes for ", bytes);
  if (!capturing) {
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), words.data(), static_cast<size_t>(bytes));
    // on the current stream; the pinned block is not reused before the copy ran
    at::Tensor dst = table;  // (copy_ is not const)
    dst.copy_(host, /*non_blocking=*/true);
  } else {
    auto* dst = reinterpret_cast<unsigned long long*>(table.data_ptr());
    const int64_t total = static_cast<int64_t>(words.size());
    for (int64_t off = 0; off < total; off += kUploadWords) {
      UploadArgs a;
      a.dst = dst + off;
      a.nwords = static_cast<int>(std::min<int64_t>(kUploadWords, total - off));
      std::memcpy(a.words, words.data() + off, static_cast<size_t>(a.nwords) * 8);
      upload_words_kernel<<<1, 128, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// The cached device table for `slots`, building and uploading it on a miss.
// Returns the table tensor (a reference the caller keeps until its launch is
// enqueued) and the bucket's chunk count.
at::Tensor find_or_upload(const std::vector<mt::TensorSlot>& slots, int64_t chunk, const at::Device& device,
                          const c10::cuda::CUDAStream& stream, int64_t* total_chunks) {
  const cudaStream_t raw = stream.stream();
  const bool capturing = is_capturing(raw);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const size_t key_bytes = slots.size() * sizeof(mt::TensorSlot);
  for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
    if (it->device != device.index() || it->chunk != chunk || it->slots.size() != slots.size()) continue;
    if (key_bytes != 0 && std::memcmp(it->slots.data(), slots.data(), key_bytes) != 0) continue;
    c.entries.splice(c.entries.begin(), c.entries, it);  // most recently used
    Entry& e = c.entries.front();
    if (capturing) {
      if (!e.pinned) {
        e.pinned = true;
        --c.unpinned;
        c.unpinned_bytes -= e.table.numel();
      }
    } else if (raw != e.stream && !e.pinned) {
      // used on another stream than it was allocated on: its memory must not
      // be handed out again before this stream's work on it is done
      e.table.record_stream(stream);
    }
    if (!e.written) {
      // built while capturing: its bytes exist only once that graph replays
      int64_t total = 0;
      write_table(e.table, mt::build_table_image(slots, chunk, &total), raw, capturing);
      e.written = !capturing;
    }
    *total_chunks = e.total_chunks;
    return e.table;
  }

  int64_t total = 0;
  const std::vector<uint64_t> words = mt::build_table_image(slots, chunk, &total);
  at::Tensor table = at::empty({static_cast<int64_t>(words.size() * 8)},
                               at::TensorOptions().dtype(at::kByte).device(device));
  write_table(table, words, raw, capturing);
  c.entries.push_front(Entry{device.index(), chunk, slots, table, total, capturing, raw, !capturing});
  if (!capturing) {
    ++c.unpinned;
    c.unpinned_bytes += table.numel();
    // drop least recently used unpinned tables (never the one just made)
    auto it = std::prev(c.entries.end());
    while ((c.unpinned > kMaxUnpinned || c.unpinned_bytes > kMaxUnpinnedBytes) && it != c.entries.begin()) {
      auto older = it == c.entries.begin() ? it : std::prev(it);
      if (!it->pinned) {
        --c.unpinned;
        c.unpinned_bytes -= it->table.numel();
        c.entries.erase(it);
      }
      it = older;
    }
  }
  *total_chunks = total;
  return table;
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> counts;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

// GradScaler's scale / found_inf as a device float pointer (null if absent).
const float* scalar_ptr(const StepInputs& in, const std::optional<at::Tensor>& t, const char* name,
                        const at::Device& device, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_VALUE(t->device() == device, in.op, ": ", name, " must be on ", device, " (the step counter's device), got ",
                    t->device());
  TORCH_CHECK_VALUE(t->numel() == 1, in.op, ": ", name, " must hold one element, got ", t->numel());
  if (t->scalar_type() == at::kFloat) return t->data_ptr<float>();
  // GradScaler's tensors are float32; others are converted (an extra kernel)
  keep.push_back(t->to(at::kFloat));
  return keep.back().data_ptr<float>();
}

}  // namespace

int grid_size(int64_t total_chunks) {
  const int64_t cap = static_cast<int64_t>(sm_count(c10::cuda::current_device())) * mt::kBlocksPerSM;
  return static_cast<int>(std::max<int64_t>(1, std::min(total_chunks, cap)));
}

Prepared prepare_step(const StepInputs& in, const c10::cuda::CUDAStream& stream) {
  const char* op = in.op;
  const at::Tensor& counter = in.counter;
  TORCH_CHECK_VALUE(counter.defined() && counter.is_cuda(), op, ": counter must be a CUDA tensor");
  const at::Device device = counter.device();
  TORCH_CHECK_VALUE(counter.scalar_type() == at::kLong && counter.numel() == 1, op,
                    ": counter must be an int64 tensor with one element, got ", counter.scalar_type(), " with ",
                    counter.numel(), " elements");
  const at::Tensor& table = in.table;
  TORCH_CHECK_VALUE(table.defined() && table.device() == device, op, ": table must be on ", device);
  TORCH_CHECK_VALUE(table.scalar_type() == at::kDouble && table.dim() == 2 && table.size(1) == row::WIDTH &&
                        table.is_contiguous(),
                    op, ": table must be a contiguous float64 [groups, ", row::WIDTH, "] tensor, got ",
                    table.scalar_type(), " ", table.sizes());
  const int64_t groups = table.size(0);

  const size_t n = in.params.size();
  TORCH_CHECK_VALUE(n < (1u << 30), op, ": too many tensors (", n, ")");  // int32 indices in the table
  auto check_len = [&](size_t len, const char* name) {
    TORCH_CHECK_VALUE(len == n, op, ": ", name, " has ", len, " entries but params has ", n);
  };
  check_len(in.grads.size(), "grads");
  check_len(in.steps.size(), "steps");
  check_len(in.group_ids.size(), "group_ids");
  for (int j = 0; j < 3; ++j) {
    if (in.state_names[j] != nullptr) check_len(in.states[j].size(), in.state_names[j]);
  }

  Prepared prep;
  prep.args.table = nullptr;
  prep.args.rows = table.data_ptr<double>();
  prep.args.counter = counter.data_ptr<int64_t>();
  prep.args.grad_scale = scalar_ptr(in, in.grad_scale, "grad_scale", device, prep.keep);
  prep.args.found_inf = scalar_ptr(in, in.found_inf, "found_inf", device, prep.keep);
  prep.args.advance_counter = 0;

  // slots per dtype, in the order the parameters came
  constexpr int kNumDtypes = 4;
  const at::ScalarType kDtypes[kNumDtypes] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  std::vector<mt::TensorSlot> by_dtype[kNumDtypes];
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = in.params[i];
    TORCH_CHECK_VALUE(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK_VALUE(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                      " but the step counter is on ", device);
    const at::ScalarType dtype = p.scalar_type();
    const int d = static_cast<int>(std::find(kDtypes, kDtypes + kNumDtypes, dtype) - kDtypes);
    TORCH_CHECK_VALUE(d < kNumDtypes, op, ": params[", i, "] has dtype ", dtype,
                      "; the cuda backend handles float32, float16, bfloat16 and float64 parameters");
    TORCH_CHECK_VALUE(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(), op, ": params[", i,
                      "] must be dense in memory (contiguous, or permuted like channels_last), got sizes ",
                      p.sizes(), " strides ", p.strides());
    auto check_like = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK_VALUE(t.defined(), op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK_VALUE(t.device() == device && t.scalar_type() == dtype && t.layout() == at::kStrided &&
                            same_layout(t, p),
                        op, ": ", name, "[", i, "] must match params[", i, "] in device, dtype, shape and strides: got ",
                        t.device(), " ", t.scalar_type(), " sizes ", t.sizes(), " strides ", t.strides(),
                        ", the parameter has ", p.device(), " ", dtype, " sizes ", p.sizes(), " strides ", p.strides());
    };

    mt::TensorSlot s{};
    s.param = p.data_ptr();
    const at::Tensor& given = in.grads[i];
    if (given.defined() && given.device() == device && given.scalar_type() == dtype && given.sizes() == p.sizes() &&
        (!same_layout(given, p) || partially_overlap(p, given))) {
      // a grad laid out unlike its parameter (set by hand: autograd gives a
      // dense parameter's grad the parameter's strides) is read from a copy
      // in the parameter's layout; a state must match, it is written. So is
      // a grad that shares part of its parameter's memory (overlap.h): the
      // copy is enqueued before the kernel, on the same stream.
      prep.keep.push_back(at::empty_like(p));
      prep.keep.back().copy_(given);
      s.grad = prep.keep.back().data_ptr();
    } else {
      check_like(given, "grads");
      s.grad = given.data_ptr();
    }
    void** state_ptr[3] = {&s.s0, &s.s1, &s.s2};
    for (int j = 0; j < 3; ++j) {
      if (in.state_names[j] == nullptr) continue;
      const at::Tensor& t = in.states[j][i];
      if (p.numel() == 0 || (in.optional_state[j] && (!t.defined() || t.numel() == 0))) continue;  // none
      check_like(t, in.state_names[j]);
      check_state_apart(p, "params", t, in.state_names[j], i, op);
      check_state_apart(given, "grads", t, in.state_names[j], i, op);
      for (int k = 0; k < j; ++k) {
        if (*state_ptr[k] != nullptr) check_state_apart(in.states[k][i], in.state_names[k], t, in.state_names[j], i, op);
      }
      *state_ptr[j] = t.data_ptr();
    }
    const at::Tensor& step = in.steps[i];
    TORCH_CHECK_VALUE(step.defined() && step.device() == device && step.scalar_type() == at::kLong &&
                          step.numel() == 1,
                      op, ": steps[", i, "] must be an int64 tensor with one element on ", device);
    s.step = step.data_ptr<int64_t>();
    s.numel = p.numel();
    const int64_t g = in.group_ids[i];
    TORCH_CHECK_VALUE(g >= 0 && g < groups, op, ": group_ids[", i, "] = ", g, " is not a row of the ", groups,
                      "-row table");
    s.group = static_cast<int32_t>(g);
    s.vec_ok = mt::slot_vec_ok(s);
    by_dtype[d].push_back(s);
  }

  for (int d = 0; d < kNumDtypes; ++d) {
    if (by_dtype[d].empty()) continue;
    Bucket b;
    b.dtype = kDtypes[d];
    at::Tensor t = find_or_upload(by_dtype[d], chunk_elems(b.dtype), device, stream, &b.total_chunks);
    b.table = static_cast<unsigned char*>(t.data_ptr());
    prep.keep.push_back(std::move(t));
    prep.buckets.push_back(b);
  }
  if (prep.buckets.empty()) {
    // no tensor on this device has a grad: the counter still advances
    Bucket b;
    b.dtype = at::kFloat;
    at::Tensor t = find_or_upload({}, chunk_elems(b.dtype), device, stream, &b.total_chunks);
    b.table = static_cast<unsigned char*>(t.data_ptr());
    prep.keep.push_back(std::move(t));
    prep.buckets.push_back(b);
  }
  return prep;
}

}  // namespace cuda_impl
}  // namespace onecycle_fused
