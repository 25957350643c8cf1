// The depth-wise shortcut (GELU -> per-channel affine -> depth-wise k x k conv, zero padding) on channels-last
// patch tokens, as four loops that each read the big tensors once: batch statistics, forward, the backward
// reductions and the input gradient. Every kernel size and BatchNorm is folded (`fold`) into one k x k scale
// kernel `wa` and shift kernel `ws` (tap-major, `k*k x C`), so parallel branches cost one stencil.
//
// Tokens are float32 `(batch, H*W, C)` rows of C contiguous values with any batch stride (the class token is
// skipped by the caller's pointer offset). Work is split over images; an image's GELU values live in a per-thread
// buffer (H*W*C floats) that stays in cache while its stencil reads them k*k times. Reductions are summed in a
// fixed order (per image, then per thread in thread order), so a run is reproducible for a given thread count.
//
// Built by dw_shortcut_kernel.py with the host compiler; plain C ABI, no PyTorch headers.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>
#include <vector>

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

// Per-thread scratch that outlives a call: OpenMP's threads persist, and a fresh image-sized buffer per call would
// cost page faults and zeroing on every step. `slot` tells a thread's buffers apart.
float* scratch(int slot, int64_t count) {
  static thread_local std::vector<float> buffers[4];
  std::vector<float>& buffer = buffers[slot];
  if (int64_t(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Requests `count` floats from `p` into cache ahead of use. The statistics, forward and reduction passes ask for the
// next image, a row at a time while computing the current one: their tensors arrive cold from the model's other
// layers, and the arithmetic of an image otherwise waited on its loads (inside a training step the reductions took
// 1.3 ms instead of 1.1). The input gradient, whose inputs the reductions have just read, measured no gain.
inline void prefetch_read(const float* p, int64_t count) {
  for (int64_t n = 0; n < count; n += 16) __builtin_prefetch(p + n, 0, 3);
}
inline void prefetch_write(float* p, int64_t count) {
  for (int64_t n = 0; n < count; n += 16) __builtin_prefetch(p + n, 1, 3);
}

struct Shape {
  int64_t batch, height, width, channels, kernel;
  int64_t x_stride, y_stride, grad_stride;  // batch strides, in elements
  int64_t prefix = 0;  // elements before each image's patch rows (class tokens): copied or zeroed per image
};

// The in-grid tap range [first, last) of one axis for output index `i`: positions i + tap - reach.
inline void tap_range(int64_t i, int64_t size, int64_t kernel, int64_t& first, int64_t& last) {
  const int64_t reach = kernel / 2;
  first = reach - i > 0 ? reach - i : 0;
  last = size + reach - i < kernel ? size + reach - i : kernel;
}

// Per channel: count, mean and the sum of squared deviations, merged as Chan et al. combine partial variances
// (a plain sum of squares would cancel catastrophically when the mean is large against the deviation).
struct Moments {
  std::vector<double> mean, m2;
  double count = 0.0;
  explicit Moments(int64_t channels) : mean(channels, 0.0), m2(channels, 0.0) {}
  void merge(const double* other_mean, const double* other_m2, double other_count) {
    if (other_count == 0.0) return;
    const double total = count + other_count;
    for (size_t ch = 0; ch < mean.size(); ++ch) {
      const double delta = other_mean[ch] - mean[ch];
      mean[ch] += delta * other_count / total;
      m2[ch] += other_m2[ch] + delta * delta * count * other_count / total;
    }
    count = total;
  }
};

// Each image's GELU values are also written to `gelu_out` (batch stride y_stride), where `forward` reads them.
void statistics(const float* x, const Shape& s, float* gelu_out, float* mean, float* variance, float* unbiased_variance,
                int threads) {
  const int64_t pixels = s.height * s.width, c = s.channels;
  std::vector<Moments> partials(threads, Moments(c));
#pragma omp parallel num_threads(threads)
  {
    Moments& local = partials[omp_get_thread_num()];
    std::vector<double> image_mean(c), image_m2(c);
    std::vector<float> sum(c), square(c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      float* values = gelu_out + b * s.y_stride;
      const bool next = b + 1 < s.batch;
      for (int64_t p = 0; p < pixels; ++p) {
        gelu_image(x + b * s.x_stride + p * c, c, values + p * c);
        if (next) prefetch_read(x + (b + 1) * s.x_stride + p * c, c);
        if (next) prefetch_write(values + s.y_stride + p * c, c);
      }
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t p = 0; p < pixels; ++p) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) sum[ch] += values[p * c + ch];
      }
      for (int64_t ch = 0; ch < c; ++ch) sum[ch] /= float(pixels);
      std::fill(square.begin(), square.end(), 0.0f);
      for (int64_t p = 0; p < pixels; ++p) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          const float deviation = values[p * c + ch] - sum[ch];
          square[ch] += deviation * deviation;
        }
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        image_mean[ch] = sum[ch];
        image_m2[ch] = square[ch];
      }
      local.merge(image_mean.data(), image_m2.data(), double(pixels));
    }
  }
  Moments total(c);
  for (const Moments& partial : partials) total.merge(partial.mean.data(), partial.m2.data(), partial.count);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = float(total.mean[ch]);
    variance[ch] = float(total.m2[ch] / total.count);
    unbiased_variance[ch] = float(total.m2[ch] / (total.count > 1.0 ? total.count - 1.0 : 1.0));
  }
}

