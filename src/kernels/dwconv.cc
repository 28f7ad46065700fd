// Depthwise 3x3 convolution, stride 1 or 2, padding 1, NCHW float32, and its two gradients, for
// MindSpore CPU graphs (Custom op, func_type "aot").
//
// MindSpore 2.10 runs these through oneDNN's grouped-convolution path: in a CoAtNet-0 train step
// the forward and the two backward passes of the MBConv depthwise convolutions took ~0.7 s for
// ~0.9 GMAC. Here every output row is one vectorised loop over nine "tap" rows: the three source rows
// it reads, zero-padded (and for stride 2 split into even and odd columns), so that tap k of output
// o is t_k[o] and the loop has no bounds tests or strided loads. The three kernels share this:
//   forward          y[o]   = sum_k w[k] t_k[o],  taps from x;
//   input gradient   dx[o]  = sum_k w'[k] t_k[o], w' the kernel turned by 180 degrees, taps from dy
//                    (stride 2: dy with zeros inserted between its rows and columns);
//   filter gradient  dw[k] += sum_o dy[o] t_k[o], taps from x as in the forward.
// Planes (or, for the filter gradient, channels) are split across cores.
#include "parallel.h"

namespace {

using coatnet::parallel_for;

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

// How a source row becomes the three taps of one kernel row.
enum class Source {
  kRows,          // stride 1: the row padded by one zero each side; taps at offsets 0, 1, 2
  kEvenOddRows,   // stride 2: padded row split into even / odd columns; taps even[o], odd[o], even[o + 1]
  kZeroInserted,  // stride-2 input gradient: dy row with a zero after every element, padded; as kRows
};

// odd[m] = src[2m], even[m] = src[2m + 1], m < pairs (distinct buffers, so the loop vectorises).
inline void split_columns(const float *__restrict src, float *__restrict even, float *__restrict odd, int64_t pairs) {
#pragma omp simd
  for (int64_t m = 0; m < pairs; ++m) {
    odd[m] = src[2 * m];
    even[m] = src[2 * m + 1];
  }
}

// The nine tap rows of one output row, built in per-thread scratch.
class Taps {
 public:
  Taps(Source source, int64_t src_height, int64_t src_width, int64_t span)
      : source_(source), src_height_(src_height), src_width_(src_width), row_len_(span + 4),
        scratch_(static_cast<size_t>(4 * row_len_), 0.0f) {}

  // Taps for the source rows first_row, first_row + 1, first_row + 2 (out of range: zeros) of `plane`.
  // With kZeroInserted, row r stands for plane row r / 2 when r is even and for zeros when it is odd.
  void build(const float *plane, int64_t first_row, const float *taps[9]) {
    const float *zeros = scratch_.data() + 3 * row_len_;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t r = first_row + kh;
      float *p = scratch_.data() + kh * row_len_;
      const float *src = nullptr;
      if (source_ == Source::kZeroInserted) {
        if (r >= 0 && r % 2 == 0 && r / 2 < src_height_) src = plane + (r / 2) * src_width_;
      } else if (r >= 0 && r < src_height_) {
        src = plane + r * src_width_;
      }
      if (src == nullptr) {
        for (int kw = 0; kw < 3; ++kw) taps[3 * kh + kw] = zeros;
        continue;
      }
      if (source_ == Source::kRows) {
        p[0] = 0.0f;
        std::memcpy(p + 1, src, sizeof(float) * src_width_);
        p[src_width_ + 1] = 0.0f;
        for (int kw = 0; kw < 3; ++kw) taps[3 * kh + kw] = p + kw;
      } else if (source_ == Source::kZeroInserted) {
        // p[1 + t] = dy[t / 2] for even t: the row is 2 * src_width_ (+ padding) long, zeros elsewhere.
        p[0] = 0.0f;
        for (int64_t m = 0; m < src_width_; ++m) {
          p[1 + 2 * m] = src[m];
          p[2 + 2 * m] = 0.0f;
        }
        p[1 + 2 * src_width_] = 0.0f;
        for (int kw = 0; kw < 3; ++kw) taps[3 * kh + kw] = p + kw;
      } else {
        // padded column c + 1 = x[c]; even[m] = padded[2m], odd[m] = padded[2m + 1]
        const int64_t half = src_width_ / 2 + 2, pairs = src_width_ / 2;
        float *even = p, *odd = p + half;
        split_columns(src, even + 1, odd, pairs);
        even[0] = 0.0f;
        if (src_width_ % 2) {
          odd[pairs] = src[src_width_ - 1];
          even[pairs + 1] = 0.0f;
        }
        taps[3 * kh] = even;
        taps[3 * kh + 1] = odd;
        taps[3 * kh + 2] = even + 1;
      }
    }
  }

 private:
  Source source_;
  int64_t src_height_, src_width_, row_len_;
  std::vector<float> scratch_;  // three rows and a row of zeros
};

