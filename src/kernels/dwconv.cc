// Depthwise 3x3 convolution, stride 1 or 2, padding 1, NCHW float32, and its two gradients, for
// MindSpore CPU graphs (Custom op, func_type "aot").
//
// MindSpore 2.10 runs these through oneDNN's grouped-convolution path: in a CoAtNet-0 train step
// the forward and the two backward passes of the MBConv depthwise convolutions took ~0.7 s for
// ~0.9 GMAC. Here blocks of eight output rows are copied into zero-padded scratch (it stays in L1)
// laid out so that each of the nine taps is the scratch at a fixed offset: a block is then one long
// vectorised loop (loops over single rows of 28 or 56 columns spent much of their time in vector
// remainders: this layout made the depthwise passes of a CoAtNet-0 step ~1.3x faster). The flat loop
// runs over rows of `width` columns of which the first out_width are kept; the extra columns read
// padding or the next row and are dropped (forward) or multiplied by zeros (filter gradient).
//   stride 1: padded rows of length W + 2; tap (kh, kw) at offset kh (W + 2) + kw.
//   stride 2: the padded rows split by row and column parity into four phase planes
//             P[r][c][a][b] = padded[2a + r][2b + c], row length OW + 1; tap (kh, kw) is phase
//             (kh % 2, kw % 2) at offset (kh / 2) (OW + 1) + kw / 2. Each output costs nine
//             multiply-adds, none spent on skipped positions.
// The three kernels:
//   forward          y = sum_k w[k] tap_k(x);
//   filter gradient  dw[k] = sum over planes and positions of dy tap_k(x), taps as in the forward;
//   input gradient   stride 1: the forward of dy with the kernel turned by 180 degrees;
//                    stride 2: per phase of dx, the taps of matching parity (4, 2, 2 or 1) over dy
//                    padded by one zero row and column, 9 multiply-adds per dy element in all.
// Planes (or, for the filter gradient, channels) are split across cores.
#include <cmath>

#include "batchnorm.h"
#include "gelu.h"
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

bool float32_4d(int nparam, int *ndims, const char **dtypes) {
  if (!coatnet::all_float32(nparam, dtypes)) return false;
  for (int i = 0; i < nparam; ++i)
    if (ndims[i] != 4) return false;
  return true;
}

// The nine taps of a block of up to kBlockRows output rows of a forward (or filter-gradient) pass, in
// per-thread scratch small enough to stay in L1: tap k of flat output o = (i - i0) * width + j of the
// block's rows i0 <= i < i1 (j < out_width kept) is taps()[k][o].
class ForwardTaps {
 public:
  static constexpr int64_t kBlockRows = 8;

  explicit ForwardTaps(const Geometry &g)
      : g_(g),
        width_(g.stride == 1 ? g.width + 2 : g.out_width + 1),
        rows_(kBlockRows + (g.stride == 1 ? 2 : 1)),
        phase_size_(rows_ * width_ + 2),
        scratch_(static_cast<size_t>((g.stride == 1 ? 1 : 4) * phase_size_), 0.0f) {
    for (int k = 0; k < 9; ++k) {
      const int kh = k / 3, kw = k % 3;
      tap_[k] = g.stride == 1 ? scratch_.data() + kh * width_ + kw
                              : scratch_.data() + (2 * (kh % 2) + kw % 2) * phase_size_ + (kh / 2) * width_ + kw / 2;
    }
  }

  int64_t width() const { return width_; }
  const float *const *taps() const { return tap_; }

  // Calls body(i0, i1) for each block of output rows [i0, i1), its taps filled from `plane` (H x W) as
  // source(plane value) (the zero padding stays zero).
  template <typename Source, typename Body>
  void for_blocks(const float *plane, Source source, Body body) {
    for (int64_t i0 = 0; i0 < g_.out_height; i0 += kBlockRows) {
      for (int64_t r = 0; r < rows_; ++r) fill_row(plane, i0, r, source);
      body(i0, std::min(i0 + kBlockRows, g_.out_height));
    }
  }

