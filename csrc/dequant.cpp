#include "dequant.h"

#include <algorithm>
#include <thread>
#include <vector>

namespace qruntime {
namespace {

// Runs fn(row_begin, row_end) over [0, n_rows) on up to num_threads threads; small problems stay on the
// calling thread because a thread start costs more than dequantizing a few thousand values.
template <typename Fn>
void parallel_rows(int64_t n_rows, int64_t work_per_row, int num_threads, Fn fn) {
  const int64_t min_work_per_thread = 1 << 16;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n_rows));
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, n_rows * work_per_row / min_work_per_thread));
  if (threads <= 1) {
    fn(0, n_rows);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  const int64_t chunk = (n_rows + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n_rows, begin + chunk);
    if (begin < end) pool.emplace_back(fn, begin, end);
  }
  fn(0, std::min(n_rows, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace

void dequantize_int8_per_channel(const int8_t* q, const float* scales, float* out, int64_t n_rows,
                                 int64_t k, int num_threads) {
  parallel_rows(n_rows, k, num_threads, [=](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float s = scales[n];
      const int8_t* src = q + n * k;
      float* dst = out + n * k;
      for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<float>(src[i]) * s;  // vectorized at -O3
    }
  });
}

void dequantize_int4_grouped(const uint8_t* packed, const float* scales, const uint8_t* zeros, float* out,
                             int64_t n_rows, int64_t k_padded, int64_t group_size, int64_t k_out,
                             int num_threads) {
  const int64_t bytes_per_row = k_padded / 2;
  parallel_rows(n_rows, k_out, num_threads, [=](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* src = packed + n * bytes_per_row;
      float* dst = out + n * k_out;
      for (int64_t k0 = 0; k0 < k_out; k0 += group_size) {
        const int64_t g = k0 / group_size;
        const float s = scales[g * n_rows + n];
        const float z = zeros ? static_cast<float>(zeros[g * n_rows + n]) : 8.0f;
        const int64_t k1 = std::min(k_out, k0 + group_size);
        // group_size is even (a power of two >= 16, or the padded row), so k0 starts a byte.
        for (int64_t k = k0; k < k1; ++k) {
          const uint8_t byte = src[k >> 1];
          const int code = (k & 1) ? (byte >> 4) : (byte & 0x0F);
          dst[k] = (static_cast<float>(code) - z) * s;
        }
      }
    }
  });
}

}  // namespace qruntime
