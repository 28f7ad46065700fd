// Row-wise fused ops for MindSpore CPU graphs (Custom ops, func_type "aot"): attention's softmax of the
// scores plus the relative-position bias (forward) and its gradient, and the squeeze-excite channel gate.
// With MindSpore 2.10's stock CPU ops each is a chain of element-wise passes plus a slow ReduceSum (softmax
// backward ~250 ms, SE gate ~160 ms of a CoAtNet-0 train step); here each is one pass over its rows, rows
// split across cores.
#include "gelu.h"
#include "parallel.h"

namespace {

using coatnet::all_float32;
using coatnet::element_count;
using coatnet::Nchw;
using coatnet::nchw;
using coatnet::parallel_for;

}  // namespace

// Inputs: x (B, ..., W), bias (1, ..., W) broadcast over the batch. Output: y = softmax(x + bias) over the
// last axis, one pass over each row: its maximum, exp(z - max) (exp_nonpositive of gelu.h) with their sum,
// then the scaling by 1 / sum while the row is in cache. z = x + bias is added in both loops, not stored:
// storing it measured 2.3 ms against 1.4 ms for a CoAtNet-0 batch at S3, 14 x 14 (8 x 12 x 196 x 196).
COATNET_AOT_KERNEL(BiasSoftmaxForward) {
  if (nparam != 3 || !all_float32(nparam, dtypes) || ndims[0] < 2 || ndims[1] != ndims[0]) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *bias = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t bias_rows = width ? element_count(ndims[1], shapes[1]) / width : 0;
  const int64_t rows = width ? element_count(ndims[0], shapes[0]) / width : 0;
  if (shapes[1][0] != 1 || bias_rows * shapes[0][0] != rows) return 1;
  parallel_for(rows, 4 * width, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict xr = x + r * width;
      const float *__restrict br = bias + (r % bias_rows) * width;
      float *__restrict out = y + r * width;
      float top = -3.402823466e38f;
#pragma omp simd reduction(max : top)
      for (int64_t i = 0; i < width; ++i) top = std::max(top, xr[i] + br[i]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) {
        out[i] = coatnet::exp_nonpositive(xr[i] + br[i] - top);
        sum += out[i];
      }
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < width; ++i) out[i] *= inv;
    }
  });
  return 0;
}

// Inputs: y = softmax(x) over the last axis, dy. Output: dx = y * (dy - sum(dy * y)) per row.
COATNET_AOT_KERNEL(SoftmaxBackward) {
  if (nparam != 3 || !all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  const auto *y = static_cast<const float *>(params[0]);
  const auto *dy = static_cast<const float *>(params[1]);
  auto *dx = static_cast<float *>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = width ? element_count(ndims[0], shapes[0]) / width : 0;
  parallel_for(rows, width, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict yr = y + r * width;
      const float *__restrict gr = dy + r * width;
      float *__restrict out = dx + r * width;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < width; ++i) dot += gr[i] * yr[i];
      for (int64_t i = 0; i < width; ++i) out[i] = yr[i] * (gr[i] - dot);
    }
  });
  return 0;
}

// Inputs: x (B, C, H, W), gate (B, C, 1, 1). Output: x * gate.
COATNET_AOT_KERNEL(ChannelGateForward) {
  if (nparam != 3 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gate = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  const Nchw l = nchw(shapes[0]);
  parallel_for(l.batch * l.channels, l.area, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float g = gate[p];
      const float *__restrict xr = x + p * l.area;
      float *__restrict yr = y + p * l.area;
      for (int64_t i = 0; i < l.area; ++i) yr[i] = xr[i] * g;
    }
  });
  return 0;
}

// Inputs: dy (B, C, H, W), x (B, C, H, W), gate (B, C, 1, 1). Outputs: dx = dy * gate,
// dgate = sum over H, W of dy * x.
COATNET_AOT_KERNEL(ChannelGateBackward) {
  if (nparam != 5 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *x = static_cast<const float *>(params[1]);
  const auto *gate = static_cast<const float *>(params[2]);
  auto *dx = static_cast<float *>(params[3]);
  auto *dgate = static_cast<float *>(params[4]);
  const Nchw l = nchw(shapes[0]);
  parallel_for(l.batch * l.channels, l.area, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float g = gate[p];
      const float *__restrict gr = dy + p * l.area;
      const float *__restrict xr = x + p * l.area;
      float *__restrict out = dx + p * l.area;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < l.area; ++i) {
        sum += gr[i] * xr[i];
        out[i] = gr[i] * g;
      }
      dgate[p] = sum;
    }
  });
  return 0;
}
