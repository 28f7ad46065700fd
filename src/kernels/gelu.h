// GELU pieces shared by the kernels, in the two forms of MindSpore's ops.gelu: exact, x Phi(x)
// (approximate="none"), and tanh, 0.5 x (1 + tanh u) with u = sqrt(2/pi) (x + 0.044715 x^3)
// (approximate="tanh", what nn.GELU() computes). gelu<form>(x) and gelu_derivative<form>(x).
//
// Exact: erf(z), z >= 0, by Abramowitz & Stegun 7.1.26, 1 - t (a1 + t (a2 + ... a5)) exp(-z^2) with
// t = 1 / (1 + p z), |error| < 1.5e-7. exp(-z^2) also gives the normal density needed by the
// gradient: d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
//
// Tanh: 0.5 (1 + tanh u) = sigmoid(2u), evaluated from e = exp(-2|u|) <= 1 as 1 / (1 + e) for u >= 0
// and e / (1 + e) for u < 0. Unlike 1 + tanh u this loses no digits for negative u (where tanh u is
// close to -1), and it needs no libm tanh, so the loops still vectorise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace coatnet {

// exp(t) for t <= 0: t = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial
// (relative error < 1e-8), 2^n built in the exponent bits. Results below 2^-126 flush to 0.
inline float exp_nonpositive(float t) {
  t = std::max(t, -87.0f);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (vectorises, unlike roundf).
  const float n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (t - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Phi(x) and, through *density, phi(x).
inline float normal_cdf(float x, float *density) {
  const float z = __builtin_fabsf(x) * 0.70710678118654752f;
  const float e = exp_nonpositive(-z * z);
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float half_erfc = 0.5f * poly * e;  // 0.5 erfc(|x| / sqrt 2) = 1 - Phi(|x|)
  *density = e * 0.39894228040143268f;
  return x >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

// Which GELU: MindSpore's ops.gelu with approximate="none" (kExact) or "tanh" (kTanh).
enum class GeluForm { kExact, kTanh };

// The tanh form at x and, through *derivative, d/dx [x sigmoid(2u)] = sigmoid(2u) + x 2 u'(x) e / (1 + e)^2.
inline float tanh_form_gelu(float x, float *derivative) {
  constexpr float kSqrt2OverPi = 0.79788456080286536f, kCubic = 0.044715f;
  // From |x| = 10 on, |2u| > 87 and the sigmoid is 1 or 0 in float32. There e is set to 0 (rather than
  // exp_nonpositive's floor e^-87), so y is exactly x or -0 and the derivative 1 or 0, as from the stock
  // op; x^2 capped at 100 keeps |2u| past 87 and u'(x) bounded for any finite x. (Clamping x itself
  // instead, GCC splits the loop into masked paths that run ~1.4x slower.)
  const float x2 = std::min(x * x, 100.0f);
  const float u = kSqrt2OverPi * x * (1.0f + kCubic * x2);
  const float t = -2.0f * __builtin_fabsf(u);
  const float e = t > -87.0f ? exp_nonpositive(t) : 0.0f;
  const float r = 1.0f / (1.0f + e);
  const float gate = u >= 0.0f ? r : e * r;
  *derivative = gate + x * ((2.0f * kSqrt2OverPi) * (1.0f + 3.0f * kCubic * x2) * e * r * r);
  return x * gate;
}

template <GeluForm kForm>
inline float gelu(float x) {
  float unused;
  if constexpr (kForm == GeluForm::kExact) {
    return x * normal_cdf(x, &unused);
  } else {
    return tanh_form_gelu(x, &unused);
  }
}

template <GeluForm kForm>
inline float gelu_derivative(float x) {
  float derivative;
  if constexpr (kForm == GeluForm::kExact) {
    const float cdf = normal_cdf(x, &derivative);  // here the density, d/dx Phi(x)
    return cdf + x * derivative;
  } else {
    tanh_form_gelu(x, &derivative);
    return derivative;
  }
}

}  // namespace coatnet
