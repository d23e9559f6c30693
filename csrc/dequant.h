// Weight dequantization for the CPU path: packed INT8/INT4 codes -> float32 rows that a BLAS GEMM
// consumes. Layouts are those of docs/formats.md. No torch headers: these build anywhere.
#pragma once
#include <cstdint>

namespace qruntime {

// out[n, k] = q[n, k] * scales[n]            q: int8 [n_rows, k], scales: f32 [n_rows], out: f32 [n_rows, k]
void dequantize_int8_per_channel(const int8_t* q, const float* scales, float* out, int64_t n_rows,
                                 int64_t k, int num_threads);

// out[n, k] = (u(n, k) - zero[g, n]) * scales[g, n] for k < k_out, g = k / group_size, where u(n, k) is
// the 4-bit code of column k in row n: byte packed[n, k / 2], low nibble for even k, high for odd k.
// packed: u8 [n_rows, k_padded / 2]; scales: f32 [k_padded / group_size, n_rows]; zeros: u8 with the
// shape of scales, or nullptr for the symmetric format (implicit zero point 8); out: f32 [n_rows, k_out].
void dequantize_int4_grouped(const uint8_t* packed, const float* scales, const uint8_t* zeros, float* out,
                             int64_t n_rows, int64_t k_padded, int64_t group_size, int64_t k_out,
                             int num_threads);

}  // namespace qruntime
