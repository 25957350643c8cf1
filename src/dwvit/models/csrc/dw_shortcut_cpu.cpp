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
//
// Built by dw_shortcut_kernel.py with the host compiler; plain C ABI, no PyTorch headers. The source is split by
// job into headers included here, one translation unit: dw_shortcut_normal.h (GELU), dw_shortcut_grid.h (the grid
// and stencil machinery), dw_shortcut_passes.h (the four passes); this file holds the per-channel algebra (folding,
// parameter gradients, running statistics) and the C entry points.

#include <cmath>
#include <cstdint>
#include <omp.h>
#include <vector>

#include "dw_shortcut_passes.h"

namespace {

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
void dws_training_forward(const float* x, const float* add, const float* add2, float* y, int64_t batch,
                          int64_t height, int64_t width, int64_t channels, int64_t kernel, int64_t x_stride,
                          int64_t y_stride, int64_t prefix,
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
  forward(x, wa, ws, bias, add, add2, true, y, s, threads);
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

// The forward from folded kernels (eval mode, or the fused form): see `forward`; `add` and `add2` may be null.
void dws_forward(const float* x, const float* wa, const float* ws, const float* bias, const float* add,
                 const float* add2, float* y, int64_t batch, int64_t height, int64_t width, int64_t channels,
                 int64_t kernel, int64_t x_stride, int64_t y_stride, int64_t prefix, int threads) {
  forward(x, wa, ws, bias, add, add2, false, y,
          Shape{batch, height, width, channels, kernel, x_stride, y_stride, 0, prefix}, threads);
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