 private:
  // Scratch row r of the block starting at output row i0. Stride 1: padded row i0 + r, padded[r][c] =
  // source(x[r - 1][c - 1]). Stride 2: phase[p][r][b] = padded[2 (i0 + r) + p / 2][2b + p % 2].
  template <typename Source>
  void fill_row(const float *plane, int64_t i0, int64_t r, Source source) {
    float *s = scratch_.data();
    if (g_.stride == 1) {
      float *__restrict row = s + r * width_;
      const int64_t x_row = i0 + r - 1;
      if (x_row < 0 || x_row >= g_.height) {
        std::memset(row, 0, sizeof(float) * width_);
        return;
      }
      const float *__restrict src = plane + x_row * g_.width;
      row[0] = 0.0f;
      if constexpr (Source::kCopy) {
        std::memcpy(row + 1, src, sizeof(float) * g_.width);
      } else {
#pragma omp simd
        for (int64_t m = 0; m < g_.width; ++m) row[m + 1] = source(src[m]);
      }
      row[g_.width + 1] = 0.0f;
      return;
    }
    const int64_t pairs = g_.width / 2;
    for (int rp = 0; rp < 2; ++rp) {
      float *__restrict even = s + (2 * rp) * phase_size_ + r * width_;     // cp = 0: x columns -1, 1, 3, ...
      float *__restrict odd = s + (2 * rp + 1) * phase_size_ + r * width_;  // cp = 1: x columns 0, 2, 4, ...
      const int64_t x_row = 2 * (i0 + r) + rp - 1;
      if (x_row < 0 || x_row >= g_.height) {
        std::memset(even, 0, sizeof(float) * width_);
        std::memset(odd, 0, sizeof(float) * width_);
        continue;
      }
      const float *__restrict src = plane + x_row * g_.width;
#pragma omp simd
      for (int64_t m = 0; m < pairs; ++m) {
        odd[m] = source(src[2 * m]);
        even[m + 1] = source(src[2 * m + 1]);
      }
      even[0] = 0.0f;
      for (int64_t m = pairs + 1; m < width_; ++m) even[m] = 0.0f;
      for (int64_t m = pairs; m < width_; ++m) odd[m] = 0.0f;
      if (g_.width % 2) odd[pairs] = source(src[g_.width - 1]);
    }
  }

  Geometry g_;
  int64_t width_, rows_, phase_size_;
  std::vector<float> scratch_;
  const float *tap_[9];
};

// y[o] = sum_k w[k] t_k[o], o < n
inline void correlate(const float *const t[9], const float *w, float *__restrict y, int64_t n) {
  const float *__restrict t0 = t[0], *__restrict t1 = t[1], *__restrict t2 = t[2];
  const float *__restrict t3 = t[3], *__restrict t4 = t[4], *__restrict t5 = t[5];
  const float *__restrict t6 = t[6], *__restrict t7 = t[7], *__restrict t8 = t[8];
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
#pragma omp simd
  for (int64_t o = 0; o < n; ++o)
    y[o] = w0 * t0[o] + w1 * t1[o] + w2 * t2[o] + w3 * t3[o] + w4 * t4[o] + w5 * t5[o] + w6 * t6[o] +
           w7 * t7[o] + w8 * t8[o];
}