// The shift kernel's contribution plus the bias at every position, `(H*W, C)`: zero padding drops the taps that
// fall outside the grid, so it differs near the borders only.
std::vector<float> bias_map(const float* ws, const float* bias, const Shape& s) {
  const int64_t h_size = s.height, w_size = s.width, c = s.channels, k = s.kernel;
  std::vector<float> map(h_size * w_size * c);
  for (int64_t h = 0; h < h_size; ++h) {
    int64_t i0, i1;
    tap_range(h, h_size, k, i0, i1);
    for (int64_t w = 0; w < w_size; ++w) {
      int64_t j0, j1;
      tap_range(w, w_size, k, j0, j1);
      float* out = map.data() + (h * w_size + w) * c;
      std::memcpy(out, bias, c * sizeof(float));
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t ch = 0; ch < c; ++ch) out[ch] += ws[(i * k + j) * c + ch];
    }
  }
  return map;
}

// Sixteen floats as one value (one AVX-512 register, two AVX2 ones): the stencils below keep their accumulators in
// registers across the k*k taps, which the auto-vectoriser does not do for an array.
// (Unaligned, and allowed to alias float: a copy through memcpy would go through the stack.)
typedef float Vec __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;

inline Vec load_vec(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void store_vec(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// row[w] += sum over taps (i, j) of weight[tap] * padded[h + i][w + j] for every w of output row h, where `padded` is
// an image with K / 2 zeros on each side (out-of-grid taps then add nothing). Four outputs at a time share each
// weight load; KT fixes the kernel size at compile time (0: the runtime `kernel`).
template <int KT>
void stencil_row(const float* padded, const float* weight, const Shape& s, int64_t kernel, int64_t h, float* row) {
  const int64_t k = KT ? KT : kernel, w_size = s.width, c = s.channels, padded_width = w_size + k - 1;
  int64_t c0 = 0;
  for (; c0 + kLanes <= c; c0 += kLanes) {
    int64_t w = 0;
    for (; w + 4 <= w_size; w += 4) {
      Vec acc[4];
      for (int p = 0; p < 4; ++p) acc[p] = load_vec(row + (w + p) * c + c0);
      for (int64_t i = 0; i < k; ++i) {
        const float* v = padded + ((h + i) * padded_width + w) * c + c0;
        for (int64_t j = 0; j < k; ++j) {
          const Vec a = load_vec(weight + (i * k + j) * c + c0);
          for (int p = 0; p < 4; ++p) acc[p] += a * load_vec(v + (p + j) * c);
        }
      }
      for (int p = 0; p < 4; ++p) store_vec(row + (w + p) * c + c0, acc[p]);
    }
    for (; w < w_size; ++w) {
      Vec acc = load_vec(row + w * c + c0);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          acc += load_vec(weight + (i * k + j) * c + c0) * load_vec(padded + ((h + i) * padded_width + w + j) * c + c0);
      store_vec(row + w * c + c0, acc);
    }
  }
  for (; c0 < c; ++c0)
    for (int64_t w = 0; w < w_size; ++w)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          row[w * c + c0] += weight[(i * k + j) * c + c0] * padded[((h + i) * padded_width + w + j) * c + c0];
}

void stencil_row_any(const float* padded, const float* weight, const Shape& s, int64_t h, float* row) {
  switch (s.kernel) {
    case 3: return stencil_row<3>(padded, weight, s, 3, h, row);
    case 5: return stencil_row<5>(padded, weight, s, 5, h, row);
    case 7: return stencil_row<7>(padded, weight, s, 7, h, row);
    default: return stencil_row<0>(padded, weight, s, s.kernel, h, row);
  }
}

// A per-thread image buffer with K / 2 zeros on each side, cleared once per call: each image then overwrites only its
// interior (`fill_interior`), so the border stays zero.
struct PaddedImage {
  float* data;
  const Shape& s;
  PaddedImage(int slot, const Shape& shape) : s(shape) {
    const int64_t size = (s.height + s.kernel - 1) * (s.width + s.kernel - 1) * s.channels;
    data = scratch(slot, size);
    std::fill(data, data + size, 0.0f);
  }
  float* row(int64_t h) const {  // where row h of the grid starts
    const int64_t reach = s.kernel / 2;
    return data + ((h + reach) * (s.width + s.kernel - 1) + reach) * s.channels;
  }
};

// out[c0 : c0 + N * 16] = sum over outputs p in rows [h0, h1) and columns [w0, w1) of grad[p] * values[p + offset].
template <int N>
inline void tap_product_vectors(const float* grads, const float* values, int64_t offset, int64_t h0, int64_t h1,
                                int64_t w0, int64_t w1, const Shape& s, int64_t c0, float* out) {
  const int64_t w_size = s.width, c = s.channels;
  Vec sum[N] = {};
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const float* g = grads + (h * w_size + w) * c + c0;
      const float* v = values + (h * w_size + w) * c + offset + c0;
      for (int n = 0; n < N; ++n) sum[n] += load_vec(g + n * kLanes) * load_vec(v + n * kLanes);
    }
  }
  for (int n = 0; n < N; ++n) store_vec(out + c0 + n * kLanes, sum[n]);
}

