// Python bindings of the CPU kernels: argument checks, ISA selection and GIL release; no kernel logic.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "cpu/decode_plan.h"
#include "cpu/kernels.h"

namespace py = pybind11;
namespace qc = qruntime::cpu;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

template <typename T>
void check_array(const py::array& a, const char* name, py::ssize_t ndim, bool writable = false) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) + ", expected " +
                         std::string(py::str(py::dtype::of<T>())));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + ": shape " + shape_str(a) + " has " + std::to_string(a.ndim()) +
                          " dims, expected " + std::to_string(ndim));
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": must be writable");
}

void expect_dim(const py::array& a, const char* name, py::ssize_t dim, py::ssize_t expected) {
  if (a.shape(dim) != expected) {
    throw py::value_error(std::string(name) + ": shape " + shape_str(a) + ", dim " + std::to_string(dim) +
                          " must be " + std::to_string(expected));
  }
}

int64_t blocks(int64_t n) { return (n + qc::kBlockN - 1) / qc::kBlockN; }

// x f32 [M, K], out f32 [M, n]; returns M.
int64_t check_io(const py::array& x, const py::array& out, int64_t n) {
  check_array<float>(x, "x", 2);
  check_array<float>(out, "out", 2, true);
  if (n <= 0) throw py::value_error("n=" + std::to_string(n) + ": must be positive");
  expect_dim(out, "out", 0, x.shape(0));
  expect_dim(out, "out", 1, n);
  return x.shape(0);
}

const float* vector_arg(const py::array& a, const char* name, int64_t len) {
  check_array<float>(a, name, 1);
  expect_dim(a, name, 0, len);
  return static_cast<const float*>(a.data());
}

const float* optional_vector(const py::object& obj, const char* name, int64_t len) {
  if (obj.is_none()) return nullptr;
  return vector_arg(py::reinterpret_borrow<py::array>(obj), name, len);
}

// Each GEMM's arguments checked into a qc::Gemm (k: the columns of x used), shared by the one-call
// bindings and the decode plan.
qc::Gemm w8a16_spec(int64_t k, const py::array& wp, const py::array& scales, const py::object& bias, int64_t n) {
  check_array<int8_t>(wp, "wp", 3);
  expect_dim(wp, "wp", 0, blocks(n));
  expect_dim(wp, "wp", 1, k);
  expect_dim(wp, "wp", 2, qc::kBlockN);
  qc::Gemm g;
  g.kind = qc::Gemm::kW8A16;
  g.w = wp.data();
  g.s = vector_arg(scales, "scales", blocks(n) * qc::kBlockN);
  g.bias = optional_vector(bias, "bias", blocks(n) * qc::kBlockN);
  g.n = n;
  g.k = k;
  return g;
}

qc::Gemm w4a16_spec(int64_t k, const py::array& wp, const py::array& s, const py::array& zs, int64_t group_size,
                    const py::object& bias, int64_t n) {
  check_array<uint8_t>(wp, "wp", 3);
  expect_dim(wp, "wp", 0, blocks(n));
  expect_dim(wp, "wp", 2, qc::kBlockN / 2);
  const int64_t kp = wp.shape(1);
  if (group_size <= 0 || kp % group_size != 0) {
    throw py::value_error("group_size=" + std::to_string(group_size) + ": must divide the padded K=" +
                          std::to_string(kp));
  }
  if (k > kp || k <= kp - group_size) {
    throw py::value_error("x: K=" + std::to_string(k) + " does not match the padded K=" + std::to_string(kp) +
                          " with group_size=" + std::to_string(group_size));
  }
  check_array<float>(s, "s", 2);
  check_array<float>(zs, "zs", 2);
  for (const auto* a : {&s, &zs}) {
    expect_dim(*a, a == &s ? "s" : "zs", 0, kp / group_size);
    expect_dim(*a, a == &s ? "s" : "zs", 1, blocks(n) * qc::kBlockN);
  }
  qc::Gemm g;
  g.kind = qc::Gemm::kW4A16;
  g.w = wp.data();
  g.kp = kp;
  g.s = static_cast<const float*>(s.data());
  g.zs = static_cast<const float*>(zs.data());
  g.group = group_size;
  g.bias = optional_vector(bias, "bias", blocks(n) * qc::kBlockN);
  g.n = n;
  g.k = k;
  return g;
}

