// Reductions for MindSpore CPU graphs (Custom ops, func_type "aot") that MindSpore 2.10 runs far below
// memory speed: the train step's sum of the squares of every gradient (for the global norm; as one
// 1 x n by n x 1 MatMul per gradient tensor it took ~30 ms of a CoAtNet-0 step, 194 ops at ~3.6 GB/s,
// here it is one op over all of them) and the per-channel sum that is a bias's gradient.
#include <utility>

#include "parallel.h"

namespace {

using coatnet::all_float32;
using coatnet::element_count;
using coatnet::parallel_for;

// Elements per chunk: a fixed split of every tensor, so the result does not depend on the core count.
constexpr int64_t kChunk = 1 << 16;

}  // namespace

// Inputs: any number of float32 tensors. Output: (1,) float32, the sum of the squares of all their
// elements: each chunk summed in float (vectorised), chunks in double, in a fixed order.
COATNET_AOT_KERNEL(SumOfSquares) {
  if (nparam < 2 || !all_float32(nparam, dtypes)) return 1;
  std::vector<std::pair<const float *, int64_t>> chunks;
  for (int t = 0; t + 1 < nparam; ++t) {
    const auto *data = static_cast<const float *>(params[t]);
    const int64_t n = element_count(ndims[t], shapes[t]);
    for (int64_t begin = 0; begin < n; begin += kChunk) chunks.emplace_back(data + begin, std::min(kChunk, n - begin));
  }
  std::vector<double> partial(chunks.size());
  parallel_for(static_cast<int64_t>(chunks.size()), kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float *__restrict x = chunks[c].first;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < chunks[c].second; ++i) s += x[i] * x[i];
      partial[c] = s;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  *static_cast<float *>(params[nparam - 1]) = static_cast<float>(total);
  return 0;
}

// Input: x (B, C, H, W). Output: (C,), the sum of each channel over B, H and W (the gradient of a
// per-channel bias; MindSpore's BiasAddGrad took ~17 ms of a CoAtNet-0 step for 45 calls). The planes
// are summed in memory order (each in float, split across cores: walking channel by channel over
// planes of 7 x 7 to 28 x 28 was ~3x slower), then each channel's planes in double, in batch order.
COATNET_AOT_KERNEL(ChannelSum) {
  if (nparam != 2 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  auto *out = static_cast<float *>(params[1]);
  const coatnet::Nchw l = coatnet::nchw(shapes[0]);
  std::vector<float> plane_sums(static_cast<size_t>(l.batch * l.channels));
  float *sums = plane_sums.data();
  parallel_for(l.batch * l.channels, l.area, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float *__restrict xp = x + p * l.area;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < l.area; ++i) s += xp[i];
      sums[p] = s;
    }
  });
  for (int64_t c = 0; c < l.channels; ++c) {
    double sum = 0.0;
    for (int64_t b = 0; b < l.batch; ++b) sum += sums[b * l.channels + c];
    out[c] = static_cast<float>(sum);
  }
  return 0;
}