// y = bias map + sum over in-grid taps of wa * gelu(x); with `add`, y = add + that, and the `prefix` elements before
// each image's patch rows (class tokens) copied from `add`. With `gelu_written`, y already holds GELU(x) (from
// `statistics`), which is read instead of recomputed.
void forward(const float* x, const float* wa, const float* ws, const float* bias, const float* add, bool gelu_written,
             float* y, const Shape& s, int threads) {
  const int64_t h_size = s.height, w_size = s.width, c = s.channels, row_size = w_size * c;
  const std::vector<float> start = bias_map(ws, bias, s);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(row_size);
    const PaddedImage padded(0, s);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      float* out = y + b * s.y_stride;
      const float* x_b = x + b * s.x_stride;
      for (int64_t h = 0; h < h_size; ++h) {
        if (gelu_written) std::memcpy(padded.row(h), out + h * row_size, row_size * sizeof(float));
        else gelu_image(x_b + h * row_size, row_size, padded.row(h));
      }
      const float* extra = add ? add + b * s.y_stride : nullptr;
      if (extra && s.prefix) std::memcpy(out - s.prefix, extra - s.prefix, s.prefix * sizeof(float));
      for (int64_t h = 0; h < h_size; ++h) {
        if (b + 1 < s.batch) {  // the next image's input: its stored GELU, or the tokens
          if (gelu_written) prefetch_read(out + s.y_stride + h * row_size, row_size);
          else prefetch_read(x_b + s.x_stride + h * row_size, row_size);
        }
        std::memcpy(row.data(), start.data() + h * row_size, row_size * sizeof(float));
        stencil_row_any(padded.data, wa, s, h, row.data());
        float* destination = out + h * row_size;
        if (extra) {
          const float* block = extra + h * row_size;
#pragma omp simd
          for (int64_t n = 0; n < row_size; ++n) destination[n] = row[n] + block[n];
        } else {
          std::memcpy(destination, row.data(), row_size * sizeof(float));
        }
      }
    }
  }
}

