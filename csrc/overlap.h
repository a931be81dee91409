// Tensors of one parameter that share part of their memory (ATen's "partial
// overlap": some elements of one are stored where other elements of the
// other are). The same elements in the same places (p.grad = p) are not.
//
// torch.optim steps such a grad as if it were read whole before the
// parameter is written (its momentum / Adam paths go through temporaries), so
// the ops read it from a copy: a fused pass would otherwise read elements it
// has already written (on a GPU, in an order the blocks decide). A state
// that partially overlaps the parameter, the grad or another state is
// refused, before anything is written, as torch.optim's in-place ops refuse
// it (at::assert_no_partial_overlap). Shared by the CPU ops (ops.cpp) and
// the CUDA table (cuda/tensor_table.cu).
#pragma once

#include <cstddef>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

namespace onecycle_fused {

// The storages are compared first, inline: measured on this project's 2-core
// CI machine, ~1.4 ns a call so, ~12 ns with at::get_overlap_status alone
// (AdamW checks up to 10 pairs a parameter: 0.35 ms a step over 5,000
// tensors, ~13% of its host time). Narrower than ATen's Storage::is_alias_of
// in one respect: two StorageImpls made to share one allocation through a
// refcounted deleter (c10::isSharedStorageAlias) count as apart here;
// autograd's and the optimizer's tensors are never made that way.
inline bool partially_overlap(const at::Tensor& a, const at::Tensor& b) {
  return a.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl() ==
             b.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl() &&
         at::get_overlap_status(a, b) == at::MemOverlapStatus::Partial;
}

// a state (b) against the parameter, its grad or another of its states (a)
inline void check_state_apart(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              size_t i, const char* op) {
  TORCH_CHECK(!partially_overlap(a, b), "onecycle_fused::", op, ": ", a_name, "[", i, "] and ", b_name, "[", i,
              "] partially overlap in memory (some elements of one are stored where other elements of the other ",
              "are): a state is written while the other is read, as in torch.optim, which refuses it too; give the ",
              "state memory of its own (clone() it)");
}

// a tensor the op writes (the parameter or a state) whose elements share
// memory: a stride-0 dimension of more than one element (expand()), ATen's
// has_internal_overlap "yes", which its in-place ops refuse. The op would
// write it through a contiguous copy, written back after the kernel: refused
// before anything is written. (Dense tensors, the usual ones, are skipped on
// a flag.) The CUDA table needs dense tensors anyway.
inline void check_writable(const at::Tensor& t, const char* name, size_t i, const char* op) {
  TORCH_CHECK(t.is_non_overlapping_and_dense() || at::has_internal_overlap(t) != at::MemOverlap::Yes,
              "onecycle_fused::", op, ": ", name, "[", i, "] has elements that share one memory location (a ",
              "stride-0 dimension, as expand() makes): the step writes every element, which torch.optim refuses ",
              "too; give it memory of its own (clone() it)");
}

}  // namespace onecycle_fused
