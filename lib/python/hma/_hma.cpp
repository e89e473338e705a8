// hma._hma: the Python extension over the C++ API (include/hma), as lib/capi is for C. A
// ParamSet over buffer-protocol arrays (numpy, torch CPU tensors through .numpy()): dense ones
// are registered as they are (no copy on the Python side), strided ones through a staging array
// gathered before and scattered after each average. The averagers take a communicator handle
// (mpi4py's Comm.py2f()); hma/__init__.py and hma/torch.py build the Python faces on them.
// The GIL is released while an average runs. Device sets (__cuda_array_interface__): _hma_device.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "binding.hpp"
#include "hma/hma.hpp"

namespace py = pybind11;
using hma_py::PyRequest;

namespace {

// One registered array. `buf` holds the exporter's buffer (the exporter stays alive and a numpy
// array cannot be resized while it is held); `staging` is non-empty for a strided array.
struct Registered {
  std::unique_ptr<py::buffer_info> buf;
  std::vector<std::byte> staging;
};

bool dense(const py::buffer_info& b) { return hma_py::dense(b.shape, b.strides, b.itemsize); }

// Copies between a strided array and its dense staging (gather: array -> staging).
void copy_strided(const py::buffer_info& b, std::byte* flat, bool gather) {
  const auto item = static_cast<std::size_t>(b.itemsize);
  std::size_t k = 0;
  std::function<void(py::ssize_t, char*)> walk = [&](py::ssize_t dim, char* p) {
    if (dim == b.ndim) {
      if (gather) std::memcpy(flat + k * item, p, item);
      else std::memcpy(p, flat + k * item, item);
      ++k;
      return;
    }
    for (py::ssize_t i = 0; i < b.shape[dim]; ++i) walk(dim + 1, p + i * b.strides[dim]);
  };
  walk(0, static_cast<char*>(b.ptr));
}

// The element type of a buffer: its format ('f', 'd', 'e'), or `dtype` ("f32", "f64", "fp16",
// "bf16") for 16-bit bit patterns (torch.bfloat16 has no numpy type: pass tensor.view(int16)).
hma::Dtype dtype_of(const py::buffer_info& b, const std::optional<std::string>& dtype) {
  std::string f = b.format;
  while (!f.empty() && (f[0] == '@' || f[0] == '=' || f[0] == '<')) f.erase(0, 1);
  std::string want = dtype.value_or("");
  if (want.empty()) {
    if (f == "f") want = "f32";
    else if (f == "d") want = "f64";
    else if (f == "e") want = "fp16";
    else
      throw py::type_error("hma: ParamSet.add: arrays of format '" + b.format +
                           "' cannot be averaged: float32, float64 or float16 (or 16-bit patterns "
                           "with dtype='bf16' or 'fp16')");
  }
  const std::pair<const char*, hma::Dtype> names[] = {
      {"f32", hma::Dtype::f32}, {"f64", hma::Dtype::f64}, {"bf16", hma::Dtype::bf16}, {"fp16", hma::Dtype::fp16}};
  for (const auto& [name, d] : names) {
    if (want != name) continue;
    if (static_cast<std::size_t>(b.itemsize) != hma::dtype_size(d))
      throw py::type_error("hma: ParamSet.add: dtype '" + want + "' has " + std::to_string(hma::dtype_size(d)) +
                           "-byte elements, the array has " + std::to_string(b.itemsize) + "-byte ones (format '" +
                           b.format + "')");
    if ((d == hma::Dtype::f32 && f != "f") || (d == hma::Dtype::f64 && f != "d"))
      throw py::type_error("hma: ParamSet.add: dtype '" + want + "' does not match the array's format '" +
                           b.format + "'");
    return d;
  }
  throw py::value_error("hma: ParamSet.add: dtype must be 'f32', 'f64', 'bf16' or 'fp16', got '" + want + "'");
}

class PyParamSet {
 public:
  // Registers `array` (any writable buffer-protocol object); it must stay the same memory while
  // the set is used (the set holds the buffer, so numpy cannot resize it).
  void add(const py::buffer& array, const std::optional<std::string>& dtype) {
    auto info = std::make_unique<py::buffer_info>(array.request());
    if (info->readonly)
      throw py::value_error("hma: ParamSet.add: the array is read-only: hma writes each average into it");
    const hma::Dtype d = dtype_of(*info, dtype);
    const auto n = static_cast<std::size_t>(info->size);
    Registered r;
    void* data = info->ptr;
    if (!dense(*info)) {
      r.staging.resize(n * static_cast<std::size_t>(info->itemsize));
      data = r.staging.data();
    }
    switch (d) {
      case hma::Dtype::f32: ps_.add(std::span<float>(static_cast<float*>(data), n)); break;
      case hma::Dtype::f64: ps_.add(std::span<double>(static_cast<double*>(data), n)); break;
      case hma::Dtype::bf16: ps_.add(std::span<hma::bf16>(static_cast<hma::bf16*>(data), n)); break;
      case hma::Dtype::fp16: ps_.add(std::span<hma::fp16>(static_cast<hma::fp16*>(data), n)); break;
    }
    r.buf = std::move(info);
    if (!r.staging.empty()) ++strided_;
    regs_.push_back(std::move(r));
  }
  void gather() {
    if (strided_ == 0) return;
    for (auto& r : regs_)
      if (!r.staging.empty()) copy_strided(*r.buf, r.staging.data(), true);
  }
  void scatter() {
    if (strided_ == 0) return;
    for (auto& r : regs_)
      if (!r.staging.empty()) copy_strided(*r.buf, r.staging.data(), false);
  }
  hma::ParamSet& set() { return ps_; }
  [[nodiscard]] std::size_t strided() const { return strided_; }