// Per tap and channel: tap_grad = sum_p grad[p] * gelu(x)[p + tap] and tap_count = sum_p grad[p] over the outputs
// p whose tap lies in the grid; the caller turns them into every weight, bias and BatchNorm gradient.
// tap_grad for a kernel size known at compile time, from GELU values in a grid padded by K / 2 zeros on each side
// (out-of-grid taps then add nothing, so every output takes every tap): for each kernel row, K register
// accumulators per block of channels, one gradient load shared by K products.
template <int K>
void tap_products(const float* grads, const float* padded, const Shape& s, float* out) {
  const int64_t h_size = s.height, w_size = s.width, c = s.channels, padded_width = w_size + K - 1;
  int64_t c0 = 0;
  for (; c0 + kLanes <= c; c0 += kLanes) {
    for (int i = 0; i < K; ++i) {
      Vec acc[K] = {};
      for (int64_t h = 0; h < h_size; ++h) {
        const float* g_row = grads + h * w_size * c + c0;
        const float* v_row = padded + (h + i) * padded_width * c + c0;
        for (int64_t w = 0; w < w_size; ++w) {
          const Vec g = load_vec(g_row + w * c);
          for (int j = 0; j < K; ++j) acc[j] += g * load_vec(v_row + (w + j) * c);
        }
      }
      for (int j = 0; j < K; ++j) store_vec(out + (i * K + j) * c + c0, acc[j]);
    }
  }
  for (; c0 < c; ++c0) {
    for (int i = 0; i < K; ++i) {
      for (int j = 0; j < K; ++j) {
        float total = 0.0f;
        for (int64_t h = 0; h < h_size; ++h)
          for (int64_t w = 0; w < w_size; ++w)
            total += grads[(h * w_size + w) * c + c0] * padded[((h + i) * padded_width + (w + j)) * c + c0];
        out[(i * K + j) * c + c0] = total;
      }
    }
  }
}

// tap_grad for any kernel size: per tap, a register block of channels accumulates over every output whose tap is in
// the grid.
void tap_products_any_size(const float* grads, const float* values, const Shape& s, float* out) {
  const int64_t h_size = s.height, w_size = s.width, c = s.channels, k = s.kernel, reach = k / 2;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t h0 = reach - i > 0 ? reach - i : 0, h1 = h_size + reach - i < h_size ? h_size + reach - i : h_size;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t w0 = reach - j > 0 ? reach - j : 0;
      const int64_t w1 = w_size + reach - j < w_size ? w_size + reach - j : w_size;
      const int64_t offset = ((i - reach) * w_size + (j - reach)) * c;
      float* tap_out = out + (i * k + j) * c;
      int64_t c0 = 0;
      for (; c0 + 4 * kLanes <= c; c0 += 4 * kLanes)
        tap_product_vectors<4>(grads, values, offset, h0, h1, w0, w1, s, c0, tap_out);
      for (; c0 + kLanes <= c; c0 += kLanes)
        tap_product_vectors<1>(grads, values, offset, h0, h1, w0, w1, s, c0, tap_out);
      for (; c0 < c; ++c0) {
        float total = 0.0f;
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w)
            total += grads[(h * w_size + w) * c + c0] * values[(h * w_size + w) * c + offset + c0];
        tap_out[c0] = total;
      }
    }
  }
}

