// Shared by the kernels: the AOT entry-point signature, NCHW sizes, and splitting [0, n) across the
// cores this process may run on.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <sched.h>

// Defines `extern "C" int name(...)` with the signature MindSpore's Custom(func_type="aot") calls on CPU;
// the kernel body follows: COATNET_AOT_KERNEL(GeluForward) { ... }.
#define COATNET_AOT_KERNEL(name)                                                                        \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,    \
                      [[maybe_unused]] void *stream, [[maybe_unused]] void *extra)

namespace coatnet {

inline int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs body(begin, end) over [0, n) in contiguous chunks, one per core (the caller takes the last),
// and fewer when there is too little work (work_per_item: rough cost of one item, in elements).
template <typename Body>
void parallel_for(int64_t n, int64_t work_per_item, Body body) {
  static const int cores = cpu_count();
  const int64_t min_work = 1 << 15;
  const int64_t useful = std::max<int64_t>(1, n * work_per_item / min_work);
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({cores, n, useful})));
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  for (int c = 0; c + 1 < chunks; ++c) workers.emplace_back(body, c * step, std::min(n, (c + 1) * step));
  body((chunks - 1) * step, n);
  for (auto &w : workers) w.join();
}

// An NCHW tensor's sizes, its H x W plane flattened to `area`.
struct Nchw {
  int64_t batch, channels, area;
};

inline Nchw nchw(const int64_t *shape) { return {shape[0], shape[1], shape[2] * shape[3]}; }

inline int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

inline bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

}  // namespace coatnet
