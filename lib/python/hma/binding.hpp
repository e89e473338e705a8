// What the extension's two files share: _hma.cpp (host ParamSets, the averagers) and
// _hma_device.cpp (DeviceParamSet over __cuda_array_interface__).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "hma/hma.hpp"

namespace hma_py {

namespace py = pybind11;

// True when the elements (extents `shape`, byte `strides`) fill one block of memory with no gaps,
// in any order of the dimensions (C, Fortran or permuted): averaging is elementwise, so such an
// array is averaged in place.
inline bool dense(const std::vector<py::ssize_t>& shape, const std::vector<py::ssize_t>& strides,
                  py::ssize_t itemsize) {
  std::vector<std::pair<py::ssize_t, py::ssize_t>> dims;  // (stride, extent)
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 0) return true;
    if (shape[i] != 1) dims.emplace_back(strides[i], shape[i]);
  }
  std::sort(dims.begin(), dims.end());
  py::ssize_t want = itemsize;
  for (const auto& [stride, extent] : dims) {
    if (stride != want) return false;
    want *= extent;
  }
  return true;
}

// A non-blocking average from Python: wait()/test() release the GIL; `after` runs once when it
// completed (a host set's scatter into its strided arrays); `owner` keeps the set alive.
class PyRequest {
 public:
  PyRequest(hma::Request r, py::object owner, std::function<void()> after = {})
      : req_(std::move(r)), owner_(std::move(owner)), after_(std::move(after)) {}
  PyRequest(const PyRequest&) = delete;
  PyRequest& operator=(const PyRequest&) = delete;
  ~PyRequest() {
    try {
      wait();
    } catch (...) {  // a destructor cannot report; wait() first to see errors
    }
  }
  void wait() {
    if (done_) return;
    {
      py::gil_scoped_release nogil;
      req_.wait();
    }
    finish();
  }
  bool test() {
    if (done_) return true;
    bool ok = false;
    {
      py::gil_scoped_release nogil;
      ok = req_.test();
    }
    if (ok) finish();
    return ok;
  }
  [[nodiscard]] bool active() const { return req_.active(); }
  [[nodiscard]] std::optional<std::size_t> level() const { return req_.level(); }

 private:
  void finish() {
    done_ = true;
    if (after_) after_();
  }
  hma::Request req_;
  py::object owner_;  // keeps the set alive while the average is in flight
  std::function<void()> after_;
  bool done_ = false;
};

// Registers DeviceParamSet, its Averager overloads and the emulation hooks for tests.
void bind_device(py::module_& m, py::class_<hma::Averager>& averager);

}  // namespace hma_py