void backward_reductions(const float* x, const float* grad, const Shape& s, double* tap_grad, double* tap_count,
                         int threads) {
  const int64_t h_size = s.height, w_size = s.width, c = s.channels, k = s.kernel, pixels = h_size * w_size;
  const int64_t taps = k * k, reach = k / 2;
  std::vector<std::vector<double>> partial_grads(threads), partial_counts(threads);
#pragma omp parallel num_threads(threads)
  {
    float* values = scratch(0, pixels * c);
    float* prefix = scratch(2, (h_size + 1) * (w_size + 1) * c);
    const PaddedImage padded(1, s);  // GELU for the fixed-size paths
    std::vector<float> image_grad(taps * c);
    std::vector<double> local_grad(taps * c, 0.0), local_count(taps * c, 0.0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      const float* grads = grad + b * s.grad_stride;
      if (k == 3 || k == 5 || k == 7) {
        for (int64_t h = 0; h < h_size; ++h) {
          gelu_image(x + b * s.x_stride + h * w_size * c, w_size * c, padded.row(h));
          if (b + 1 < s.batch) {
            prefetch_read(x + (b + 1) * s.x_stride + h * w_size * c, w_size * c);
            prefetch_read(grads + s.grad_stride + h * w_size * c, w_size * c);
          }
        }
        if (k == 3) tap_products<3>(grads, padded.data, s, image_grad.data());
        if (k == 5) tap_products<5>(grads, padded.data, s, image_grad.data());
        if (k == 7) tap_products<7>(grads, padded.data, s, image_grad.data());
      } else {
        gelu_image(x + b * s.x_stride, pixels * c, values);
        tap_products_any_size(grads, values, s, image_grad.data());
      }
      // tap_count: a rectangle sum of the gradient per tap, read from its 2-D prefix sums.
      std::fill(prefix, prefix + (w_size + 1) * c, 0.0f);
      for (int64_t h = 0; h < h_size; ++h) {
        float* row = prefix + (h + 1) * (w_size + 1) * c;
        const float* above = row - (w_size + 1) * c;
        std::fill(row, row + c, 0.0f);
        for (int64_t w = 0; w < w_size; ++w) {
          const float* g = grads + (h * w_size + w) * c;
          float* cell = row + (w + 1) * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch)
            cell[ch] = g[ch] + cell[ch - c] + above[(w + 1) * c + ch] - above[w * c + ch];
        }
      }
      for (int64_t i = 0; i < k; ++i) {
        const int64_t h0 = reach - i > 0 ? reach - i : 0;
        const int64_t h1 = h_size + reach - i < h_size ? h_size + reach - i : h_size;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t w0 = reach - j > 0 ? reach - j : 0;
          const int64_t w1 = w_size + reach - j < w_size ? w_size + reach - j : w_size;
          double* count = local_count.data() + (i * k + j) * c;
          if (h0 >= h1 || w0 >= w1) continue;
          const float* p11 = prefix + (h1 * (w_size + 1) + w1) * c;
          const float* p01 = prefix + (h0 * (w_size + 1) + w1) * c;
          const float* p10 = prefix + (h1 * (w_size + 1) + w0) * c;
          const float* p00 = prefix + (h0 * (w_size + 1) + w0) * c;
          for (int64_t ch = 0; ch < c; ++ch) count[ch] += double(p11[ch]) - p01[ch] - p10[ch] + p00[ch];
        }
      }
      for (int64_t n = 0; n < taps * c; ++n) local_grad[n] += image_grad[n];
    }
    partial_grads[omp_get_thread_num()] = std::move(local_grad);
    partial_counts[omp_get_thread_num()] = std::move(local_count);
  }
  for (size_t t = 0; t < partial_grads.size(); ++t) {  // in thread order, so that a run is reproducible
    for (int64_t n = 0; n < taps * c && !partial_grads[t].empty(); ++n) {
      tap_grad[n] += partial_grads[t][n];
      tap_count[n] += partial_counts[t][n];
    }
  }
}