qc::Gemm w8a8_spec(int64_t k, const py::array& wp, const py::array& wsum, const py::array& scales,
                   const py::object& bias, int64_t n) {
  check_array<int8_t>(wp, "wp", 4);
  expect_dim(wp, "wp", 0, blocks(n));
  expect_dim(wp, "wp", 1, (k + 3) / 4);
  expect_dim(wp, "wp", 2, qc::kBlockN);
  expect_dim(wp, "wp", 3, 4);
  check_array<int32_t>(wsum, "wsum", 1);
  expect_dim(wsum, "wsum", 0, blocks(n) * qc::kBlockN);
  qc::Gemm g;
  g.kind = qc::Gemm::kW8A8;
  g.w = wp.data();
  g.wsum = static_cast<const int32_t*>(wsum.data());
  g.s = vector_arg(scales, "scales", blocks(n) * qc::kBlockN);
  g.bias = optional_vector(bias, "bias", blocks(n) * qc::kBlockN);
  g.n = n;
  g.k = k;
  return g;
}

// values: float32 / int16 (bf16 bit patterns) / int8 [NB, Kp/4, 2, 32], or uint8 [NB, Kp/4, 2, 16]
// (INT4); the dtype selects the kernel. meta: int32 (uint32 bit patterns) [NB, ceil(Kp/32), 32];
// scales: INT8 f32 [NB*32], INT4 f32 [Kp/g, NB*32], else None; zs: INT4 only, like scales.
qc::Gemm sp24_spec(int64_t k, const py::array& values, const py::array& meta, const py::object& scales,
                   const py::object& zs, int64_t group_size, const py::object& bias, int64_t n) {
  int kind;
  if (values.dtype().is(py::dtype::of<float>())) {
    kind = qc::kSp24F32;
  } else if (values.dtype().is(py::dtype::of<int16_t>())) {
    kind = qc::kSp24Bf16;
  } else if (values.dtype().is(py::dtype::of<int8_t>())) {
    kind = qc::kSp24I8;
  } else if (values.dtype().is(py::dtype::of<uint8_t>())) {
    kind = qc::kSp24U4;
  } else {
    throw py::type_error("values: dtype " + std::string(py::str(values.dtype())) +
                         ", expected float32, int16 (bf16 bits), int8 or uint8 (INT4 codes)");
  }
  switch (kind) {
    case qc::kSp24F32: check_array<float>(values, "values", 4); break;
    case qc::kSp24Bf16: check_array<int16_t>(values, "values", 4); break;
    case qc::kSp24I8: check_array<int8_t>(values, "values", 4); break;
    default: check_array<uint8_t>(values, "values", 4); break;
  }
  const int64_t nb = blocks(n), kp = values.shape(1) * 4;
  expect_dim(values, "values", 0, nb);
  expect_dim(values, "values", 2, 2);
  expect_dim(values, "values", 3, kind == qc::kSp24U4 ? qc::kBlockN / 2 : qc::kBlockN);
  if (k > kp) {
    throw py::value_error("x: K=" + std::to_string(k) + " exceeds the padded K=" + std::to_string(kp) +
                          " of values " + shape_str(values));
  }
  check_array<int32_t>(meta, "meta", 3);  // uint32 words, as int32 (torch has no uint32 numpy bridge)
  expect_dim(meta, "meta", 0, nb);
  expect_dim(meta, "meta", 1, (kp + 31) / 32);
  expect_dim(meta, "meta", 2, qc::kBlockN);
  const float* s = nullptr;
  const float* z = nullptr;
  if (kind == qc::kSp24I8) {
    if (scales.is_none()) throw py::value_error("scales: None; INT8 values need scales [NB*32]");
    s = vector_arg(py::reinterpret_borrow<py::array>(scales), "scales", nb * qc::kBlockN);
  } else if (kind == qc::kSp24U4) {
    if (group_size <= 0 || group_size % 4 != 0 || kp % group_size != 0) {
      throw py::value_error("group_size=" + std::to_string(group_size) +
                            ": must be a multiple of 4 that divides the padded K=" + std::to_string(kp));
    }
    if (scales.is_none() || zs.is_none()) throw py::value_error("scales/zs: None; INT4 values need both");
    const auto sa = py::reinterpret_borrow<py::array>(scales), za = py::reinterpret_borrow<py::array>(zs);
    check_array<float>(sa, "scales", 2);
    check_array<float>(za, "zs", 2);
    expect_dim(sa, "scales", 0, kp / group_size);
    expect_dim(sa, "scales", 1, nb * qc::kBlockN);
    expect_dim(za, "zs", 0, kp / group_size);
    expect_dim(za, "zs", 1, nb * qc::kBlockN);
    s = static_cast<const float*>(sa.data());
    z = static_cast<const float*>(za.data());
  } else if (!scales.is_none() || !zs.is_none()) {
    throw py::value_error("scales/zs given with float values: only INT8/INT4 values have scales");
  }
  qc::Gemm g;
  g.kind = qc::Gemm::kSp24;
  g.sp24_kind = kind;
  g.w = values.data();
  g.meta = static_cast<const uint32_t*>(meta.data());
  g.s = s;
  g.zs = z;
  g.kp = kp;
  g.group = group_size;
  g.bias = optional_vector(bias, "bias", nb * qc::kBlockN);
  g.n = n;
  g.k = k;
  return g;
}

