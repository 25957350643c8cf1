// The grid machinery the shortcut kernel's passes share: per-thread scratch, prefetching, the shape of a call, tap
// ranges at the borders, the bias map, 16-float vectors, the k x k stencil rows, the zero-padded image buffer and
// the per-tap products. Part of dw_shortcut_cpu.cpp (one translation unit).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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

}  // namespace