// acc[k] += sum_o g[o] t_k[o], o < n (the callers sum a plane in float, planes in double)
inline void accumulate(const float *const t[9], const float *__restrict g, float *acc, int64_t n) {
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

// Copies the kept columns of a flat result (rows of `width`) into a dense rows x cols plane.
inline void keep_columns(const float *flat, int64_t width, float *plane, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(plane + i * cols, flat + i * width, sizeof(float) * cols);
}

// What a forward or filter-gradient pass reads from its input plane: the values themselves, or
// act(v * scale + shift) (a BatchNorm + GELU in front of the convolution, never written out).
struct Copy {
  static constexpr bool kCopy = true;
  float operator()(float v) const { return v; }
};

template <coatnet::GeluForm kForm>
struct NormGelu {
  static constexpr bool kCopy = false;
  float scale, shift;
  float operator()(float v) const { return coatnet::gelu<kForm>(v * scale + shift); }
};

// Per-thread workers, one plane (b, c) at a time.
class PlaneForward {
 public:
  explicit PlaneForward(const Geometry &g)
      : g_(g), taps_(g), flat_(static_cast<size_t>(ForwardTaps::kBlockRows * taps_.width())) {}

  // y (OH x OW) = the convolution of source(x) (H x W) with the 3x3 kernel k
  template <typename Source>
  void run(const float *x, const float *k, float *y, Source source) {
    taps_.for_blocks(x, source, [&](int64_t i0, int64_t i1) {
      correlate(taps_.taps(), k, flat_.data(), (i1 - i0) * taps_.width());
      keep_columns(flat_.data(), taps_.width(), y + i0 * g_.out_width, i1 - i0, g_.out_width);
    });
  }

 private:
  Geometry g_;
  ForwardTaps taps_;
  std::vector<float> flat_;
};

class PlaneFilterGradient {
 public:
  // dy in rows of taps.width(): the extra columns stay zero, so their taps add nothing
  explicit PlaneFilterGradient(const Geometry &g)
      : g_(g), taps_(g), flat_dy_(static_cast<size_t>(ForwardTaps::kBlockRows * taps_.width()), 0.0f) {}

  // acc[k] += sum over the plane of dy tap_k(source(x)), summed in float within the plane
  template <typename Source>
  void run(const float *dy, const float *x, double *acc, Source source) {
    float sums[9] = {0};
    taps_.for_blocks(x, source, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        std::memcpy(flat_dy_.data() + (i - i0) * taps_.width(), dy + i * g_.out_width, sizeof(float) * g_.out_width);
      accumulate(taps_.taps(), flat_dy_.data(), sums, (i1 - i0) * taps_.width());
    });
    for (int i = 0; i < 9; ++i) acc[i] += sums[i];
  }

 private:
  Geometry g_;
  ForwardTaps taps_;
  std::vector<float> flat_dy_;
};

// Stride 1: the forward of dy with the kernel turned by 180 degrees. Stride 2: padded_dy[i + 1][j + 1] =
// dy[i][j], rows of wd = OW + 2; dx at padded position (2a + rp, 2b + cp) takes the taps (kh, kw) with
// kh = rp or rp + 2, kw = cp or cp + 2, each from dy[a - kh / 2][b - kw / 2] =
// padded_dy[a + 1 - kh / 2][b + 1 - kw / 2].
class PlaneInputGradient {
 public:
  explicit PlaneInputGradient(const Geometry &g)
      : g_(g), wd_(g.out_width + 2), n_((g.out_height + 1) * wd_), turned_(g),
        padded_(g.stride == 2 ? static_cast<size_t>((g.out_height + 2) * wd_ + 1) : 0, 0.0f),
        phases_(g.stride == 2 ? static_cast<size_t>(4 * n_) : 0) {}

  // dx (H x W) from dy (OH x OW) and the 3x3 kernel k
  void run(const float *dy, const float *k, float *dx) {
    if (g_.stride == 1) {
      const float turned[9] = {k[8], k[7], k[6], k[5], k[4], k[3], k[2], k[1], k[0]};
      turned_.run(dy, turned, dx, Copy{});
      return;
    }
    for (int64_t i = 0; i < g_.out_height; ++i)
      std::memcpy(padded_.data() + (i + 1) * wd_ + 1, dy + i * g_.out_width, sizeof(float) * g_.out_width);
    const float *__restrict d = padded_.data();
    const int64_t wd = wd_;
    float *__restrict p00 = phases_.data(), *__restrict p01 = p00 + n_, *__restrict p10 = p01 + n_,
                      *__restrict p11 = p10 + n_;
#pragma omp simd
    for (int64_t o = 0; o < n_; ++o) {
      const float c = d[o + wd + 1], l = d[o + wd], u = d[o + 1], ul = d[o];
      p00[o] = k[0] * c + k[2] * l + k[6] * u + k[8] * ul;
      p01[o] = k[1] * c + k[7] * u;
      p10[o] = k[3] * c + k[5] * l;
      p11[o] = k[4] * c;
    }
    // dx[r][c]: padded position (r + 1, c + 1); even c reads phase column c / 2 of cp = 1, odd c
    // column (c + 1) / 2 of cp = 0.
    for (int64_t r = 0; r < g_.height; ++r) {
      const int64_t a = (r + 1) / 2;
      const float *__restrict even_cols = ((r + 1) % 2 ? p11 : p01) + a * wd;
      const float *__restrict odd_cols = ((r + 1) % 2 ? p10 : p00) + a * wd + 1;
      float *__restrict out = dx + r * g_.width;
      const int64_t pairs = g_.width / 2;
#pragma omp simd
      for (int64_t m = 0; m < pairs; ++m) {
        out[2 * m] = even_cols[m];
        out[2 * m + 1] = odd_cols[m];
      }
      if (g_.width % 2) out[g_.width - 1] = even_cols[pairs];
    }
  }