void run_gemm(const qc::Gemm& g, const py::array& x, py::array& out, int threads) {
  const int64_t m = x.shape(0);
  py::gil_scoped_release release;
  g.run(static_cast<const float*>(x.data()), m, static_cast<float*>(out.mutable_data()), threads);
}

void w8a16_gemm(const py::array& x, const py::array& wp, const py::array& scales, const py::object& bias,
                int64_t n, py::array& out, int threads) {
  check_io(x, out, n);
  run_gemm(w8a16_spec(x.shape(1), wp, scales, bias, n), x, out, threads);
}

void w4a16_gemm(const py::array& x, const py::array& wp, const py::array& s, const py::array& zs,
                int64_t group_size, const py::object& bias, int64_t n, py::array& out, int threads) {
  check_io(x, out, n);
  run_gemm(w4a16_spec(x.shape(1), wp, s, zs, group_size, bias, n), x, out, threads);
}

void w8a8_gemm(const py::array& x, const py::array& wp, const py::array& wsum, const py::array& scales,
               const py::object& bias, int64_t n, py::array& out, int threads) {
  check_io(x, out, n);
  run_gemm(w8a8_spec(x.shape(1), wp, wsum, scales, bias, n), x, out, threads);
}

void sp24_gemm(const py::array& x, const py::array& values, const py::array& meta, const py::object& scales,
               const py::object& zs, int64_t group_size, const py::object& bias, int64_t n, py::array& out,
               int threads) {
  check_io(x, out, n);
  run_gemm(sp24_spec(x.shape(1), values, meta, scales, zs, group_size, bias, n), x, out, threads);
}

void quantize_rows(const py::array& x, py::array& xq, py::array& scales) {
  check_array<float>(x, "x", 2);
  check_array<int8_t>(xq, "xq", 2, true);
  check_array<float>(scales, "scales", 1, true);
  expect_dim(xq, "xq", 0, x.shape(0));
  expect_dim(xq, "xq", 1, x.shape(1));
  expect_dim(scales, "scales", 0, x.shape(0));
  const auto& t = qc::current_table();
  py::gil_scoped_release release;
  t.quantize_rows(static_cast<const float*>(x.data()), x.shape(0), x.shape(1),
                  static_cast<int8_t*>(xq.mutable_data()), static_cast<float*>(scales.mutable_data()));
}

// A float32 C-contiguous array of `len` values, any shape (the decode buffers are [1, n] rows).
float* flat_f32(const py::array& a, const char* name, int64_t len, bool writable = false) {
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) + ", expected float32");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (a.size() != len) {
    throw py::value_error(std::string(name) + ": shape " + shape_str(a) + " holds " + std::to_string(a.size()) +
                          " values, expected " + std::to_string(len));
  }
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": must be writable");
  return static_cast<float*>(const_cast<void*>(a.data()));
}

