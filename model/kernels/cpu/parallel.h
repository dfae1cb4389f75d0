// ParallelFor over XLA's intra-op thread pool, shared by the native CPU kernels (model/kernels/cpu_native.py).
#ifndef PEAKLLM_PARALLEL_H_
#define PEAKLLM_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace peakllm {

// The shared state of one ParallelForSlots call (heap-allocated: a pool task may start after the call returned).
struct ParallelState {
  std::atomic<int64_t> next{0};  // the next unclaimed item
  std::atomic<int64_t> done{0};  // items finished
  std::atomic<int> refs{0};      // threads still holding this state
};

// Claims and runs fn(slot, item) until no item is left.
template <typename F>
void Drain(ParallelState* state, int64_t items, int64_t slot, const F& fn) {
  for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < items;) {
    fn(slot, i);
    state->done.fetch_add(1, std::memory_order_release);
  }
}

inline void Release(ParallelState* state) {
  if (state->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete state;
}

// Runs fn(slot, i) for i in [0, items) on the calling thread (slot 0) and up to num_threads() - 1 pool threads
// (slots 1, 2, ...; fewer than min(num_threads(), items) slots may run). Items are claimed from an atomic counter and
// the caller waits only for items already claimed (running elsewhere), so it never waits on a pool task that has not
// started; such a task finds nothing left and never touches `fn` (which lives on the caller's stack).
template <typename F>
void ParallelForSlots(xla::ffi::ThreadPool& pool, int64_t items, const F& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < items; ++i) fn(0, i);
    return;
  }
  auto* state = new ParallelState();
  state->refs.store(static_cast<int>(helpers) + 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, items, h, &fn]() {
    Drain(state, items, h + 1, fn);
    Release(state);
  });
  Drain(state, items, 0, fn);
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  Release(state);
}

// ParallelForSlots for work that does not need to know its thread: fn(i).
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, const F& fn) {
  ParallelForSlots(pool, items, [&fn](int64_t, int64_t i) { fn(i); });
}

}  // namespace peakllm

#endif  // PEAKLLM_PARALLEL_H_
