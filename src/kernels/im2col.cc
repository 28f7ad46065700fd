// 3x3 patch extraction (im2col) for a dense 3x3 convolution, NCHW float32, and its gradient (col2im),
// for MindSpore CPU graphs (Custom op, func_type "aot").
//
// MindSpore 2.10's bundled oneDNN runs a dense 3x3 convolution through its reference implementation
// on CPUs that allow AVX-512 (~1 GFLOP/s, seconds per stem convolution), while its 1x1 convolution
// takes the AVX-512 brgemm path there (150-260 GFLOP/s measured on a Zen 5 core pair). A 3x3
// convolution is a 1x1 convolution over the nine shifted copies of its input: col[b, 9c + 3kh + kw]
// = x[b, c] shifted by (kh - top, kw - left) and strided, zero outside, so that a weight (O, C, 3, 3)
// reshaped to (O, 9C, 1, 1) multiplies it directly. These kernels build col and, for the gradient,
// sum it back (each input pixel gathers the at most nine taps that read it). Planes are split
// across cores; each plane is written by one thread only.
#include "parallel.h"

namespace {

using coatnet::parallel_for;

struct Geometry {
  int64_t batch, channels, height, width, out_height, out_width;
  int stride, top, left;  // zero padding before the first row / column; the rest pads after
};

// Padding after the last row (column) that a convolution with `out` outputs reads: 0 or 1 when valid.
inline int64_t padding_after(int64_t size, int64_t out, int stride, int before) {
  return (out - 1) * stride - before + 2 - (size - 1);
}

// x (B, C, H, W) and col (B, 9C, OH, OW): the sizes must agree with stride and padding.
bool geometry(const int64_t *x, const int64_t *col, int stride, int top, int left, Geometry *g) {
  *g = {x[0], x[1], x[2], x[3], col[2], col[3], stride, top, left};
  const int64_t bottom = padding_after(g->height, g->out_height, stride, top);
  const int64_t right = padding_after(g->width, g->out_width, stride, left);
  return col[0] == x[0] && col[1] == 9 * x[1] && g->out_height > 0 && g->out_width > 0 && bottom >= 0 &&
         bottom <= 1 && right >= 0 && right <= 1;
}

bool float32_4d(int nparam, int *ndims, const char **dtypes) {
  if (!coatnet::all_float32(nparam, dtypes)) return false;
  for (int i = 0; i < nparam; ++i)
    if (ndims[i] != 4) return false;
  return true;
}

// Output column range [lo, hi) whose source column ow * stride - left + kw lies inside [0, width).
inline void valid_columns(const Geometry &g, int kw, int64_t *lo, int64_t *hi) {
  const int64_t shift = kw - g.left;  // source column = ow * stride + shift
  *lo = shift >= 0 ? 0 : (-shift + g.stride - 1) / g.stride;
  const int64_t last = g.width - 1 - shift;  // largest ow * stride allowed
  *hi = last < 0 ? 0 : std::min<int64_t>(g.out_width, last / g.stride + 1);
  if (*hi < *lo) *hi = *lo;
}

// Walks the rows of plane p's nine tap planes in col, in the order kh, kw, output row, calling
// visit(col_row, inside, source_row, lo, hi): col_row is the row's offset in col; inside says whether
// its source row lies in x (else it is padding); source_row is the offset in x of the source element
// for output column 0 (shifted by the tap, so only columns [lo, hi) may be read through it).
template <typename Visit>
inline void for_each_tap_row(const Geometry &g, int64_t p, Visit visit) {
  const int64_t in_area = g.height * g.width, out_area = g.out_height * g.out_width;
  for (int kh = 0; kh < 3; ++kh) {
    for (int kw = 0; kw < 3; ++kw) {
      int64_t lo, hi;
      valid_columns(g, kw, &lo, &hi);
      const int64_t tap = (9 * p + 3 * kh + kw) * out_area, shift = kw - g.left;
      for (int64_t oh = 0; oh < g.out_height; ++oh) {
        const int64_t ih = oh * g.stride - g.top + kh;
        visit(tap + oh * g.out_width, ih >= 0 && ih < g.height, p * in_area + ih * g.width + shift, lo, hi);
      }
    }
  }
}

int im2col(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int stride, int top,
           int left) {
  Geometry g;
  if (nparam != 2 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[0], shapes[1], stride, top, left, &g))
    return 1;
  const auto *x = static_cast<const float *>(params[0]);
  auto *col = static_cast<float *>(params[1]);
  parallel_for(g.batch * g.channels, 9 * g.out_height * g.out_width, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for_each_tap_row(g, p, [&](int64_t col_row, bool inside, int64_t source_row, int64_t lo, int64_t hi) {
        float *row = col + col_row;
        if (!inside) {
          std::memset(row, 0, sizeof(float) * g.out_width);
          return;
        }
        const float *src = x + source_row;
        for (int64_t ow = 0; ow < lo; ++ow) row[ow] = 0.0f;
        if (g.stride == 1) {
          std::memcpy(row + lo, src + lo, sizeof(float) * (hi - lo));
        } else {
#pragma omp simd
          for (int64_t ow = lo; ow < hi; ++ow) row[ow] = src[ow * 2];
        }
        for (int64_t ow = hi; ow < g.out_width; ++ow) row[ow] = 0.0f;
      });
    }
  });
  return 0;
}

int col2im(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int stride, int top,
           int left) {
  // Inputs: dcol (B, 9C, OH, OW), x (B, C, H, W) (for its shape). Output: dx (B, C, H, W).
  Geometry g;
  if (nparam != 3 || !float32_4d(nparam, ndims, dtypes) || !geometry(shapes[1], shapes[0], stride, top, left, &g))
    return 1;
  const auto *dcol = static_cast<const float *>(params[0]);
  auto *dx = static_cast<float *>(params[2]);
  const int64_t in_area = g.height * g.width;
  parallel_for(g.batch * g.channels, 9 * g.out_height * g.out_width, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      std::memset(dx + p * in_area, 0, sizeof(float) * in_area);
      // Taps in the order kh, kw, rows ascending: the sum of each pixel adds its taps in one fixed order.
      for_each_tap_row(g, p, [&](int64_t col_row, bool inside, int64_t source_row, int64_t lo, int64_t hi) {
        if (!inside) return;
        float *dst = dx + source_row;
        const float *row = dcol + col_row;
        if (g.stride == 1) {
#pragma omp simd
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += row[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow * 2] += row[ow];
        }
      });
    }
  });
  return 0;
}

}  // namespace

// One symbol per (stride, top padding, left padding): MindSpore identifies a Custom op (and caches its
// shape inference) by name. Stride 1 pads one each side; stride 2 pads one each side (symmetric) or,
// as MindSpore's pad_mode "same" on an even size, nothing before and one after.
#define COATNET_IM2COL(STRIDE, TOP, LEFT)                                           \
  COATNET_AOT_KERNEL(Im2Col3x3S##STRIDE##T##TOP##L##LEFT) {                         \
    return im2col(nparam, params, ndims, shapes, dtypes, STRIDE, TOP, LEFT);        \
  }                                                                                 \
  COATNET_AOT_KERNEL(Col2Im3x3S##STRIDE##T##TOP##L##LEFT) {                         \
    return col2im(nparam, params, ndims, shapes, dtypes, STRIDE, TOP, LEFT);        \
  }

COATNET_IM2COL(1, 1, 1)
COATNET_IM2COL(2, 1, 1)
COATNET_IM2COL(2, 0, 0)
COATNET_IM2COL(2, 0, 1)
COATNET_IM2COL(2, 1, 0)
