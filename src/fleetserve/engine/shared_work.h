// Work shared between threads, for our kernels (included by quantized_kernels.cpp and decode_attention.cpp).
//
// at::parallel_for gives each thread a fixed share. On a small machine the serving processes (gateway, worker
// streams) take turns on the cores that the engine's threads compute on, so one thread is often set aside for a
// while, and a fixed share makes every other thread wait for it at the end. Here the threads that run take over
// the work of one that does not.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace fleetserve {

// body(i) for every i in [0, total). Each thread starts on its own equal share, taking one index at a time from
// its own counter (no other thread touches it while all run); a thread that has finished its share goes on with
// the others' in the same way, so a share whose thread was set aside is finished by the rest.
template <typename F>
void share_work(int64_t total, const F& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), total);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  struct alignas(64) Share {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::vector<Share> shares(threads);
  for (int64_t t = 0; t < threads; ++t) {
    shares[t].next.store(total * t / threads, std::memory_order_relaxed);
    shares[t].end = total * (t + 1) / threads;
  }
  at::parallel_for(0, threads, 1, [&](int64_t own, int64_t) {
    for (int64_t turn = 0; turn < threads; ++turn) {
      Share& share = shares[(own + turn) % threads];
      for (int64_t i = share.next.fetch_add(1); i < share.end; i = share.next.fetch_add(1)) body(i);
    }
  });
}

}  // namespace fleetserve