const float* optional_flat(const py::object& obj, const char* name, int64_t len) {
  return obj.is_none() ? nullptr : flat_f32(py::reinterpret_borrow<py::array>(obj), name, len);
}

void add_rms_norm(py::array& h, const py::object& r, const py::array& w, double eps, py::array& x) {
  const int64_t n = h.size();
  float* hp = flat_f32(h, "h", n, true);
  const float* rp = optional_flat(r, "r", n);
  const float* wp = flat_f32(w, "w", n);
  float* xp = flat_f32(x, "x", n, true);
  qc::current_table().add_rms_norm(hp, rp, n, wp, static_cast<float>(eps), xp);
}

void add_layer_norm(py::array& h, const py::object& r, const py::array& w, const py::object& b, double eps,
                    py::array& x) {
  const int64_t n = h.size();
  float* hp = flat_f32(h, "h", n, true);
  const float* rp = optional_flat(r, "r", n);
  const float* wp = flat_f32(w, "w", n);
  const float* bp = optional_flat(b, "b", n);
  float* xp = flat_f32(x, "x", n, true);
  qc::current_table().add_layer_norm(hp, rp, n, wp, bp, static_cast<float>(eps), xp);
}

void act_mul(const py::array& g, int act, py::array& y) {
  if (act < 0 || act > 3) {
    throw py::value_error("act=" + std::to_string(act) + ": expected 0 (silu-gated), 1 (gelu_tanh), 2 (gelu) or 3 "
                          "(gelu_tanh-gated)");
  }
  const int64_t n = y.size();
  const float* gp = flat_f32(g, "g", act == 0 || act == 3 ? 2 * n : n);
  qc::current_table().act_mul(gp, n, act, flat_f32(y, "y", n, true));
}

void attend(py::array& qkv, int64_t heads, int64_t kv_heads, py::array& k_cache, py::array& v_cache,
            const py::object& cos, const py::object& sin, int64_t pos, double scale, py::array& out, int threads,
            const py::object& q_norm, const py::object& k_norm, double norm_eps) {
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0) {
    throw py::value_error("heads=" + std::to_string(heads) + ", kv_heads=" + std::to_string(kv_heads) +
                          ": kv_heads must be positive and divide heads");
  }
  check_array<float>(k_cache, "k_cache", 3, true);
  check_array<float>(v_cache, "v_cache", 3, true);
  const int64_t hd = k_cache.shape(1), cap = k_cache.shape(2);
  expect_dim(k_cache, "k_cache", 0, kv_heads);
  expect_dim(v_cache, "v_cache", 0, kv_heads);
  expect_dim(v_cache, "v_cache", 1, cap);
  expect_dim(v_cache, "v_cache", 2, hd);
  if (pos < 0 || pos >= cap) {
    throw py::value_error("pos=" + std::to_string(pos) + ": outside the cache's " + std::to_string(cap) + " positions");
  }
  if (cos.is_none() != sin.is_none()) throw py::value_error("cos and sin: give both or neither");
  if (!cos.is_none() && hd % 2) throw py::value_error("head_dim=" + std::to_string(hd) + ": rotary needs it even");
  qc::AttendArgs a{flat_f32(qkv, "qkv", (heads + 2 * kv_heads) * hd, true),
                   static_cast<float*>(k_cache.mutable_data()),
                   static_cast<float*>(v_cache.mutable_data()),
                   optional_flat(cos, "cos", hd / 2),
                   optional_flat(sin, "sin", hd / 2),
                   flat_f32(out, "out", heads * hd, true),
                   heads, kv_heads, hd, cap, pos, static_cast<float>(scale),
                   optional_flat(q_norm, "q_norm", hd),
                   optional_flat(k_norm, "k_norm", hd),
                   static_cast<float>(norm_eps)};
  const auto& t = qc::current_table();
  py::gil_scoped_release release;
  t.attend(&a, threads);
}

// ---- the native decoding step (cpu/decode_plan.h) ---------------------------------------------------

