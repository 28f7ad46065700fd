// LayerNorm over the channel axis of an NCHW float32 tensor (timm's LayerNorm2d), forward and
// backward, for MindSpore CPU graphs (Custom ops, func_type "aot").
//
// MindSpore 2.10 on CPU reduces over axis 1 of NCHW slowly (the statistics and the sums over axis 1
// in the gradient took ~0.2 s of a CoAtNet-0 train step). Here a block of positions of one image is
// normalised at a time: its C channel rows (contiguous positions, stride H * W) stay in cache for the
// passes over them, and the loops run over contiguous positions. Mean and 1 / std per position are
// outputs of the forward, kept for the backward.
#include <cmath>
#include <mutex>

#include "parallel.h"

namespace {

using coatnet::all_float32;
using coatnet::Nchw;
using coatnet::nchw;
using coatnet::parallel_for;

constexpr int64_t kBlock = 64;  // positions per work item

}  // namespace

// Inputs: x (B, C, H, W), gamma (C), beta (C), eps (1). Outputs: y (B, C, H, W), mean, rstd (B, 1, H, W).
COATNET_AOT_KERNEL(LayerNorm2dForward) {
  if (nparam != 7 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *beta = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  auto *y = static_cast<float *>(params[4]);
  auto *mean_out = static_cast<float *>(params[5]);
  auto *rstd_out = static_cast<float *>(params[6]);
  const Nchw l = nchw(shapes[0]);
  const int64_t blocks = (l.area + kBlock - 1) / kBlock;  // of positions, per image
  parallel_for(l.batch * blocks, 3 * l.channels * kBlock, [=](int64_t begin, int64_t end) {
    float mean[kBlock], rstd[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, p0 = (item % blocks) * kBlock, n = std::min(kBlock, l.area - p0);
      const float *xb = x + b * l.channels * l.area + p0;
      float *yb = y + b * l.channels * l.area + p0;
      for (int64_t i = 0; i < n; ++i) mean[i] = rstd[i] = 0.0f;
      for (int64_t c = 0; c < l.channels; ++c) {
        const float *__restrict xr = xb + c * l.area;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) mean[i] += xr[i];
      }
      for (int64_t i = 0; i < n; ++i) mean[i] /= static_cast<float>(l.channels);
      for (int64_t c = 0; c < l.channels; ++c) {  // variance around the mean: no cancellation
        const float *__restrict xr = xb + c * l.area;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) rstd[i] += (xr[i] - mean[i]) * (xr[i] - mean[i]);
      }
      for (int64_t i = 0; i < n; ++i) rstd[i] = 1.0f / std::sqrt(rstd[i] / static_cast<float>(l.channels) + eps);
      for (int64_t c = 0; c < l.channels; ++c) {
        const float *__restrict xr = xb + c * l.area;
        float *__restrict yr = yb + c * l.area;
        const float g = gamma[c], t = beta[c];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean[i]) * rstd[i] * g + t;
      }
      for (int64_t i = 0; i < n; ++i) {
        mean_out[b * l.area + p0 + i] = mean[i];
        rstd_out[b * l.area + p0 + i] = rstd[i];
      }
    }
  });
  return 0;
}

// Inputs: dy, x (B, C, H, W), gamma (C), mean, rstd (B, 1, H, W). Outputs: dx (B, C, H, W), dgamma, dbeta (C).
// dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)) with g = dy gamma, xhat = (x - mean) rstd.
COATNET_AOT_KERNEL(LayerNorm2dBackward) {
  if (nparam != 8 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *x = static_cast<const float *>(params[1]);
  const auto *gamma = static_cast<const float *>(params[2]);
  const auto *mean_in = static_cast<const float *>(params[3]);
  const auto *rstd_in = static_cast<const float *>(params[4]);
  auto *dx = static_cast<float *>(params[5]);
  auto *dgamma = static_cast<float *>(params[6]);
  auto *dbeta = static_cast<float *>(params[7]);
  const Nchw l = nchw(shapes[0]);
  const int64_t blocks = (l.area + kBlock - 1) / kBlock;  // of positions, per image
  std::vector<double> dgamma_sum(l.channels, 0.0), dbeta_sum(l.channels, 0.0);
  std::mutex merge;
  parallel_for(l.batch * blocks, 3 * l.channels * kBlock, [&](int64_t begin, int64_t end) {
    std::vector<double> dg(l.channels, 0.0), db(l.channels, 0.0);  // this thread's part
    float mean_g[kBlock], mean_gx[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, p0 = (item % blocks) * kBlock, n = std::min(kBlock, l.area - p0);
      const int64_t offset = b * l.channels * l.area + p0;
      const float *__restrict mean = mean_in + b * l.area + p0;
      const float *__restrict rstd = rstd_in + b * l.area + p0;
      for (int64_t i = 0; i < n; ++i) mean_g[i] = mean_gx[i] = 0.0f;
      for (int64_t c = 0; c < l.channels; ++c) {
        const float *__restrict gr = dy + offset + c * l.area;
        const float *__restrict xr = x + offset + c * l.area;
        const float w = gamma[c];
        float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
        for (int64_t i = 0; i < n; ++i) {
          const float xhat = (xr[i] - mean[i]) * rstd[i];
          mean_g[i] += gr[i] * w;
          mean_gx[i] += gr[i] * w * xhat;
          s += gr[i] * xhat;
          t += gr[i];
        }
        dg[c] += s;
        db[c] += t;
      }
      const float inv_c = 1.0f / static_cast<float>(l.channels);
      for (int64_t i = 0; i < n; ++i) {
        mean_g[i] *= inv_c;
        mean_gx[i] *= inv_c;
      }
      for (int64_t c = 0; c < l.channels; ++c) {
        const float *__restrict gr = dy + offset + c * l.area;
        const float *__restrict xr = x + offset + c * l.area;
        float *__restrict out = dx + offset + c * l.area;
        const float w = gamma[c];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const float xhat = (xr[i] - mean[i]) * rstd[i];
          out[i] = rstd[i] * (gr[i] * w - mean_g[i] - xhat * mean_gx[i]);
        }
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t c = 0; c < l.channels; ++c) {
      dgamma_sum[c] += dg[c];
      dbeta_sum[c] += db[c];
    }
  });
  for (int64_t c = 0; c < l.channels; ++c) {
    dgamma[c] = static_cast<float>(dgamma_sum[c]);
    dbeta[c] = static_cast<float>(dbeta_sum[c]);
  }
  return 0;
}
