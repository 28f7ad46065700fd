// Exact GELU pieces shared by the kernels: Phi(x) and phi(x) in one evaluation.
//
// erf(z), z >= 0: Abramowitz & Stegun 7.1.26, 1 - t (a1 + t (a2 + ... a5)) exp(-z^2) with
// t = 1 / (1 + p z), |error| < 1.5e-7. exp(-z^2) also gives the normal density needed by the
// gradient: d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
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

inline float gelu(float x) {
  float density;
  return x * normal_cdf(x, &density);
}

// d/dx [x Phi(x)]
inline float gelu_derivative(float x) {
  float density;
  const float cdf = normal_cdf(x, &density);
  return cdf + x * density;
}

}  // namespace coatnet
