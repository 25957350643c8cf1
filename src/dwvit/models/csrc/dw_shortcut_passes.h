// The shortcut kernel's four passes over the tokens, each reading the big tensors once: batch statistics, forward,
// the backward reductions and the input gradient. Part of dw_shortcut_cpu.cpp (one translation unit).
#pragma once

#include <cstdint>
#include <cstring>
#include <omp.h>
#include <vector>

#include "dw_shortcut_grid.h"
#include "dw_shortcut_normal.h"

namespace {

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

// y = bias map + sum over in-grid taps of wa * gelu(x); with `add`, y = add + that, and the `prefix` elements before
// each image's patch rows (class tokens) copied from `add`. With `add2` too (the last block's residual add taken
// over), `add + add2` stands for `add`, summed first as the block would have. With `gelu_written`, y already holds
// GELU(x) (from `statistics`), which is read instead of recomputed.
void forward(const float* x, const float* wa, const float* ws, const float* bias, const float* add, const float* add2,
             bool gelu_written, float* y, const Shape& s, int threads) {
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
      const float* extra2 = add2 ? add2 + b * s.y_stride : nullptr;
      if (extra && s.prefix) {
        if (extra2) {
          for (int64_t n = -s.prefix; n < 0; ++n) out[n] = extra[n] + extra2[n];
        } else {
          std::memcpy(out - s.prefix, extra - s.prefix, s.prefix * sizeof(float));
        }
      }
      for (int64_t h = 0; h < h_size; ++h) {
        if (b + 1 < s.batch) {  // the next image's input: its stored GELU, or the tokens
          if (gelu_written) prefetch_read(out + s.y_stride + h * row_size, row_size);
          else prefetch_read(x_b + s.x_stride + h * row_size, row_size);
        }
        std::memcpy(row.data(), start.data() + h * row_size, row_size * sizeof(float));
        stencil_row_any(padded.data, wa, s, h, row.data());
        float* destination = out + h * row_size;
        if (extra2) {
          const float* block = extra + h * row_size;
          const float* residual = extra2 + h * row_size;
#pragma omp simd
          for (int64_t n = 0; n < row_size; ++n) destination[n] = row[n] + (block[n] + residual[n]);
        } else if (extra) {
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

}  // namespace
