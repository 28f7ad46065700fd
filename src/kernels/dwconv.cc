// Depthwise 3x3 convolution, stride 1 or 2, padding 1, NCHW float32, and its two gradients, for
// MindSpore CPU graphs (Custom op, func_type "aot").
//
// MindSpore 2.10 runs these through oneDNN's grouped-convolution path: in a CoAtNet-0 train step
// the forward and the two backward passes of the MBConv depthwise convolutions took ~0.7 s for
// ~0.9 GMAC. Here each kernel tap is one multiply-add loop over an output row, which the compiler
// vectorises; planes (or, for the filter gradient, channels) are split across cores.
#include "parallel.h"

namespace {

using coatnet::parallel_for;

// The output positions o of one row whose input position stride * o + shift lies in [0, width).
inline void valid_range(int64_t out_width, int64_t width, int64_t stride, int64_t shift, int64_t *begin,
                        int64_t *end) {
  *begin = shift < 0 ? (-shift + stride - 1) / stride : 0;
  *end = std::min(out_width, (width - 1 - shift) / stride + 1);
}

struct Geometry {
  int64_t batch, channels, height, width, out_height, out_width, stride;
};

// Input (B, C, H, W) and output (B, C, OH, OW) of a 3x3, padding-1 convolution: stride 1 or 2.
bool geometry(const int64_t *in, const int64_t *out, Geometry *g) {
  g->batch = in[0];
  g->channels = in[1];
  g->height = in[2];
  g->width = in[3];
  g->out_height = out[2];
  g->out_width = out[3];
  g->stride = (g->out_height == g->height && g->out_width == g->width) ? 1 : 2;
  return out[0] == in[0] && out[1] == in[1] && g->out_height == (g->height - 1) / g->stride + 1 &&
         g->out_width == (g->width - 1) / g->stride + 1;
}

// One plane: y[o] = sum_k w[k] x[stride * o + k - 1] in both axes.
void plane_forward(const float *__restrict x, const float *k, float *__restrict y, const Geometry &g) {
  std::memset(y, 0, sizeof(float) * g.out_height * g.out_width);
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    float *yr = y + oh * g.out_width;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t r = g.stride * oh + kh - 1;
      if (r < 0 || r >= g.height) continue;
      const float *xr = x + r * g.width;
      for (int kw = 0; kw < 3; ++kw) {
        const float kv = k[3 * kh + kw];
        int64_t begin, end;
        valid_range(g.out_width, g.width, g.stride, kw - 1, &begin, &end);
        for (int64_t o = begin; o < end; ++o) yr[o] += kv * xr[g.stride * o + kw - 1];
      }
    }
  }
}

// One plane of the input gradient: dx[stride * o + k - 1] += w[k] dy[o] in both axes.
void plane_backward_input(const float *__restrict dy, const float *k, float *__restrict dx, const Geometry &g) {
  std::memset(dx, 0, sizeof(float) * g.height * g.width);
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    const float *gr = dy + oh * g.out_width;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t r = g.stride * oh + kh - 1;
      if (r < 0 || r >= g.height) continue;
      float *dr = dx + r * g.width;
      for (int kw = 0; kw < 3; ++kw) {
        const float kv = k[3 * kh + kw];
        int64_t begin, end;
        valid_range(g.out_width, g.width, g.stride, kw - 1, &begin, &end);
        for (int64_t o = begin; o < end; ++o) dr[g.stride * o + kw - 1] += kv * gr[o];
      }
    }
  }
}

// acc[k] += sum_o dy[o] x[stride * o + k - 1] over one plane.
void plane_backward_filter(const float *__restrict dy, const float *__restrict x, double *acc, const Geometry &g) {
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    const float *gr = dy + oh * g.out_width;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t r = g.stride * oh + kh - 1;
      if (r < 0 || r >= g.height) continue;
      const float *xr = x + r * g.width;
      for (int kw = 0; kw < 3; ++kw) {
        int64_t begin, end;
        valid_range(g.out_width, g.width, g.stride, kw - 1, &begin, &end);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t o = begin; o < end; ++o) sum += gr[o] * xr[g.stride * o + kw - 1];
        acc[3 * kh + kw] += sum;
      }
    }
  }
}

bool float32_4d(int nparam, int *ndims, const char **dtypes) {
  if (!coatnet::all_float32(nparam, dtypes)) return false;
  for (int i = 0; i < nparam; ++i)
    if (ndims[i] != 4) return false;
  return true;
}

// Inputs: x (B, C, H, W), weight (C, 1, 3, 3). Output: y (B, C, OH, OW); the stride (1 or 2) follows
// from the shapes.
int forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Geometry g;
  if (nparam != 3 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[0], shapes[2], &g)) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *w = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  parallel_for(g.batch * g.channels, 9 * out_area, [=, &g](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      plane_forward(x + p * in_area, w + 9 * (p % g.channels), y + p * out_area, g);
  });
  return 0;
}

}  // namespace

// One symbol per stride: MindSpore identifies a Custom op (and caches its shape inference) by name.
extern "C" int DwConv3x3Stride1Forward(int nparam, void **params, int *ndims, int64_t **shapes,
                                       const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return forward(nparam, params, ndims, shapes, dtypes);
}

extern "C" int DwConv3x3Stride2Forward(int nparam, void **params, int *ndims, int64_t **shapes,
                                       const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return forward(nparam, params, ndims, shapes, dtypes);
}

// Inputs: dy (B, C, OH, OW), weight (C, 1, 3, 3), x (B, C, H, W) (for its shape). Output: dx (B, C, H, W).
extern "C" int DwConv3x3BackwardInput(int nparam, void **params, int *ndims, int64_t **shapes,
                                      const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  Geometry g;
  if (nparam != 4 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[3], shapes[0], &g)) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *w = static_cast<const float *>(params[1]);
  auto *dx = static_cast<float *>(params[3]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  parallel_for(g.batch * g.channels, 9 * out_area, [=, &g](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      plane_backward_input(dy + p * out_area, w + 9 * (p % g.channels), dx + p * in_area, g);
  });
  return 0;
}

// Inputs: dy (B, C, OH, OW), x (B, C, H, W). Output: dweight (C, 1, 3, 3).
extern "C" int DwConv3x3BackwardFilter(int nparam, void **params, int *ndims, int64_t **shapes,
                                       const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  Geometry g;
  if (nparam != 3 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[1], shapes[0], &g)) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *x = static_cast<const float *>(params[1]);
  auto *dw = static_cast<float *>(params[2]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  parallel_for(g.channels, 9 * g.batch * out_area, [=, &g](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double acc[9] = {0};
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t p = b * g.channels + c;
        plane_backward_filter(dy + p * out_area, x + p * in_area, acc, g);
      }
      for (int i = 0; i < 9; ++i) dw[9 * c + i] = static_cast<float>(acc[i]);
    }
  });
  return 0;
}