// A GEMM of the plan from (name, args, n, k, out_offset): name and args as the one-call bindings take
// them between x and n (qruntime.ops.registry.module_kernel_call gives them).
qc::Gemm plan_gemm(const py::tuple& spec) {
  if (spec.size() != 5) throw py::value_error("a plan GEMM is (name, args, n, k, out_offset)");
  const auto name = spec[0].cast<std::string>();
  const auto args = spec[1].cast<py::tuple>();
  const auto n = spec[2].cast<int64_t>(), k = spec[3].cast<int64_t>();
  const auto arr = [&](size_t i) { return args[i].cast<py::array>(); };
  const auto expect = [&](size_t len) {
    if (args.size() != len) {
      throw py::value_error(name + ": " + std::to_string(args.size()) + " arguments, expected " + std::to_string(len));
    }
  };
  qc::Gemm g;
  if (name == "w8a16_gemm") {
    expect(3);
    g = w8a16_spec(k, arr(0), arr(1), args[2], n);
  } else if (name == "w4a16_gemm") {
    expect(5);
    g = w4a16_spec(k, arr(0), arr(1), arr(2), args[3].cast<int64_t>(), args[4], n);
  } else if (name == "w8a8_gemm") {
    expect(4);
    g = w8a8_spec(k, arr(0), arr(1), arr(2), args[3], n);
  } else if (name == "sp24_gemm") {
    expect(6);
    g = sp24_spec(k, arr(0), arr(1), args[2], args[3], args[4].cast<int64_t>(), args[5], n);
  } else {
    throw py::value_error("plan GEMM '" + name + "': expected w8a16_gemm, w4a16_gemm, w8a8_gemm or sp24_gemm");
  }
  g.out_offset = spec[4].cast<int64_t>();
  if (n <= 0 || k <= 0 || g.out_offset < 0) {
    throw py::value_error(name + ": n=" + std::to_string(n) + ", k=" + std::to_string(k) + ", out_offset=" +
                          std::to_string(g.out_offset) + ": n and k must be positive, out_offset >= 0");
  }
  return g;
}

