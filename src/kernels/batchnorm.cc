// BatchNorm over (B, H, W) of an NCHW float32 tensor, optionally followed by GELU (exact or tanh form),
// for MindSpore CPU graphs (Custom ops, func_type "aot"). MindSpore 2.10's CPU BatchNorm and
// BatchNormGrad took ~0.43 s of a CoAtNet-0 train step and its inference BatchNorm ~0.1 s of a forward
// pass.
//
// Training: two passes per channel (statistics, then the element-wise part), channels split across
// cores; statistics accumulate in double. The running statistics are updated by the calling cell from
// the returned batch mean and (biased) variance. With GELU the normalised tensor z is never stored:
// the backward recomputes it from x and the batch statistics, which saves one activation-sized
// tensor per BatchNorm + GELU pair and the separate GELU passes.
// Inference: one pass, y = act(x * scale + shift) with per-channel scale and shift from the caller.
#include <cmath>

#include "batchnorm.h"
#include "gelu.h"
#include "parallel.h"

namespace {

using coatnet::all_float32;
using coatnet::GeluForm;
using coatnet::Nchw;
using coatnet::nchw;
using coatnet::parallel_for;

// The activation after the normalisation, as named by src.kernels.batchnorm(act): None, "gelu" (exact),
// "gelu_tanh".
enum class Act { kNone, kGelu, kGeluTanh };

constexpr GeluForm gelu_form(Act act) { return act == Act::kGeluTanh ? GeluForm::kTanh : GeluForm::kExact; }

template <Act kAct>
inline float activate(float z) {
  if constexpr (kAct == Act::kNone) {
    return z;
  } else {
    return coatnet::gelu<gelu_form(kAct)>(z);
  }
}

// Inputs: x (B, C, H, W), gamma (C), beta (C), eps (1). Outputs: y (B, C, H, W), mean (C), var (C).
template <Act kAct>
int train_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 7 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *beta = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  auto *y = static_cast<float *>(params[4]);
  auto *mean_out = static_cast<float *>(params[5]);
  auto *var_out = static_cast<float *>(params[6]);
  const Nchw l = nchw(shapes[0]);
  parallel_for(l.channels, 2 * l.batch * l.area, [=](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [mean, var] = coatnet::channel_moments(x, l, c);
      mean_out[c] = static_cast<float>(mean);
      var_out[c] = static_cast<float>(var);
      const float scale = static_cast<float>(gamma[c] / std::sqrt(var + eps));
      const float shift = static_cast<float>(beta[c] - mean * scale);
      for (int64_t b = 0; b < l.batch; ++b) {
        const float *__restrict xp = x + (b * l.channels + c) * l.area;
        float *__restrict yp = y + (b * l.channels + c) * l.area;
        for (int64_t i = 0; i < l.area; ++i) yp[i] = activate<kAct>(xp[i] * scale + shift);
      }
    }
  });
  return 0;
}

// Inputs: dy, x (B, C, H, W), gamma, beta, mean, var (C), eps (1). Outputs: dx (B, C, H, W), dgamma,
// dbeta (C). With GELU, g = dy * GELU'(z) is written to dx in the first pass and read back in the second.
template <Act kAct>
int train_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 10 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *x = static_cast<const float *>(params[1]);
  const auto *gamma = static_cast<const float *>(params[2]);
  const auto *beta = static_cast<const float *>(params[3]);
  const auto *mean = static_cast<const float *>(params[4]);
  const auto *var = static_cast<const float *>(params[5]);
  const float eps = *static_cast<const float *>(params[6]);
  auto *dx = static_cast<float *>(params[7]);
  auto *dgamma = static_cast<float *>(params[8]);
  auto *dbeta = static_cast<float *>(params[9]);
  const Nchw l = nchw(shapes[0]);
  const double count = static_cast<double>(l.batch * l.area);
  parallel_for(l.channels, 2 * l.batch * l.area, [=](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float m = mean[c];
      const double rstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
      const float a = static_cast<float>(gamma[c] * rstd);  // z = (x - m) a + beta
      const float bias = beta[c];
      double sum_g = 0.0, sum_g_xc = 0.0;
      for (int64_t b = 0; b < l.batch; ++b) {
        const int64_t plane = (b * l.channels + c) * l.area;
        const float *__restrict gp = dy + plane;
        const float *__restrict xp = x + plane;
        float *__restrict out = dx + plane;
        float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
        for (int64_t i = 0; i < l.area; ++i) {
          const float xc = xp[i] - m;
          float g = gp[i];
          if constexpr (kAct != Act::kNone) {
            g *= coatnet::gelu_derivative<gelu_form(kAct)>(xc * a + bias);
            out[i] = g;
          }
          s += g;
          t += g * xc;
        }
        sum_g += s;
        sum_g_xc += t;
      }
      dbeta[c] = static_cast<float>(sum_g);
      dgamma[c] = static_cast<float>(sum_g_xc * rstd);
      // dx = gamma rstd (g - mean(g) - xhat mean(g xhat)), xhat = (x - m) rstd
      const float mean_g = static_cast<float>(sum_g / count);
      const float k = static_cast<float>(sum_g_xc * rstd * rstd / count);
      coatnet::normalised_input_gradient(kAct != Act::kNone ? dx : dy, x, dx, l, c, a, m, mean_g, k);
    }
  });
  return 0;
}

// Inputs: x (B, C, H, W), scale (C), shift (C). Output: y (B, C, H, W).
template <Act kAct>
int inference_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 4 || !all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *scale = static_cast<const float *>(params[1]);
  const auto *shift = static_cast<const float *>(params[2]);
  auto *y = static_cast<float *>(params[3]);
  const Nchw l = nchw(shapes[0]);
  parallel_for(l.batch * l.channels, l.area, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float s = scale[p % l.channels], t = shift[p % l.channels];
      const float *__restrict xp = x + p * l.area;
      float *__restrict yp = y + p * l.area;
      for (int64_t i = 0; i < l.area; ++i) yp[i] = activate<kAct>(xp[i] * s + t);
    }
  });
  return 0;
}

}  // namespace

COATNET_AOT_KERNEL(BatchNormTrainForward) {
  return train_forward<Act::kNone>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTrainForward) {
  return train_forward<Act::kGelu>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTanhTrainForward) {
  return train_forward<Act::kGeluTanh>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormTrainBackward) {
  return train_backward<Act::kNone>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTrainBackward) {
  return train_backward<Act::kGelu>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTanhTrainBackward) {
  return train_backward<Act::kGeluTanh>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormInferenceForward) {
  return inference_forward<Act::kNone>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluInferenceForward) {
  return inference_forward<Act::kGelu>(nparam, params, ndims, shapes, dtypes);
}

COATNET_AOT_KERNEL(BatchNormGeluTanhInferenceForward) {
  return inference_forward<Act::kGeluTanh>(nparam, params, ndims, shapes, dtypes);
}