// x_grad = gelu'(x) * (sum over in-grid taps of wa[tap] * grad[q - tap] + alpha + beta * gelu(x)); alpha and beta
// carry the BatchNorm batch-statistics terms (zero in eval mode). The `prefix` elements before each image's patch
// rows (class tokens, which the shortcut does not read) get zeros.
void input_gradient(const float* x, const float* grad, const float* wa, const float* alpha, const float* beta,
                    float* x_grad, const Shape& s, int threads) {
  const int64_t h_size = s.height, w_size = s.width, c = s.channels, k = s.kernel, row_size = w_size * c;
  // Input q reads output q - (tap - reach) through tap: a stencil of the padded gradient with the kernel flipped.
  std::vector<float> flipped(k * k * c);
  for (int64_t tap = 0; tap < k * k; ++tap)
    std::memcpy(flipped.data() + tap * c, wa + (k * k - 1 - tap) * c, c * sizeof(float));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(row_size);
    const PaddedImage padded(1, s);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      const float* x_b = x + b * s.x_stride;
      const float* grad_b = grad + b * s.grad_stride;
      float* out = x_grad + b * s.x_stride;
      if (s.prefix) std::memset(out - s.prefix, 0, s.prefix * sizeof(float));
      for (int64_t h = 0; h < h_size; ++h) std::memcpy(padded.row(h), grad_b + h * row_size, row_size * sizeof(float));
      for (int64_t h = 0; h < h_size; ++h) {
        for (int64_t w = 0; w < w_size; ++w) std::memcpy(row.data() + w * c, alpha, c * sizeof(float));
        stencil_row_any(padded.data, flipped.data(), s, h, row.data());
        const float* x_row = x_b + h * row_size;
        float* destination = out + h * row_size;
        for (int64_t w = 0; w < w_size; ++w) {
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t n = w * c + ch;
            const float value = x_row[n];
            const Normal normal = normal_cdf_pdf(value);
            destination[n] = (normal.cdf + value * normal.pdf) * (row[n] + beta[ch] * value * normal.cdf);
          }
        }
      }
    }
  }
}

// The branches of a shortcut, as arrays of per-branch pointers: BatchNorm weight and bias, the depth-wise conv
// weight `(C, 1, k, k)` and bias, and the `(mean, inverse deviation)` each BatchNorm normalises with.
struct Branches {
  int64_t count;
  const int64_t* sizes;
  const float* const* norm_weight;
  const float* const* norm_bias;
  const float* const* conv_weight;
  const float* const* conv_bias;
  const float* const* mean;
  const float* const* inverse_std;
};

// Every branch folded into one `kernel x kernel` window (smaller kernels centred): wa = conv * scale,
// ws = conv * shift per tap, with scale = gamma * inverse_std and shift = beta - mean * scale; bias = sum of biases.
void fold(const Branches& br, int64_t c, int64_t kernel, float* wa, float* ws, float* bias) {
  std::fill(wa, wa + kernel * kernel * c, 0.0f);
  std::fill(ws, ws + kernel * kernel * c, 0.0f);
  std::fill(bias, bias + c, 0.0f);
  for (int64_t n = 0; n < br.count; ++n) {
    const int64_t k = br.sizes[n], inset = (kernel - k) / 2;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float scale = br.norm_weight[n][ch] * br.inverse_std[n][ch];
      const float shift = br.norm_bias[n][ch] - br.mean[n][ch] * scale;
      bias[ch] += br.conv_bias[n][ch];
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j < k; ++j) {
          const float w = br.conv_weight[n][(ch * k + i) * k + j];
          const int64_t tap = (i + inset) * kernel + (j + inset);
          wa[tap * c + ch] += w * scale;
          ws[tap * c + ch] += w * shift;
        }
      }
    }
  }
}

