// A whole decoding step (one token through every block) as one native call: the GEMMs of the kernel
// table and the step kernels (decode_impl.h) in the order the Python decoder runs them
// (qruntime/runtime/decoder.py, Decoder._step), over buffers the caller owns. Compiled once, portable;
// every kernel it calls comes from current_table(), so the ISA level is the one selected at run time.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace qruntime::cpu {

// One projection: out[0, 0:n] = x[0, 0:k] @ W^T (+ bias), W in one of the CPU layouts (kernels.h).
struct Gemm {
  enum Kind : int { kW8A16 = 0, kW4A16 = 1, kW8A8 = 2, kSp24 = 3 };
  int kind = kW8A16;
  const void* w = nullptr;        // panels / vnni codes / sp24 values
  const int32_t* wsum = nullptr;  // W8A8
  const uint32_t* meta = nullptr; // 2:4
  const float* s = nullptr;       // scales (W8A16, W8A8, 2:4 INT8 / INT4) or INT4 s
  const float* zs = nullptr;      // INT4 zs (W4A16, 2:4 INT4)
  const float* bias = nullptr;
  int64_t kp = 0, group = 0;      // INT4: padded K, group; 2:4: padded K
  int sp24_kind = 0;
  int64_t n = 0, k = 0;
  int64_t out_offset = 0;         // where in the decode plan's output row this projection writes
  // y [m, n] = x [m, k] @ W^T (+ bias)
  void run(const float* x, int64_t m, float* y, int threads) const;
};

struct DecodeBlock {
  const float* norm1_w = nullptr;
  const float* norm1_b = nullptr;
  float eps1 = 0;
  const float* norm2_w = nullptr;
  const float* norm2_b = nullptr;
  float eps2 = 0;
  std::vector<Gemm> qkv, o, up, down;
  const float* q_norm = nullptr;  // per-head norms (Qwen3), or null
  const float* k_norm = nullptr;
  float qk_eps = 0;
  float* k_cache = nullptr;  // [kv_heads, head_dim, capacity]
  float* v_cache = nullptr;  // [kv_heads, capacity, head_dim]
};

struct DecodePlan {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, capacity = 0, intermediate = 0;
  bool layer_norm = false;  // else RMSNorm
  int act = 0;              // act_mul's code
  float scale = 0;
  const float* cos = nullptr;  // [capacity, head_dim / 2], or null: no rotary
  const float* sin = nullptr;
  // buffers, rows [1, n]: h hidden, x normed, qkv, att, r (projection out), g (up out), a (act out), logits
  float *h = nullptr, *x = nullptr, *qkv = nullptr, *att = nullptr, *r = nullptr, *g = nullptr, *a = nullptr,
        *logits = nullptr;
  std::vector<DecodeBlock> blocks;
  const float* final_w = nullptr;
  const float* final_b = nullptr;
  float final_eps = 0;
  std::vector<Gemm> head;  // empty: the caller runs the head on x

  // h (the token's embedding) -> every block -> x = final norm (-> logits when head is set)
  void run(int64_t pos, int threads) const;
};

}  // namespace qruntime::cpu
