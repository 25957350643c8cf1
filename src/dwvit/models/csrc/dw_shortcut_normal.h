// GELU's pieces for the shortcut kernel: exp for non-positive arguments, the standard normal CDF and density, and
// GELU over an image. Part of dw_shortcut_cpu.cpp (one translation unit).
#pragma once

#include <cmath>
#include <cstdint>

namespace {

// exp(y) for y <= 0: 2^n * e^f with |f| <= ln2 / 2 and a degree-7 Taylor polynomial (relative error ~5e-9).
inline float exp_nonpositive(float y) {
  y = y < -87.0f ? -87.0f : y;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (exact for |n| < 2^22; std::floor would not vectorize).
  const float n = (y * 1.44269504f + 12582912.0f) - 12582912.0f;
  const float f = (y - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return p * __builtin_bit_cast(float, (int32_t(n) + 127) << 23);
}

// The standard normal CDF Phi(x) and density phi(x) (exact GELU = x * Phi(x), its derivative Phi + x * phi),
// with erfc from Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
struct Normal {
  float cdf, pdf;
};

inline Normal normal_cdf_pdf(float x) {
  const float u = std::fabs(x) * 0.707106781f;
  const float t = 1.0f / (1.0f + 0.3275911f * u);
  const float gauss = exp_nonpositive(-u * u);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const float half_erfc = 0.5f * poly * t * gauss;
  return {x >= 0.0f ? 1.0f - half_erfc : half_erfc, gauss * 0.398942280f};
}

// Phi(x) alone, where the density is not needed (GELU itself): erf(u) = u * P(u^2) / Q(u^2) for u = |x| / sqrt(2)
// clamped to 4 (erf(4) = 1 - 1.5e-8), a rational fit of degrees 6 / 4 in u^2 made for this file by
// benchmarks/fit_normal_cdf.py (weighted least squares toward the minimax error: 5.5e-8 in exact arithmetic; in
// float32 Phi within 2e-7 and GELU within 1e-6, as close as PyTorch's own). Without exp it costs 0.37 ns per value
// against 0.57 for `normal_cdf_pdf`.
inline float normal_cdf(float x) {
  float u = std::fabs(x) * 0.707106781f;
  u = u < 4.0f ? u : 4.0f;
  const float s = u * u;
  float p = 1.921667428e-08f;
  p = p * s - 1.990414710e-06f;
  p = p * s + 1.555618142e-04f;
  p = p * s + 4.294109390e-03f;
  p = p * s + 5.243693058e-02f;
  p = p * s + 2.139693208e-01f;
  p = p * s + 1.128378678e+00f;
  float q = 1.098291254e-03f;
  q = q * s + 1.555327996e-02f;
  q = q * s + 1.208099678e-01f;
  q = q * s + 5.229530310e-01f;
  q = q * s + 1.0f;
  // The fit reaches 1 + 4e-8 just below u = 4 and float rounding adds to it: capped, Phi stays within [0, 1] (GELU
  // never changes the sign of its input).
  const float erf_half = 0.5f * u * p / q;
  const float half = erf_half < 0.5f ? erf_half : 0.5f;
  return x >= 0.0f ? 0.5f + half : 0.5f - half;
}

inline float gelu(float x) { return x * normal_cdf(x); }

void gelu_image(const float* x, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = gelu(x[i]);
}

}  // namespace