class PyDecodePlan {
 public:
  // buffers: (h, x, qkv, att, r, g, a, logits) float32 rows; logits may be None (the caller runs the head)
  PyDecodePlan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
               bool layer_norm, int act, double scale, const py::tuple& buffers) {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || hidden <= 0 || intermediate <= 0) {
      throw py::value_error("heads=" + std::to_string(heads) + ", kv_heads=" + std::to_string(kv_heads) +
                            ", head_dim=" + std::to_string(head_dim) + ", hidden=" + std::to_string(hidden) +
                            ", intermediate=" + std::to_string(intermediate) +
                            ": all positive, kv_heads dividing heads");
    }
    if (act < 0 || act > 3) throw py::value_error("act=" + std::to_string(act) + ": expected 0, 1, 2 or 3");
    if (buffers.size() != 8) throw py::value_error("buffers: (h, x, qkv, att, r, g, a, logits)");
    auto& p = plan_;
    p.hidden = hidden, p.heads = heads, p.kv_heads = kv_heads, p.head_dim = head_dim;
    p.intermediate = intermediate, p.layer_norm = layer_norm, p.act = act, p.scale = static_cast<float>(scale);
    const int64_t width = act == 0 || act == 3 ? 2 * intermediate : intermediate;
    const char* names[] = {"h", "x", "qkv", "att", "r", "g", "a"};
    const int64_t sizes[] = {hidden, hidden, (heads + 2 * kv_heads) * head_dim, heads * head_dim, hidden, width,
                             intermediate};
    float** slots[] = {&p.h, &p.x, &p.qkv, &p.att, &p.r, &p.g, &p.a};
    for (int i = 0; i < 7; ++i) *slots[i] = flat_f32(buffers[i].cast<py::array>(), names[i], sizes[i], true);
    if (!buffers[7].is_none()) {
      const auto logits = buffers[7].cast<py::array>();
      p.logits = flat_f32(logits, "logits", logits.size(), true);
    }
    keep_.append(buffers);
  }

  // qk_norm: (q weight [hd], k weight [hd], eps) of per-head norms, or None
  void add_block(const py::tuple& norm1, const py::tuple& norm2, const py::list& qkv, const py::list& o,
                 const py::list& up, const py::list& down, const py::object& qk_norm) {
    auto& p = plan_;
    qc::DecodeBlock b;
    if (!qk_norm.is_none()) {
      const auto t = qk_norm.cast<py::tuple>();
      if (t.size() != 3) throw py::value_error("qk_norm is (q weight, k weight, eps)");
      b.q_norm = flat_f32(t[0].cast<py::array>(), "q_norm", p.head_dim);
      b.k_norm = flat_f32(t[1].cast<py::array>(), "k_norm", p.head_dim);
      b.qk_eps = t[2].cast<float>();
    }
    read_norm(norm1, &b.norm1_w, &b.norm1_b, &b.eps1);
    read_norm(norm2, &b.norm2_w, &b.norm2_b, &b.eps2);
    const int64_t q = p.heads * p.head_dim;
    b.qkv = gemms(qkv, p.hidden, q + 2 * p.kv_heads * p.head_dim, "qkv");
    b.o = gemms(o, q, p.hidden, "o");
    b.up = gemms(up, p.hidden, p.act == 0 || p.act == 3 ? 2 * p.intermediate : p.intermediate, "up");
    b.down = gemms(down, p.intermediate, p.hidden, "down");
    p.blocks.push_back(std::move(b));
    keep_.append(py::make_tuple(norm1, norm2, qkv, o, up, down, qk_norm));
  }

  void set_final(const py::tuple& norm, const py::list& head) {
    auto& p = plan_;
    read_norm(norm, &p.final_w, &p.final_b, &p.final_eps);
    if (head.size() && p.logits == nullptr) throw py::value_error("head GEMMs given without a logits buffer");
    int64_t width = 0;
    for (const auto& spec : head) width += spec.cast<py::tuple>()[2].cast<int64_t>();
    p.head = gemms(head, p.hidden, width, "head");
    keep_.append(py::make_tuple(norm, head));
  }

  // every block's caches: k [kv_heads, head_dim, capacity], v [kv_heads, capacity, head_dim]; rotary
  // cos / sin [capacity, head_dim / 2] or None
  void set_state(const py::list& k, const py::list& v, const py::object& cos, const py::object& sin) {
    auto& p = plan_;
    if (k.size() != p.blocks.size() || v.size() != p.blocks.size()) {
      throw py::value_error(std::to_string(k.size()) + " / " + std::to_string(v.size()) + " caches for " +
                            std::to_string(p.blocks.size()) + " blocks");
    }
    int64_t cap = -1;
    for (size_t i = 0; i < p.blocks.size(); ++i) {
      auto kc = k[i].cast<py::array>(), vc = v[i].cast<py::array>();
      check_array<float>(kc, "k_cache", 3, true);
      check_array<float>(vc, "v_cache", 3, true);
      if (cap < 0) cap = kc.shape(2);
      expect_dim(kc, "k_cache", 0, p.kv_heads);
      expect_dim(kc, "k_cache", 1, p.head_dim);
      expect_dim(kc, "k_cache", 2, cap);
      expect_dim(vc, "v_cache", 0, p.kv_heads);
      expect_dim(vc, "v_cache", 1, cap);
      expect_dim(vc, "v_cache", 2, p.head_dim);
      p.blocks[i].k_cache = static_cast<float*>(kc.mutable_data());
      p.blocks[i].v_cache = static_cast<float*>(vc.mutable_data());
    }
    if (cos.is_none() != sin.is_none()) throw py::value_error("cos and sin: give both or neither");
    p.cos = optional_flat(cos, "cos", cap * (p.head_dim / 2));
    p.sin = optional_flat(sin, "sin", cap * (p.head_dim / 2));
    p.capacity = cap;
    state_ = py::make_tuple(k, v, cos, sin);
  }

  void run(int64_t pos, int threads) {
    const auto& p = plan_;
    if (p.capacity <= 0) throw py::value_error("set_state first: the plan has no KV cache");
    if (pos < 0 || pos >= p.capacity) {
      throw py::value_error("pos=" + std::to_string(pos) + ": outside the cache's " + std::to_string(p.capacity) +
                            " positions");
    }
    if (p.final_w == nullptr) throw py::value_error("set_final first: the plan has no final norm");
    py::gil_scoped_release release;
    p.run(pos, threads);
  }

 private:
  void read_norm(const py::tuple& norm, const float** w, const float** b, float* eps) {
    if (norm.size() != 3) throw py::value_error("a norm is (weight, bias or None, eps)");
    *w = flat_f32(norm[0].cast<py::array>(), "norm weight", plan_.hidden);
    *b = optional_flat(norm[1], "norm bias", plan_.hidden);
    if (*b != nullptr && !plan_.layer_norm) throw py::value_error("norm bias given to an RMSNorm plan");
    *eps = norm[2].cast<float>();
  }

  static std::vector<qc::Gemm> gemms(const py::list& specs, int64_t k, int64_t width, const char* what) {
    std::vector<qc::Gemm> out;
    int64_t covered = 0;
    for (const auto& spec : specs) {
      out.push_back(plan_gemm(spec.cast<py::tuple>()));
      const auto& g = out.back();
      if (g.k != k || g.out_offset != covered) {
        throw py::value_error(std::string(what) + ": a GEMM with k=" + std::to_string(g.k) + " at offset " +
                              std::to_string(g.out_offset) + ", expected k=" + std::to_string(k) + " at offset " +
                              std::to_string(covered));
      }
      covered += g.n;
    }
    if (covered != width) {
      throw py::value_error(std::string(what) + ": GEMMs cover " + std::to_string(covered) + " outputs, expected " +
                            std::to_string(width));
    }
    return out;
  }

  qc::DecodePlan plan_;
  py::list keep_;    // everything the plan points into
  py::object state_;
};

