// Python bindings of the CPU kernels: argument checks and GIL release only, no kernel logic.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

#include "dequant.h"

namespace py = pybind11;

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
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": must be C-contiguous");
  }
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": must be writable");
}

void expect_dim(const py::array& a, const char* name, py::ssize_t dim, py::ssize_t expected) {
  if (a.shape(dim) != expected) {
    throw py::value_error(std::string(name) + ": shape " + shape_str(a) + ", dim " + std::to_string(dim) +
                          " must be " + std::to_string(expected));
  }
}

void dequantize_int8(const py::array& qweight, const py::array& scales, py::array& out, int num_threads) {
  check_array<int8_t>(qweight, "qweight", 2);
  check_array<float>(scales, "scales", 1);
  check_array<float>(out, "out", 2, true);
  const auto n = qweight.shape(0), k = qweight.shape(1);
  expect_dim(scales, "scales", 0, n);
  expect_dim(out, "out", 0, n);
  expect_dim(out, "out", 1, k);
  py::gil_scoped_release release;
  qruntime::dequantize_int8_per_channel(static_cast<const int8_t*>(qweight.data()),
                                        static_cast<const float*>(scales.data()),
                                        static_cast<float*>(out.mutable_data()), n, k, num_threads);
}

void dequantize_int4(const py::array& qweight, const py::array& scales, const py::object& zeros_obj,
                     int64_t group_size, py::array& out, int num_threads) {
  check_array<uint8_t>(qweight, "qweight", 2);
  check_array<float>(scales, "scales", 2);
  check_array<float>(out, "out", 2, true);
  const auto n = qweight.shape(0), k_padded = qweight.shape(1) * 2;
  if (group_size <= 0 || group_size % 2 != 0 || k_padded % group_size != 0) {
    throw py::value_error("group_size=" + std::to_string(group_size) + ": must be even and divide the padded K=" +
                          std::to_string(k_padded));
  }
  expect_dim(scales, "scales", 0, k_padded / group_size);
  expect_dim(scales, "scales", 1, n);
  expect_dim(out, "out", 0, n);
  const auto k_out = out.shape(1);
  if (k_out > k_padded || k_out <= k_padded - group_size) {
    throw py::value_error("out: " + std::to_string(k_out) + " columns do not fit padded K=" +
                          std::to_string(k_padded) + " with group_size=" + std::to_string(group_size));
  }
  const uint8_t* zeros = nullptr;
  py::array zeros_arr;
  if (!zeros_obj.is_none()) {
    zeros_arr = py::reinterpret_borrow<py::array>(zeros_obj);
    check_array<uint8_t>(zeros_arr, "zeros", 2);
    expect_dim(zeros_arr, "zeros", 0, scales.shape(0));
    expect_dim(zeros_arr, "zeros", 1, n);
    zeros = static_cast<const uint8_t*>(zeros_arr.data());
  }
  py::gil_scoped_release release;
  qruntime::dequantize_int4_grouped(static_cast<const uint8_t*>(qweight.data()),
                                    static_cast<const float*>(scales.data()), zeros,
                                    static_cast<float*>(out.mutable_data()), n, k_padded, group_size, k_out,
                                    num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qruntime C++ CPU kernels (see docs/formats.md for the layouts)";
  m.def("dequantize_int8", &dequantize_int8, py::arg("qweight"), py::arg("scales"), py::arg("out"),
        py::arg("num_threads") = 1, "int8 [N, K] * f32 scales [N] -> f32 out [N, K]");
  m.def("dequantize_int4", &dequantize_int4, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("out"), py::arg("num_threads") = 1,
        "packed u8 [N, Kp/2], f32 scales [Kp/g, N], u8 zeros [Kp/g, N] or None -> f32 out [N, K]");
}