 private:
  std::vector<Registered> regs_;  // declared first: destroyed after ps_ (which waits)
  std::size_t strided_ = 0;
  hma::ParamSet ps_;
};

template <class E>
E pick(const py::handle& v, const char* key, std::initializer_list<std::pair<const char*, E>> choices) {
  const auto s = py::cast<std::string>(v);
  std::string allowed;
  for (const auto& [name, e] : choices) {
    if (s == name) return e;
    allowed += std::string(allowed.empty() ? "" : ", ") + "'" + name + "'";
  }
  throw py::value_error(std::string("hma: option ") + key + " must be one of " + allowed + ", got '" + s + "'");
}

hma::Wire wire_of(const std::string& s) {
  if (s == "exact") return hma::Wire::exact;
  if (s == "bf16") return hma::Wire::bf16;
  if (s == "fp16") return hma::Wire::fp16;
  throw py::value_error("hma: option wire: each level's wire must be 'exact', 'bf16' or 'fp16', got '" + s + "'");
}

// Keyword options -> AveragerOptions (README "Python"); unset ones fall back to HMA_* and the
// defaults, as in C++.
hma::AveragerOptions options_of(const py::kwargs& kw) {
  hma::AveragerOptions o;
  for (const auto& [k, v] : kw) {
    const auto key = py::cast<std::string>(k);
    if (v.is_none()) continue;
    if (key == "timeout_s") o.timeout_s = py::cast<double>(v);
    else if (key == "chunk_bytes") o.chunk_bytes = py::cast<std::size_t>(v);
    else if (key == "check") o.check_every_average = py::cast<bool>(v);
    else if (key == "divergence") o.divergence = py::cast<bool>(v);
    else if (key == "ranks_per_node") o.hierarchy.ranks_per_node = py::cast<int>(v);
    else if (key == "progress")
      o.progress = pick<hma::Progress>(v, "progress", {{"poll", hma::Progress::poll}, {"thread", hma::Progress::thread}});
    else if (key == "reduction")
      o.reduction = pick<hma::Reduction>(
          v, "reduction", {{"auto", hma::Reduction::automatic}, {"mpi", hma::Reduction::mpi}, {"ring", hma::Reduction::ring}});
    else if (key == "algorithm")
      o.algorithm = pick<hma::Algorithm>(v, "algorithm",
                                         {{"auto", hma::Algorithm::automatic},
                                          {"flat", hma::Algorithm::flat},
                                          {"two_level", hma::Algorithm::two_level}});
    else if (key == "nonfinite")
      o.nonfinite = pick<hma::NonFinite>(
          v, "nonfinite", {{"ignore", hma::NonFinite::ignore}, {"error", hma::NonFinite::error}, {"skip", hma::NonFinite::skip}});
    else if (key == "wire") {
      std::vector<hma::Wire> w;
      if (py::isinstance<py::str>(v)) w.push_back(wire_of(py::cast<std::string>(v)));
      else
        for (const auto& x : v) w.push_back(wire_of(py::cast<std::string>(x)));
      o.wire = w;
    } else if (key == "outer") {
      const auto d = py::cast<py::dict>(v);
      hma::OuterOptimizer out;
      for (const auto& [ok, ov] : d) {
        const auto okey = py::cast<std::string>(ok);
        if (okey == "lr") out.lr = py::cast<double>(ov);
        else if (okey == "momentum") out.momentum = py::cast<double>(ov);
        else if (okey == "nesterov") out.nesterov = py::cast<bool>(ov);
        else if (okey == "level") out.level = py::cast<std::size_t>(ov);
        else
          throw py::type_error("hma: option outer: unknown key '" + okey + "' (lr, momentum, nesterov, level)");
      }
      o.outer = out;
    } else {
      throw py::type_error("hma: unknown option '" + key +
                           "' (timeout_s, chunk_bytes, check, divergence, ranks_per_node, progress, "
                           "reduction, algorithm, nonfinite, wire, outer)");
    }
  }
  return o;
}

hma::Request started(hma::Averager& a, PyParamSet& ps, std::optional<std::size_t> level) {
  ps.gather();
  py::gil_scoped_release nogil;
  return level ? a.start_average(ps.set(), *level) : a.start(ps.set());
}

}  // namespace

