// 2x2 average pooling, stride 2, no padding (a trailing odd row or column is left out), NCHW float32, and
// its gradient, for MindSpore CPU graphs (Custom ops, func_type "aot"): the shortcut and pre-norm
// downsampling of CoAtNet's first block in a stage. MindSpore 2.10's CPU pooling took ~10 ms forward for
// the four pools of a CoAtNet-0 batch of 8 that move ~60 MB; here each output row is one pass over its two
// source rows, planes split across cores.
#include "parallel.h"

namespace {

using coatnet::all_float32;
using coatnet::parallel_for;

struct Planes {
  int64_t planes, height, width, out_height, out_width;
};

// x (B, C, H, W) and y (B, C, H / 2, W / 2).
bool planes(int *ndims, int64_t **shapes, int x, int y, Planes *p) {
  if (ndims[x] != 4 || ndims[y] != 4) return false;
  p->planes = shapes[x][0] * shapes[x][1];
  p->height = shapes[x][2];
  p->width = shapes[x][3];
  p->out_height = shapes[y][2];
  p->out_width = shapes[y][3];
  return shapes[y][0] * shapes[y][1] == p->planes && p->out_height == p->height / 2 && p->out_width == p->width / 2;
}

}  // namespace

// Input: x (B, C, H, W). Output: y (B, C, H / 2, W / 2), the mean of each 2x2 block.
COATNET_AOT_KERNEL(AvgPool2x2Forward) {
  Planes p;
  if (nparam != 2 || !all_float32(nparam, dtypes) || !planes(ndims, shapes, 0, 1, &p)) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  auto *y = static_cast<float *>(params[1]);
  parallel_for(p.planes, p.height * p.width, [=](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      for (int64_t i = 0; i < p.out_height; ++i) {
        const float *__restrict top = x + (q * p.height + 2 * i) * p.width;
        const float *__restrict bottom = top + p.width;
        float *__restrict out = y + (q * p.out_height + i) * p.out_width;
#pragma omp simd
        for (int64_t j = 0; j < p.out_width; ++j)
          out[j] = ((top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1])) * 0.25f;
      }
    }
  });
  return 0;
}

// Inputs: dy (B, C, H / 2, W / 2), x (B, C, H, W) (for its shape). Output: dx, a quarter of dy in each
// position of its 2x2 block, zero in a left-out odd row or column.
COATNET_AOT_KERNEL(AvgPool2x2Backward) {
  Planes p;
  if (nparam != 3 || !all_float32(nparam, dtypes) || !planes(ndims, shapes, 1, 0, &p)) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  auto *dx = static_cast<float *>(params[2]);
  parallel_for(p.planes, p.height * p.width, [=](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      float *plane = dx + q * p.height * p.width;
      for (int64_t i = 0; i < p.out_height; ++i) {
        const float *__restrict g = dy + (q * p.out_height + i) * p.out_width;
        float *__restrict top = plane + 2 * i * p.width;
        float *__restrict bottom = top + p.width;
#pragma omp simd
        for (int64_t j = 0; j < p.out_width; ++j) {
          const float v = g[j] * 0.25f;
          top[2 * j] = v;
          top[2 * j + 1] = v;
          bottom[2 * j] = v;
          bottom[2 * j + 1] = v;
        }
        if (p.width % 2) top[p.width - 1] = bottom[p.width - 1] = 0.0f;
      }
      if (p.height % 2) std::fill(plane + (p.height - 1) * p.width, plane + p.height * p.width, 0.0f);
    }
  });
  return 0;
}