 private:
  Geometry g_;
  int64_t wd_, n_;
  PlaneForward turned_;  // stride 1
  std::vector<float> padded_, phases_;  // stride 2
};

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
    PlaneForward plane(g);
    for (int64_t p = begin; p < end; ++p) plane.run(x + p * in_area, w + 9 * (p % g.channels), y + p * out_area, Copy{});
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
  parallel_for(g.batch * g.channels, 9 * out_area, [=](int64_t begin, int64_t end) {
    PlaneInputGradient plane(g);
    for (int64_t p = begin; p < end; ++p) plane.run(dy + p * out_area, w + 9 * (p % g.channels), dx + p * in_area);
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
    PlaneFilterGradient plane(g);
    for (int64_t c = begin; c < end; ++c) {
      double acc[9] = {0};
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t p = b * g.channels + c;
        plane.run(dy + p * out_area, x + p * in_area, acc, Copy{});
      }
      for (int i = 0; i < 9; ++i) dw[9 * c + i] = static_cast<float>(acc[i]);
    }
  });
  return 0;
}

// BatchNorm (batch statistics) + GELU followed by the depthwise convolution, for training: the MBConv's
// norm1 -> conv2_kxk. The normalised, activated tensor is never written: the forward applies BatchNorm +
// GELU while filling each block's taps (the channel's planes are in cache after the statistics pass),
// and the backward recomputes it the same way for the filter gradient and turns the convolution's input
// gradient into the BatchNorm + GELU gradient plane by plane. Against the two kernels apart this saves
// writing and reading that tensor in the forward, the input gradient's round trip and the stored
// activation itself (CoAtNet-0: 154 MB at 112 x 112 for one block). The BatchNorm arithmetic is
// batchnorm.cc's, statistics in double.
namespace {

// Inputs: x (B, C, H, W), gamma, beta (C), eps (1), weight (C, 1, 3, 3). Outputs: y (B, C, OH, OW), batch
// mean and (biased) variance (C).
template <coatnet::GeluForm kForm>
int norm_gelu_dw_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Geometry g;
  if (nparam != 8 || !coatnet::all_float32(nparam, dtypes) || ndims[0] != 4 || ndims[4] != 4 || ndims[5] != 4 ||
      !geometry(shapes[0], shapes[5], &g))
    return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *beta = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  const auto *w = static_cast<const float *>(params[4]);
  auto *y = static_cast<float *>(params[5]);
  auto *mean_out = static_cast<float *>(params[6]);
  auto *var_out = static_cast<float *>(params[7]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  const coatnet::Nchw l{g.batch, g.channels, in_area};
  parallel_for(g.channels, 2 * g.batch * in_area + 9 * g.batch * out_area, [=](int64_t begin, int64_t end) {
    PlaneForward plane(g);
    for (int64_t c = begin; c < end; ++c) {
      const auto [mean, var] = coatnet::channel_moments(x, l, c);
      mean_out[c] = static_cast<float>(mean);
      var_out[c] = static_cast<float>(var);
      const float scale = static_cast<float>(gamma[c] / std::sqrt(var + eps));
      const float shift = static_cast<float>(beta[c] - mean * scale);
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t p = b * g.channels + c;
        plane.run(x + p * in_area, w + 9 * c, y + p * out_area, NormGelu<kForm>{scale, shift});
      }
    }
  });
  return 0;
}

