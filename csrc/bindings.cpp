// Python bindings of the CPU kernels: argument checks, ISA selection and GIL release; no kernel logic.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

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

void w8a16_gemm(const py::array& x, const py::array& wp, const py::array& scales, const py::object& bias,
                int64_t n, py::array& out, int threads) {
  const int64_t m = check_io(x, out, n), k = x.shape(1);
  check_array<int8_t>(wp, "wp", 3);
  expect_dim(wp, "wp", 0, blocks(n));
  expect_dim(wp, "wp", 1, k);
  expect_dim(wp, "wp", 2, qc::kBlockN);
  const float* s = vector_arg(scales, "scales", blocks(n) * qc::kBlockN);
  const float* b = optional_vector(bias, "bias", blocks(n) * qc::kBlockN);
  const auto& t = qc::current_table();
  py::gil_scoped_release release;
  t.w8a16(static_cast<const float*>(x.data()), m, k, static_cast<const int8_t*>(wp.data()), s, b, n,
          static_cast<float*>(out.mutable_data()), threads);
}

void w4a16_gemm(const py::array& x, const py::array& wp, const py::array& s, const py::array& zs,
                int64_t group_size, const py::object& bias, int64_t n, py::array& out, int threads) {
  const int64_t m = check_io(x, out, n), k = x.shape(1);
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
  const float* b = optional_vector(bias, "bias", blocks(n) * qc::kBlockN);
  const auto& t = qc::current_table();
  py::gil_scoped_release release;
  t.w4a16(static_cast<const float*>(x.data()), m, k, static_cast<const uint8_t*>(wp.data()), kp,
          static_cast<const float*>(s.data()), static_cast<const float*>(zs.data()), group_size, b, n,
          static_cast<float*>(out.mutable_data()), threads);
}

void w8a8_gemm(const py::array& x, const py::array& wp, const py::array& wsum, const py::array& scales,
               const py::object& bias, int64_t n, py::array& out, int threads) {
  const int64_t m = check_io(x, out, n), k = x.shape(1);
  check_array<int8_t>(wp, "wp", 4);
  expect_dim(wp, "wp", 0, blocks(n));
  expect_dim(wp, "wp", 1, (k + 3) / 4);
  expect_dim(wp, "wp", 2, qc::kBlockN);
  expect_dim(wp, "wp", 3, 4);
  check_array<int32_t>(wsum, "wsum", 1);
  expect_dim(wsum, "wsum", 0, blocks(n) * qc::kBlockN);
  const float* s = vector_arg(scales, "scales", blocks(n) * qc::kBlockN);
  const float* b = optional_vector(bias, "bias", blocks(n) * qc::kBlockN);
  const auto& t = qc::current_table();
  py::gil_scoped_release release;
  t.w8a8(static_cast<const float*>(x.data()), m, k, static_cast<const int8_t*>(wp.data()),
         static_cast<const int32_t*>(wsum.data()), s, b, n, static_cast<float*>(out.mutable_data()), threads);
}

// values: float32 / int16 (bf16 bit patterns) / int8 [NB, Kp/4, 2, 32], or uint8 [NB, Kp/4, 2, 16]
// (INT4); the dtype selects the kernel. meta: int32 (uint32 bit patterns) [NB, ceil(Kp/32), 32];
// scales: INT8 f32 [NB*32], INT4 f32 [Kp/g, NB*32], else None; zs: INT4 only, like scales.
void sp24_gemm(const py::array& x, const py::array& values, const py::array& meta, const py::object& scales,
               const py::object& zs, int64_t group_size, const py::object& bias, int64_t n, py::array& out,
               int threads) {
  const int64_t m = check_io(x, out, n), k = x.shape(1);
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
  const float* b = optional_vector(bias, "bias", nb * qc::kBlockN);
  const auto& t = qc::current_table();
  py::gil_scoped_release release;
  t.sp24(static_cast<const float*>(x.data()), m, k, kp, kind, values.data(),
         static_cast<const uint32_t*>(meta.data()), s, z, group_size, b, n, static_cast<float*>(out.mutable_data()),
         threads);
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
