// BatchNorm arithmetic shared by batchnorm.cc and the fused BatchNorm + GELU + depthwise kernels of
// dwconv.cc: a channel's batch statistics and the last pass of the training backward.
#pragma once

#include <algorithm>
#include <cmath>

#include "parallel.h"

namespace coatnet {

struct ChannelMoments {
  double mean, var;  // var biased
};

// Batch mean and variance of channel c of an NCHW tensor: each plane summed in float (vectorised),
// planes in double.
inline ChannelMoments channel_moments(const float *x, const Nchw &l, int64_t c) {
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t b = 0; b < l.batch; ++b) {
    const float *__restrict xp = x + (b * l.channels + c) * l.area;
    float s = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = 0; i < l.area; ++i) {
      s += xp[i];
      q += xp[i] * xp[i];
    }
    sum += s;
    sum_sq += q;
  }
  const double count = static_cast<double>(l.batch * l.area);
  const double mean = sum / count;
  return {mean, std::max(0.0, sum_sq / count - mean * mean)};
}

// The backward's last pass over channel c: dx = a (g - mean_g - (x - m) k), g the gradient at the
// normalised value (it may be dx itself: each element is read before it is written).
inline void normalised_input_gradient(const float *g, const float *x, float *dx, const Nchw &l, int64_t c, float a,
                                      float m, float mean_g, float k) {
  for (int64_t b = 0; b < l.batch; ++b) {
    const int64_t plane = (b * l.channels + c) * l.area;
    const float *gp = g + plane;
    const float *__restrict xp = x + plane;
    float *out = dx + plane;
    for (int64_t i = 0; i < l.area; ++i) out[i] = a * (gp[i] - mean_g - (xp[i] - m) * k);
  }
}

}  // namespace coatnet