// Inputs: dy (B, C, OH, OW), x (B, C, H, W), gamma, beta, mean, var (C), eps (1), weight (C, 1, 3, 3).
// Outputs: dx (B, C, H, W), dgamma, dbeta (C), dweight (C, 1, 3, 3).
template <coatnet::GeluForm kForm>
int norm_gelu_dw_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Geometry g;
  if (nparam != 12 || !coatnet::all_float32(nparam, dtypes) || ndims[0] != 4 || ndims[1] != 4 ||
      !geometry(shapes[1], shapes[0], &g))
    return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *x = static_cast<const float *>(params[1]);
  const auto *gamma = static_cast<const float *>(params[2]);
  const auto *beta = static_cast<const float *>(params[3]);
  const auto *mean = static_cast<const float *>(params[4]);
  const auto *var = static_cast<const float *>(params[5]);
  const float eps = *static_cast<const float *>(params[6]);
  const auto *w = static_cast<const float *>(params[7]);
  auto *dx = static_cast<float *>(params[8]);
  auto *dgamma = static_cast<float *>(params[9]);
  auto *dbeta = static_cast<float *>(params[10]);
  auto *dw = static_cast<float *>(params[11]);
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  const coatnet::Nchw l{g.batch, g.channels, in_area};
  const double count = static_cast<double>(g.batch * in_area);
  parallel_for(g.channels, 4 * g.batch * in_area + 18 * g.batch * out_area, [=](int64_t begin, int64_t end) {
    PlaneFilterGradient filter_gradient(g);
    PlaneInputGradient input_gradient(g);
    std::vector<float> dact(static_cast<size_t>(in_area));  // gradient of the activation, one plane
    for (int64_t c = begin; c < end; ++c) {
      const float m = mean[c];
      const double rstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
      const float a = static_cast<float>(gamma[c] * rstd);  // z = (x - m) a + beta, as batchnorm.cc's backward
      const float bias = beta[c];
      // the forward's scale and shift, for the activation the convolution saw
      const float scale = static_cast<float>(gamma[c] / std::sqrt(static_cast<double>(var[c]) + eps));
      const float shift = static_cast<float>(bias - static_cast<double>(m) * scale);
      double acc[9] = {0}, sum_g = 0.0, sum_g_xc = 0.0;
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t p = b * g.channels + c;
        const float *__restrict xp = x + p * in_area;
        filter_gradient.run(dy + p * out_area, xp, acc, NormGelu<kForm>{scale, shift});
        input_gradient.run(dy + p * out_area, w + 9 * c, dact.data());
        const float *__restrict dap = dact.data();
        float *__restrict out = dx + p * in_area;
        float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
        for (int64_t i = 0; i < in_area; ++i) {
          const float xc = xp[i] - m;
          const float gz = dap[i] * coatnet::gelu_derivative<kForm>(xc * a + bias);
          out[i] = gz;
          s += gz;
          t += gz * xc;
        }
        sum_g += s;
        sum_g_xc += t;
      }
      for (int i = 0; i < 9; ++i) dw[9 * c + i] = static_cast<float>(acc[i]);
      dbeta[c] = static_cast<float>(sum_g);
      dgamma[c] = static_cast<float>(sum_g_xc * rstd);
      const float mean_g = static_cast<float>(sum_g / count);
      const float k = static_cast<float>(sum_g_xc * rstd * rstd / count);
      coatnet::normalised_input_gradient(dx, x, dx, l, c, a, m, mean_g, k);  // dx holds the gradient at z
    }
  });
  return 0;
}

}  // namespace

// One forward symbol per GELU form and stride (MindSpore keys a Custom op's shape inference by name).
COATNET_AOT_KERNEL(BatchNormGeluDwConv3x3Stride1TrainForward) {
  return norm_gelu_dw_forward<coatnet::GeluForm::kExact>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluDwConv3x3Stride2TrainForward) {
  return norm_gelu_dw_forward<coatnet::GeluForm::kExact>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTanhDwConv3x3Stride1TrainForward) {
  return norm_gelu_dw_forward<coatnet::GeluForm::kTanh>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTanhDwConv3x3Stride2TrainForward) {
  return norm_gelu_dw_forward<coatnet::GeluForm::kTanh>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluDwConv3x3TrainBackward) {
  return norm_gelu_dw_backward<coatnet::GeluForm::kExact>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTanhDwConv3x3TrainBackward) {
  return norm_gelu_dw_backward<coatnet::GeluForm::kTanh>(nparam, params, ndims, shapes, dtypes);
}