qc::Isa parse_isa(const std::string& name) {
  qc::Isa isa;
  if (!qc::isa_from_name(name.c_str(), &isa)) {
    std::string known;
    for (int i = 0; i < qc::kNumIsa; ++i) known += std::string(i ? ", " : "") + qc::isa_name(static_cast<qc::Isa>(i));
    throw py::value_error("ISA '" + name + "': unknown; expected one of " + known);
  }
  return isa;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qruntime C++ CPU kernels (layouts: docs/formats.md, 'CPU layouts')";
  m.def("w8a16_gemm", &w8a16_gemm, py::arg("x"), py::arg("wp"), py::arg("scales"), py::arg("bias"), py::arg("n"),
        py::arg("out"), py::arg("num_threads") = 1,
        "x f32 [M, K], wp int8 [NB, K, 32], scales/bias f32 [NB*32] -> out f32 [M, n]");
  m.def("w4a16_gemm", &w4a16_gemm, py::arg("x"), py::arg("wp"), py::arg("s"), py::arg("zs"), py::arg("group_size"),
        py::arg("bias"), py::arg("n"), py::arg("out"), py::arg("num_threads") = 1,
        "x f32 [M, K], wp u8 [NB, Kp, 16], s/zs f32 [Kp/g, NB*32], bias f32 [NB*32] -> out f32 [M, n]");
  m.def("w8a8_gemm", &w8a8_gemm, py::arg("x"), py::arg("wp"), py::arg("wsum"), py::arg("scales"), py::arg("bias"),
        py::arg("n"), py::arg("out"), py::arg("num_threads") = 1,
        "x f32 [M, K] (quantized per token inside), wp int8 [NB, ceil(K/4), 32, 4], wsum int32 [NB*32]");
  m.def("sp24_gemm", &sp24_gemm, py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("scales"), py::arg("zs"),
        py::arg("group_size"), py::arg("bias"), py::arg("n"), py::arg("out"), py::arg("num_threads") = 1,
        "2:4 sparse: x f32 [M, K], values [NB, Kp/4, 2, 32] f32 / int16 (bf16 bits) / int8 or u8 "
        "[NB, Kp/4, 2, 16] (INT4), meta int32 [NB, ceil(Kp/32), 32], scales (INT8 [NB*32], INT4 [Kp/g, NB*32]), "
        "zs (INT4) -> out f32 [M, n]");
  m.def("add_rms_norm", &add_rms_norm, py::arg("h"), py::arg("r"), py::arg("w"), py::arg("eps"), py::arg("x"),
        "decode step: h += r (r may be None), x = RMSNorm(h) * w");
  m.def("add_layer_norm", &add_layer_norm, py::arg("h"), py::arg("r"), py::arg("w"), py::arg("b"), py::arg("eps"),
        py::arg("x"), "decode step: h += r (r may be None), x = LayerNorm(h) * w + b");
  m.def("act_mul", &act_mul, py::arg("g"), py::arg("act"), py::arg("y"),
        "decode step: act 0 y = silu(g[:n]) * g[n:]; 1 y = gelu_tanh(g); 2 y = gelu(g); 3 y = gelu_tanh(g[:n]) * g[n:]");
  m.def("attend", &attend, py::arg("qkv"), py::arg("heads"), py::arg("kv_heads"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cos"), py::arg("sin"), py::arg("pos"), py::arg("scale"), py::arg("out"),
        py::arg("threads"), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(), py::arg("norm_eps") = 0.0,
        "decode step: one token's per-head norms, rotary, KV-cache write and attention (kernels.h AttendArgs)");
  py::class_<PyDecodePlan>(m, "DecodePlan", "a whole decoding step as one call (cpu/decode_plan.h)")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool, int, double, const py::tuple&>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("layer_norm"), py::arg("act"), py::arg("scale"), py::arg("buffers"))
      .def("add_block", &PyDecodePlan::add_block, py::arg("norm1"), py::arg("norm2"), py::arg("qkv"), py::arg("o"),
           py::arg("up"), py::arg("down"), py::arg("qk_norm") = py::none())
      .def("set_final", &PyDecodePlan::set_final, py::arg("norm"), py::arg("head"))
      .def("set_state", &PyDecodePlan::set_state, py::arg("k_caches"), py::arg("v_caches"), py::arg("cos"),
           py::arg("sin"))
      .def("run", &PyDecodePlan::run, py::arg("pos"), py::arg("threads"));
  m.def("quantize_rows", &quantize_rows, py::arg("x"), py::arg("xq"), py::arg("scales"),
        "per-token INT8: x f32 [M, K] -> xq int8 [M, K], scales f32 [M]");
  m.def("isa", [] { return std::string(qc::isa_name(qc::current_isa())); }, "the ISA level the kernels run");
  m.def("best_isa", [] { return std::string(qc::isa_name(qc::best_isa())); });
  m.def("bf16_rows", [] { return qc::current_table().bf16_rows; },
        "from this many rows on, w8a16 / w4a16 multiply in bf16 on the current level (0: never)");
  m.def("compiled_isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i < qc::kNumIsa; ++i)
      if (qc::isa_compiled(static_cast<qc::Isa>(i))) out.emplace_back(qc::isa_name(static_cast<qc::Isa>(i)));
    return out;
  }, "the ISA levels built into this extension (whether or not this CPU runs them)");
  m.def("supported_isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i < qc::kNumIsa; ++i)
      if (qc::isa_supported(static_cast<qc::Isa>(i))) out.emplace_back(qc::isa_name(static_cast<qc::Isa>(i)));
    return out;
  });
  m.def("threading", [] { return std::string(qc::using_thread_pool() ? "pool" : "openmp"); },
        "which threads run the kernels: 'openmp' (torch's OpenMP team) or 'pool' (qruntime's own)");
  m.def("set_threading", [](const std::string& name) {
    if (name != "openmp" && name != "pool") throw py::value_error("threading '" + name + "': expected 'openmp' or 'pool'");
    if (!qc::use_thread_pool(name == "pool")) throw py::value_error("threading 'openmp': built without OpenMP");
  }, py::arg("name"));
  m.def("set_isa", [](const std::string& name) {
    const qc::Isa isa = parse_isa(name);
    if (!qc::isa_supported(isa)) {
      throw py::value_error("ISA '" + name + "': not supported by this CPU (best: " +
                            qc::isa_name(qc::best_isa()) + ")");
    }
    qc::set_isa(isa);
  }, py::arg("name"), "force a level: scalar, avx2, avx512_vnni, avx512_bf16, amx_int8, amx_bf16 (must be supported by this CPU)");
}