// From the per-tap reductions of `backward_reductions`: each branch's conv weight and bias gradients and BatchNorm
// weight and bias gradients, the folded scale kernel for the input gradient, and (with batch statistics) the
// per-channel alpha and beta that carry the gradient through the batch mean and variance.
void parameter_gradients(const Branches& br, const double* tap_grad, const double* tap_count, int64_t c,
                         int64_t kernel, double count, bool batch_statistics, float* const* norm_weight_grad,
                         float* const* norm_bias_grad, float* const* conv_weight_grad, float* const* conv_bias_grad,
                         float* wa, float* alpha, float* beta) {
  std::fill(wa, wa + kernel * kernel * c, 0.0f);
  std::fill(alpha, alpha + c, 0.0f);
  std::fill(beta, beta + c, 0.0f);
  const int64_t centre = (kernel * kernel) / 2;  // in the grid for every output: its count is the bias gradient
  for (int64_t n = 0; n < br.count; ++n) {
    const int64_t k = br.sizes[n], inset = (kernel - k) / 2;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float inverse_std = br.inverse_std[n][ch], mean = br.mean[n][ch];
      const float scale = br.norm_weight[n][ch] * inverse_std;
      const float shift = br.norm_bias[n][ch] - mean * scale;
      double normalized_grad_sum = 0.0, weighted_sum = 0.0;  // sum of dL/d(normalised), and of it times GELU(x)
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t tap = ((i + inset) * kernel + (j + inset)) * c + ch;
          const float w = br.conv_weight[n][(ch * k + i) * k + j];
          conv_weight_grad[n][(ch * k + i) * k + j] = float(scale * tap_grad[tap] + shift * tap_count[tap]);
          normalized_grad_sum += w * tap_count[tap];
          weighted_sum += w * tap_grad[tap];
          wa[tap] += w * scale;
        }
      }
      conv_bias_grad[n][ch] = float(tap_count[centre * c + ch]);
      const double weight_grad = inverse_std * (weighted_sum - mean * normalized_grad_sum);
      norm_bias_grad[n][ch] = float(normalized_grad_sum);
      norm_weight_grad[n][ch] = float(weight_grad);
      if (batch_statistics) {
        alpha[ch] += float(scale * (inverse_std * weight_grad * mean - normalized_grad_sum) / count);
        beta[ch] -= float(scale * inverse_std * weight_grad / count);
      }
    }
  }
}

// nn.BatchNorm2d's training update of each branch's running statistics from the batch's, and the inverse deviation
// each branch normalises with: running = (1 - momentum) * running + momentum * batch (the variance unbiased).
void running_statistics(int64_t count, const double* eps, const double* momentum, const float* mean,
                        const float* variance, const float* unbiased_variance, float* const* running_mean,
                        float* const* running_var, float* const* inverse_std, int64_t channels) {
  for (int64_t n = 0; n < count; ++n) {
    const float m = float(momentum[n]);
    for (int64_t ch = 0; ch < channels; ++ch) {
      running_mean[n][ch] = (1.0f - m) * running_mean[n][ch] + m * mean[ch];
      running_var[n][ch] = (1.0f - m) * running_var[n][ch] + m * unbiased_variance[ch];
      inverse_std[n][ch] = 1.0f / std::sqrt(variance[ch] + float(eps[n]));
    }
  }
}

// The per-branch tensors come from Python as one table of pointers: group g holds one pointer per branch and starts
// at table[g * count] (one ctypes array per call instead of one per field).
enum Group {
  kNormWeight, kNormBias, kConvWeight, kConvBias, kRunningMean, kRunningVar, kMean, kInverseStd,
  kNormWeightGrad, kNormBiasGrad, kConvWeightGrad, kConvBiasGrad,
};

struct Table {
  int64_t count;
  void* const* pointers;
  float* const* group(Group g) const { return reinterpret_cast<float* const*>(pointers + g * count); }
  Branches branches(const int64_t* sizes) const {
    return Branches{count, sizes, group(kNormWeight), group(kNormBias), group(kConvWeight), group(kConvBias),
                    group(kMean), group(kInverseStd)};
  }
};

// Adds the seconds since the last lap to seconds[phase], where the caller asked for a profile (`seconds` non-null).
struct Stopwatch {
  double* seconds;
  double last = omp_get_wtime();
  void lap(int phase) {
    if (!seconds) return;
    const double now = omp_get_wtime();
    seconds[phase] += now - last;
    last = now;
  }
};

}  // namespace