// y[o] = sum_k w[k] t_k[o], o < n
inline void correlate_row(const float *const t[9], const float *w, float *__restrict y, int64_t n) {
  const float *__restrict t0 = t[0], *__restrict t1 = t[1], *__restrict t2 = t[2];
  const float *__restrict t3 = t[3], *__restrict t4 = t[4], *__restrict t5 = t[5];
  const float *__restrict t6 = t[6], *__restrict t7 = t[7], *__restrict t8 = t[8];
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
#pragma omp simd
  for (int64_t o = 0; o < n; ++o)
    y[o] = w0 * t0[o] + w1 * t1[o] + w2 * t2[o] + w3 * t3[o] + w4 * t4[o] + w5 * t5[o] + w6 * t6[o] +
           w7 * t7[o] + w8 * t8[o];
}

// acc[k] += sum_o g[o] t_k[o], o < n
inline void accumulate_row(const float *const t[9], const float *__restrict g, double *acc, int64_t n) {
  const float *__restrict t0 = t[0], *__restrict t1 = t[1], *__restrict t2 = t[2];
  const float *__restrict t3 = t[3], *__restrict t4 = t[4], *__restrict t5 = t[5];
  const float *__restrict t6 = t[6], *__restrict t7 = t[7], *__restrict t8 = t[8];
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8)
  for (int64_t o = 0; o < n; ++o) {
    const float v = g[o];
    s0 += v * t0[o];
    s1 += v * t1[o];
    s2 += v * t2[o];
    s3 += v * t3[o];
    s4 += v * t4[o];
    s5 += v * t5[o];
    s6 += v * t6[o];
    s7 += v * t7[o];
    s8 += v * t8[o];
  }
  const float s[9] = {s0, s1, s2, s3, s4, s5, s6, s7, s8};
  for (int k = 0; k < 9; ++k) acc[k] += s[k];
}

Source forward_source(const Geometry &g) { return g.stride == 1 ? Source::kRows : Source::kEvenOddRows; }

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
  parallel_for(g.batch * g.channels, 9 * out_area, [=](int64_t begin, int64_t end) {
    Taps taps(forward_source(g), g.height, g.width, g.width);
    const float *t[9];
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t oh = 0; oh < g.out_height; ++oh) {
        taps.build(x + p * in_area, g.stride * oh - 1, t);
        correlate_row(t, w + 9 * (p % g.channels), y + p * out_area + oh * g.out_width, g.out_width);
      }
    }
  });
  return 0;
}

}  // namespace

// One symbol per stride: MindSpore identifies a Custom op (and caches its shape inference) by name.
COATNET_AOT_KERNEL(DwConv3x3Stride1Forward) {
  return forward(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(DwConv3x3Stride2Forward) {
  return forward(nparam, params, ndims, shapes, dtypes);
}

// Inputs: dy (B, C, OH, OW), weight (C, 1, 3, 3), x (B, C, H, W) (for its shape). Output: dx (B, C, H, W).
COATNET_AOT_KERNEL(DwConv3x3BackwardInput) {
  Geometry g;
  if (nparam != 4 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[3], shapes[0], &g)) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *w = static_cast<const float *>(params[1]);
  auto *dx = static_cast<float *>(params[3]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  const Source source = g.stride == 1 ? Source::kRows : Source::kZeroInserted;
  parallel_for(g.batch * g.channels, 9 * in_area, [=](int64_t begin, int64_t end) {
    Taps taps(source, g.out_height, g.out_width, g.stride * g.out_width + 1);
    const float *t[9];
    for (int64_t p = begin; p < end; ++p) {
      const float *k = w + 9 * (p % g.channels);
      const float turned[9] = {k[8], k[7], k[6], k[5], k[4], k[3], k[2], k[1], k[0]};
      for (int64_t i = 0; i < g.height; ++i) {
        taps.build(dy + p * out_area, i - 1, t);
        correlate_row(t, turned, dx + p * in_area + i * g.width, g.width);
      }
    }
  });
  return 0;
}

// Inputs: dy (B, C, OH, OW), x (B, C, H, W). Output: dweight (C, 1, 3, 3).
COATNET_AOT_KERNEL(DwConv3x3BackwardFilter) {
  Geometry g;
  if (nparam != 3 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[1], shapes[0], &g)) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *x = static_cast<const float *>(params[1]);
  auto *dw = static_cast<float *>(params[2]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  parallel_for(g.channels, 9 * g.batch * out_area, [=](int64_t begin, int64_t end) {
    Taps taps(forward_source(g), g.height, g.width, g.width);
    const float *t[9];
    for (int64_t c = begin; c < end; ++c) {
      double acc[9] = {0};
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t p = b * g.channels + c;
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          taps.build(x + p * in_area, g.stride * oh - 1, t);
          accumulate_row(t, dy + p * out_area + oh * g.out_width, acc, g.out_width);
        }
      }
      for (int i = 0; i < 9; ++i) dw[9 * c + i] = static_cast<float>(acc[i]);
    }
  });
  return 0;
}
