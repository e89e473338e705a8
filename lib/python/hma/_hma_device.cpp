// hma._hma's device side: DeviceParamSet over CUDA arrays that expose __cuda_array_interface__
// (versions 2 and 3: CuPy, Numba, torch CUDA tensors), averaged in place on the caller's stream,
// and private hooks that switch libhma to its host emulation backend (tests without a GPU).
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "binding.hpp"
#include "device/device_backend.hpp"
#include "device/emulation.hpp"

namespace hma_py {

namespace {

std::string text(const std::vector<py::ssize_t>& v) {
  std::string s = "(";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i > 0 ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

hma::Stream as_stream(std::uintptr_t v) { return reinterpret_cast<hma::Stream>(v); }

// A stream from Python: an int (a cudaStream_t's value: 0 the legacy default stream, as are 1
// (cudaStreamLegacy); 2 is cudaStreamPerThread), or an object with .cuda_stream (torch.cuda.Stream).
std::uintptr_t stream_value(const py::handle& given) {
  auto v = py::reinterpret_borrow<py::object>(given);
  if (py::hasattr(v, "cuda_stream")) v = v.attr("cuda_stream");
  if (!py::isinstance<py::int_>(v))
    throw py::type_error("hma: stream must be an int (a cudaStream_t's value) or have .cuda_stream (a "
                         "torch.cuda.Stream), got " + std::string(py::str(py::type::of(v).attr("__name__"))));
  return v.cast<std::uintptr_t>();
}

class PyDeviceParamSet {
 public:
  explicit PyDeviceParamSet(int device) : ps_(device) {}

  // Registers a writable float32/float64 CUDA array from its __cuda_array_interface__; the set
  // holds the object (its memory stays valid while registered).
  void add(const py::object& array) {
    const std::string who = "hma: DeviceParamSet.add: ";
    if (!py::hasattr(array, "__cuda_array_interface__"))
      throw py::type_error(who + "a " + std::string(py::str(py::type::of(array).attr("__name__"))) +
                           " has no __cuda_array_interface__: CUDA arrays only (CuPy, Numba, torch CUDA "
                           "tensors); host arrays go to hma.ParamSet");
    const auto cai = array.attr("__cuda_array_interface__").cast<py::dict>();
    const int version = cai.contains("version") ? cai["version"].cast<int>() : -1;
    if (version != 2 && version != 3)
      throw py::value_error(who + "__cuda_array_interface__ version " + std::to_string(version) +
                            " is not supported (2 or 3)");
    const auto typestr = cai["typestr"].cast<std::string>();
    hma::Dtype d = hma::Dtype::f32;
    if (typestr == "<f8") d = hma::Dtype::f64;
    else if (typestr != "<f4")
      throw py::type_error(who + "arrays of type '" + typestr +
                           "' cannot be averaged on the device: float32 ('<f4') or float64 ('<f8')");
    const auto data = cai["data"].cast<py::tuple>();  // (pointer, read_only)
    if (data[1].cast<bool>())
      throw py::value_error(who + "the array is read-only (__cuda_array_interface__ data[1]): hma "
                            "writes each average into it");
    if (cai.contains("mask") && !cai["mask"].is_none())
      throw py::value_error(who + "the array has a mask (__cuda_array_interface__ mask): masked arrays "
                            "cannot be averaged");
    const auto shape = cai["shape"].cast<std::vector<py::ssize_t>>();
    std::size_t n = 1;
    for (const auto e : shape) n *= static_cast<std::size_t>(e);
    if (cai.contains("strides") && !cai["strides"].is_none()) {
      const auto strides = cai["strides"].cast<std::vector<py::ssize_t>>();
      if (strides.size() != shape.size() || !dense(shape, strides, static_cast<py::ssize_t>(hma::dtype_size(d))))
        throw py::value_error(who + "the array is not contiguous (shape " + text(shape) + ", strides " +
                              text(strides) + " bytes): device arrays are averaged in place, so their "
                              "elements must fill one block of memory (average a contiguous copy)");
    }
    std::optional<std::uintptr_t> stream;
    if (version >= 3 && cai.contains("stream") && !cai["stream"].is_none()) {
      stream = cai["stream"].cast<std::uintptr_t>();
      if (*stream == 0)
        throw py::value_error(who + "__cuda_array_interface__ names stream 0, which the interface "
                              "disallows (ambiguous): 1 is the legacy default stream, 2 the per-thread one");
      if (stream_ && *stream_ != *stream)
        throw py::value_error(who + "this array's __cuda_array_interface__ names stream " +
                              std::to_string(*stream) + ", the arrays registered before stream " +
                              std::to_string(*stream_) + ": an average waits on one stream (pass "
                              "stream= to the average to choose it)");
    }
    const auto modules = py::module_::import("sys").attr("modules").cast<py::dict>();
    const bool torch = modules.contains("torch") && py::isinstance(array, modules["torch"].attr("Tensor"));
    void* p = reinterpret_cast<void*>(data[0].cast<std::uintptr_t>());
    if (d == hma::Dtype::f32) ps_.add(static_cast<float*>(p), n);
    else ps_.add(static_cast<double*>(p), n);
    if (stream) stream_ = stream;  // only once registered: a refused array changes nothing
    torch_ = torch_ || torch;
    held_.push_back(array);
  }

  // The stream an average waits on and orders after its result: `given`, else the one the
  // arrays' interfaces named, else torch's current stream on the set's device when the set holds
  // torch tensors (whose interface names none), else the legacy default stream.
  hma::Stream stream(const py::object& given) const {
    if (!given.is_none()) return as_stream(stream_value(given));
    if (stream_) return as_stream(*stream_);
    if (torch_)
      return as_stream(stream_value(py::module_::import("torch").attr("cuda").attr("current_stream")(ps_.device())));
    return nullptr;
  }
  hma::DeviceParamSet& set() { return ps_; }

 private:
  std::vector<py::object> held_;           // declared first: destroyed after ps_ (which waits)
  std::optional<std::uintptr_t> stream_;  // the stream the arrays' interfaces named
  bool torch_ = false;
  hma::DeviceParamSet ps_;
};

hma::detail::DeviceBackend& emulation() { return *hma::detail::host_emulation_backend(); }

}  // namespace

void bind_device(py::module_& m, py::class_<hma::Averager>& averager) {
  py::class_<PyDeviceParamSet>(m, "DeviceParamSet")
      .def(py::init<int>(), py::arg("device") = -1,
           "The CUDA arrays one averager averages together, on `device` (-1: the current one). "
           "Raises hma.Error when device buffers are unavailable (says why).")
      .def("add", &PyDeviceParamSet::add, py::arg("array"),
           "Registers a writable, dense float32/float64 array with __cuda_array_interface__ "
           "(version 2 or 3), averaged in place.")
      .def_property_readonly("arrays", [](PyDeviceParamSet& p) { return p.set().arrays(); })
      .def_property_readonly("bytes", [](PyDeviceParamSet& p) { return p.set().bytes(); })
      .def_property_readonly("device", [](PyDeviceParamSet& p) { return p.set().device(); })
      .def_property_readonly("in_flight", [](PyDeviceParamSet& p) { return p.set().in_flight(); })
      .def("describe", [](PyDeviceParamSet& p) { return p.set().describe(); })
      .def("wait",
           [](PyDeviceParamSet& p) {
             py::gil_scoped_release nogil;
             p.set().wait();
           })
      .def(
          "synchronize",
          [](PyDeviceParamSet& p) {
            py::gil_scoped_release nogil;
            p.set().synchronize();
          },
          "Blocks until the last average is in the arrays: only before host code reads them.");

  averager
      .def(
          "step",
          [](hma::Averager& a, PyDeviceParamSet& ps, const py::object& stream) {
            const hma::Stream s = ps.stream(stream);
            py::gil_scoped_release nogil;
            return a.step(ps.set(), s);
          },
          py::arg("params"), py::arg("stream") = py::none())
      .def(
          "start",
          [](hma::Averager& a, PyDeviceParamSet& ps, const py::object& stream) {
            const hma::Stream s = ps.stream(stream);
            hma::Request r = [&] {
              py::gil_scoped_release nogil;
              return a.start(ps.set(), s);
            }();
            return std::make_unique<PyRequest>(std::move(r), py::cast(&ps, py::return_value_policy::reference));
          },
          py::arg("params"), py::arg("stream") = py::none())
      .def(
          "average",
          [](hma::Averager& a, PyDeviceParamSet& ps, std::size_t level, const py::object& stream) {
            const hma::Stream s = ps.stream(stream);
            py::gil_scoped_release nogil;
            a.average(ps.set(), level, s);
          },
          py::arg("params"), py::arg("level"), py::arg("stream") = py::none())
      .def(
          "start_average",
          [](hma::Averager& a, PyDeviceParamSet& ps, std::size_t level, const py::object& stream) {
            const hma::Stream s = ps.stream(stream);
            hma::Request r = [&] {
              py::gil_scoped_release nogil;
              return a.start_average(ps.set(), level, s);
            }();
            return std::make_unique<PyRequest>(std::move(r), py::cast(&ps, py::return_value_policy::reference));
          },
          py::arg("params"), py::arg("level"), py::arg("stream") = py::none());

  // Tests only: libhma's host emulation backend ("device" memory is host memory, each stream a
  // queue that runs late; lib/device/device_backend.hpp) for the DeviceParamSets made after this.
  m.def("_use_emulation_for_testing", [](bool on) {
    hma::detail::set_device_backend_for_testing(on ? hma::detail::host_emulation_backend() : nullptr);
  }, py::arg("on") = true);
  m.def("_emulation_stream", [] { return reinterpret_cast<std::uintptr_t>(emulation().create_stream()); });
  m.def("_emulation_destroy_stream", [](std::uintptr_t s) { emulation().destroy_stream(as_stream(s)); });
  // Queues a copy of `bytes` bytes on emulated stream `s`: it runs late, like a kernel.
  m.def("_emulation_copy", [](std::uintptr_t s, std::uintptr_t dst, std::uintptr_t src, std::size_t bytes) {
    emulation().copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes, as_stream(s));
  });
  m.def("_emulation_run_all", [](std::uintptr_t s) { hma::detail::emulation_run_all(as_stream(s)); });
}

}  // namespace hma_py