extern "C" {

// A training-mode forward with batch statistics: the statistics pass (the batch mean into the table's kMean[0],
// which the caller makes every branch's kMean row, since all branches see the same GELU values; GELU into y),
// every branch's running statistics and inverse deviation (kInverseStd), the folding, and the forward pass.
// seconds (optional): statistics, per-channel work, forward.
void dws_training_forward(const float* x, const float* add, float* y, int64_t batch, int64_t height, int64_t width,
                          int64_t channels, int64_t kernel, int64_t x_stride, int64_t y_stride, int64_t prefix,
                          int64_t count, const int64_t* sizes, void* const* table, const double* eps,
                          const double* momentum, int threads, double* seconds) {
  const Shape s{batch, height, width, channels, kernel, x_stride, y_stride, 0, prefix};
  const Table t{count, table};
  Stopwatch clock{seconds};
  std::vector<float> moments(2 * channels);
  float* mean = t.group(kMean)[0];
  statistics(x, s, y, mean, moments.data(), moments.data() + channels, threads);
  clock.lap(0);
  running_statistics(count, eps, momentum, mean, moments.data(), moments.data() + channels, t.group(kRunningMean),
                     t.group(kRunningVar), t.group(kInverseStd), channels);
  std::vector<float> folded((2 * kernel * kernel + 1) * channels);
  float* wa = folded.data();
  float* ws = wa + kernel * kernel * channels;
  float* bias = ws + kernel * kernel * channels;
  fold(t.branches(sizes), channels, kernel, wa, ws, bias);
  clock.lap(1);
  forward(x, wa, ws, bias, add, true, y, s, threads);
  clock.lap(2);
}

// The training backward: the per-tap reductions, every branch's parameter gradients (into the table's gradient
// groups) and the input gradient (batch-statistics terms with `batch_statistics`, else the normalisation by kMean and
// kInverseStd held fixed). seconds (optional): reductions, per-channel work, input gradient.
void dws_training_backward(const float* x, const float* grad, float* x_grad, int64_t batch, int64_t height,
                           int64_t width, int64_t channels, int64_t kernel, int64_t x_stride, int64_t grad_stride,
                           int64_t prefix, int64_t count, const int64_t* sizes, void* const* table,
                           int batch_statistics, int threads, double* seconds) {
  const Shape s{batch, height, width, channels, kernel, x_stride, 0, grad_stride, prefix};
  const Table t{count, table};
  Stopwatch clock{seconds};
  std::vector<double> reductions(2 * kernel * kernel * channels, 0.0);
  double* tap_grad = reductions.data();
  double* tap_count = tap_grad + kernel * kernel * channels;
  backward_reductions(x, grad, s, tap_grad, tap_count, threads);
  clock.lap(0);
  std::vector<float> terms((kernel * kernel + 2) * channels);
  float* wa = terms.data();
  float* alpha = wa + kernel * kernel * channels;
  float* beta = alpha + channels;
  parameter_gradients(t.branches(sizes), tap_grad, tap_count, channels, kernel, double(batch * height * width),
                      batch_statistics, t.group(kNormWeightGrad), t.group(kNormBiasGrad), t.group(kConvWeightGrad),
                      t.group(kConvBiasGrad), wa, alpha, beta);
  clock.lap(1);
  input_gradient(x, grad, wa, alpha, beta, x_grad, s, threads);
  clock.lap(2);
}

// The forward from folded kernels (eval mode, or the fused form): see `forward`.
void dws_forward(const float* x, const float* wa, const float* ws, const float* bias, const float* add, float* y,
                 int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t kernel, int64_t x_stride,
                 int64_t y_stride, int64_t prefix, int threads) {
  forward(x, wa, ws, bias, add, false, y, Shape{batch, height, width, channels, kernel, x_stride, y_stride, 0, prefix},
          threads);
}

// The input gradient with a fixed folded scale kernel (the fused form: no batch-statistics terms).
void dws_input_gradient(const float* x, const float* grad, const float* wa, float* x_grad, int64_t batch,
                        int64_t height, int64_t width, int64_t channels, int64_t kernel, int64_t x_stride,
                        int64_t grad_stride, int64_t prefix, int threads) {
  const std::vector<float> no_statistics(channels, 0.0f);
  input_gradient(x, grad, wa, no_statistics.data(), no_statistics.data(), x_grad,
                 Shape{batch, height, width, channels, kernel, x_stride, 0, grad_stride, prefix}, threads);
}

// Every branch folded with the table's kMean / kInverseStd (eval mode: the running statistics): see `fold`.
void dws_fold(int64_t count, const int64_t* sizes, void* const* table, int64_t channels, int64_t kernel, float* wa,
              float* ws, float* bias) {
  fold(Table{count, table}.branches(sizes), channels, kernel, wa, ws, bias);
}

}  // extern "C"