PYBIND11_MODULE(_hma, m) {
  m.doc() = "hma's extension module (use the hma package)";
  auto error = py::register_exception<hma::Error>(m, "Error", PyExc_RuntimeError);
  py::register_exception<hma::MismatchError>(m, "MismatchError", error.ptr());
  py::register_exception<hma::Timeout>(m, "Timeout", error.ptr());
  py::register_exception<hma::NonFiniteError>(m, "NonFiniteError", error.ptr());
  py::register_exception<hma::InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);

  m.def("version", [] { return std::string(hma::version()); });
  m.def("mpi_built", [] { return std::string(hma::mpi_built()); },
        "The MPI hma was built with (its mpi.h), e.g. 'Open MPI 4.1.4'.");
  m.def("mpi_library", &hma::mpi_library, "MPI_Get_library_version()'s first line in this process.");

  py::class_<PyParamSet>(m, "ParamSet")
      .def(py::init<>())
      .def("add", &PyParamSet::add, py::arg("array"), py::arg("dtype") = py::none(),
           "Registers a writable float32/float64/float16 array (bf16: 16-bit patterns with "
           "dtype='bf16'); averaged in place, packed through a staging copy when strided.")
      .def_property_readonly("arrays", [](PyParamSet& p) { return p.set().arrays(); })
      .def_property_readonly("bytes", [](PyParamSet& p) { return p.set().bytes(); })
      .def_property_readonly("strided", &PyParamSet::strided)
      .def_property_readonly("in_flight", [](PyParamSet& p) { return p.set().in_flight(); })
      .def("describe", [](PyParamSet& p) { return p.set().describe(); })
      .def("wait", [](PyParamSet& p) {
        {
          py::gil_scoped_release nogil;
          p.set().wait();
        }
        p.scatter();
      });

  py::class_<PyRequest>(m, "Request")
      .def("wait", &PyRequest::wait)
      .def("test", &PyRequest::test)
      .def_property_readonly("active", &PyRequest::active)
      .def_property_readonly("level", &PyRequest::level);

  py::class_<hma::Averager> averager(m, "Averager");
  averager
      .def("step",
           [](hma::Averager& a, PyParamSet& ps) {
             ps.gather();
             bool averaged = false;
             {
               py::gil_scoped_release nogil;
               averaged = a.step(ps.set());
             }
             if (averaged) ps.scatter();
             return averaged;
           })
      // For bench/bench_python.py: step() with the seconds the C++ call took (the binding's
      // overhead is the Python caller's time less these).
      .def("_timed_step",
           [](hma::Averager& a, PyParamSet& ps) {
             ps.gather();
             bool averaged = false;
             double seconds = 0;
             {
               py::gil_scoped_release nogil;
               const auto t0 = std::chrono::steady_clock::now();
               averaged = a.step(ps.set());
               seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
             }
             if (averaged) ps.scatter();
             return py::make_tuple(averaged, seconds);
           })
      .def("start",
           [](hma::Averager& a, PyParamSet& p) {
             auto ps = py::cast(&p, py::return_value_policy::reference);  // its Python object
             return std::make_unique<PyRequest>(started(a, p, std::nullopt), ps, [&p] { p.scatter(); });
           })
      .def("average",
           [](hma::Averager& a, PyParamSet& ps, std::size_t level) {
             ps.gather();
             {
               py::gil_scoped_release nogil;
               a.average(ps.set(), level);
             }
             ps.scatter();
           })
      .def("start_average",
           [](hma::Averager& a, PyParamSet& p, std::size_t level) {
             auto ps = py::cast(&p, py::return_value_policy::reference);
             return std::make_unique<PyRequest>(started(a, p, level), ps, [&p] { p.scatter(); });
           })
      .def_property_readonly("step_count", &hma::Averager::step_count)
      .def("set_step", &hma::Averager::set_step)
      .def("level_now", &hma::Averager::level_now)
      .def("set_weight", &hma::Averager::set_weight)
      .def_property_readonly("weight", &hma::Averager::weight)
      .def("last_divergence",
           [](const hma::Averager& a) -> py::object {
             const auto d = a.last_divergence();
             if (!d) return py::none();
             return py::make_tuple(d->value, d->level, d->step);
           })
      .def("describe", &hma::Averager::describe)
      .def("checkpoint", &hma::Averager::checkpoint)
      .def("restore", [](hma::Averager& a, const std::string& text) {
        py::gil_scoped_release nogil;
        a.restore(text);
      })
      .def_property_readonly("member", &hma::Averager::member)
      .def_property_readonly("num_levels", [](const hma::Averager& a) { return a.schedule().levels().size(); });
  hma_py::bind_device(m, averager);

  m.def(
      "periodic",
      [](MPI_Fint comm, std::int64_t period, std::int64_t warmup, const py::kwargs& kw) {
        auto o = options_of(kw);
        const MPI_Comm c = MPI_Comm_f2c(comm);
        py::gil_scoped_release nogil;
        return std::make_unique<hma::Averager>(hma::PeriodicAverager(c, period, warmup, o));
      },
      py::arg("comm"), py::arg("period"), py::arg("warmup") = 0);
  m.def(
      "hierarchical",
      [](MPI_Fint comm, const py::object& levels, std::int64_t warmup, const py::kwargs& kw) {
        auto o = options_of(kw);
        const MPI_Comm c = MPI_Comm_f2c(comm);
        if (py::isinstance<py::str>(levels)) {
          const auto spec = py::cast<std::string>(levels);
          py::gil_scoped_release nogil;
          return std::make_unique<hma::Averager>(hma::HierarchicalAverager(c, std::string_view(spec), warmup, o));
        }
        std::vector<hma::Level> ls;
        for (const auto& l : levels) {
          const auto t = py::cast<std::pair<std::int64_t, int>>(l);
          ls.push_back(hma::Level{t.first, t.second});
        }
        py::gil_scoped_release nogil;
        return std::make_unique<hma::Averager>(hma::HierarchicalAverager(c, std::move(ls), warmup, o));
      },
      py::arg("comm"), py::arg("levels"), py::arg("warmup") = 0);
}
