// The element-wise and attention steps between the GEMMs of one decoding step (one new token), written as
// plain loops that -O3 vectorizes with each level's flags. Included by gemm_impl.h inside
// namespace qruntime::cpu::QR_NS (anonymous inner namespace); see kernels.h for the contracts.
// Float sums run in a fixed order (no reassociation): results do not depend on the thread count.

thread_local Scratch t_scores;

void add_rms_norm(float* h, const float* r, int64_t n, const float* w, float eps, float* x) {
  if (r != nullptr)
    for (int64_t i = 0; i < n; ++i) h[i] += r[i];
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += h[i] * h[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = w[i] * (h[i] * inv);
}

void add_layer_norm(float* h, const float* r, int64_t n, const float* w, const float* b, float eps, float* x) {
  if (r != nullptr)
    for (int64_t i = 0; i < n; ++i) h[i] += r[i];
  float mean = 0.0f;
  for (int64_t i = 0; i < n; ++i) mean += h[i];
  mean /= static_cast<float>(n);
  float var = 0.0f;
  for (int64_t i = 0; i < n; ++i) var += (h[i] - mean) * (h[i] - mean);
  const float inv = 1.0f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = (h[i] - mean) * inv * w[i] + (b != nullptr ? b[i] : 0.0f);
}

void act_mul(const float* g, int64_t n, int act, float* y) {
  // act 0: y = silu(g[:n]) * g[n:2n]; 1: y = gelu_tanh(g[:n]); 2: y = gelu_erf(g[:n]);
  // 3: y = gelu_tanh(g[:n]) * g[n:2n]
  if (act == 0) {
    for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * g[n + i];
  } else if (act == 1 || act == 3) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = g[i];
      y[i] = 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
    if (act == 3)
      for (int64_t i = 0; i < n; ++i) y[i] *= g[n + i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * g[i] * (1.0f + std::erf(g[i] * 0.7071067811865476f));
  }
}

// Rotates x [hd] by the position's cos / sin [hd / 2] (the rotate-half convention).
inline void rotate(float* x, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

void attend_task(void* ctx, int64_t h0, int64_t h1) {
  const auto& a = *static_cast<const AttendArgs*>(ctx);
  const int64_t t = a.pos + 1, group = a.heads / a.kv_heads, hd = a.head_dim;
  auto* s = static_cast<float*>(scratch(t_scores, sizeof(float) * t));
  for (int64_t hq = h0; hq < h1; ++hq) {
    const int64_t kvh = hq / group;
    const float* q = a.q + hq * hd;
    const float* kt = a.k_cache + kvh * hd * a.capacity;  // [hd, capacity]
    const float* v = a.v_cache + kvh * a.capacity * hd;   // [capacity, hd]
    for (int64_t j = 0; j < t; ++j) s[j] = 0.0f;
    for (int64_t d = 0; d < hd; ++d) {
      const float qd = q[d] * a.scale;
      const float* row = kt + d * a.capacity;
      for (int64_t j = 0; j < t; ++j) s[j] += qd * row[j];
    }
    float mx = s[0];
    for (int64_t j = 1; j < t; ++j) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.0f;
    for (int64_t j = 0; j < t; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    float* o = a.out + hq * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
    for (int64_t j = 0; j < t; ++j) {
      const float p = s[j] / sum;
      const float* vj = v + j * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] += p * vj[d];
    }
  }
}

// x [hd] = x / sqrt(mean(x^2) + eps) * w
inline void head_norm(float* x, int64_t hd, const float* w, float eps) {
  float ss = 0.0f;
  for (int64_t i = 0; i < hd; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hd) + eps);
  for (int64_t i = 0; i < hd; ++i) x[i] = w[i] * (x[i] * inv);
}

void attend(AttendArgs* a, int threads) {
  const int64_t hd = a->head_dim, q_len = a->heads * hd, kv_len = a->kv_heads * hd;
  float* k = a->q + q_len;
  const float* v = k + kv_len;
  if (a->q_norm != nullptr)
    for (int64_t h = 0; h < a->heads; ++h) head_norm(a->q + h * hd, hd, a->q_norm, a->norm_eps);
  if (a->k_norm != nullptr)
    for (int64_t h = 0; h < a->kv_heads; ++h) head_norm(k + h * hd, hd, a->k_norm, a->norm_eps);
  if (a->cos != nullptr) {
    for (int64_t h = 0; h < a->heads; ++h) rotate(a->q + h * hd, hd, a->cos, a->sin);
    for (int64_t h = 0; h < a->kv_heads; ++h) rotate(k + h * hd, hd, a->cos, a->sin);
  }
  for (int64_t h = 0; h < a->kv_heads; ++h)
    for (int64_t d = 0; d < hd; ++d) {
      a->k_cache[(h * hd + d) * a->capacity + a->pos] = k[h * hd + d];
      a->v_cache[(h * a->capacity + a->pos) * hd + d] = v[h * hd + d];
    }
  const int64_t work = a->heads * hd * (a->pos + 1);
  parallel_for(a->heads, work >= (int64_t{1} << 16) ? threads : 1, attend_task, a);
}
