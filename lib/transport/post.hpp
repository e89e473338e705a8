// Internal, data plane: what an average does with its data besides averaging it, fused into the
// passes the average makes: the outer optimizer (AveragerOptions::outer) and the divergence
// metric (AveragerOptions::divergence).
//   before(b, lo, hi)  divergence: keeps the rank's own values of [lo, hi) before they are scaled
//   after(b, lo, hi)   once [lo, hi) holds the average: the divergence sums and the outer update,
//                      in one pass (in blocking flat averages per piece, still in cache)
//   before_packed / after_packed  the same on a contiguous run [at, at + n) of the set's packed
//                      elements of one type (device sets, on their staged host chunks)
//   conclude / start_conclude + record: the group's maximum (one double) and its log entry
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "hma/buffer.hpp"
#include "hma/options.hpp"

namespace hma::detail {

struct Pending;

/// The outer optimizer's state: the anchor (the parameters after the last average at its level)
/// and the momentum buffer, per element type, for one set layout.
struct OuterState {
  OuterSettings opt;
  // False until the first average at the level completed. Every average at the level first
  // completes the one before it (Averager::settle_outer), so all ranks of the group see the
  // same value when they prepare the next one.
  bool anchored = false;
  std::weak_ptr<Pending> last;    // the last average issued at the level
  std::uint64_t fingerprint = 0;  // the layout it belongs to
  std::vector<float> anchor_f, m_f;
  std::vector<double> anchor_d, m_d;
};

/// Where completed divergence measurements go (written by whichever thread completes the average).
struct DivergenceLog {
  std::mutex mu;
  std::optional<Divergence> last;
};

class Post {
 public:
  /// `outer` (may be null) applies at this average; `log` non-null: measure divergence.
  /// `speaker`: this rank logs the measurement.
  Post(std::shared_ptr<OuterState> outer, std::shared_ptr<DivergenceLog> log, std::size_t level,
       std::int64_t step, bool speaker);
  /// True when it measures divergence (then it needs a collective after the data).
  [[nodiscard]] bool measures() const noexcept { return log_ != nullptr; }
  template <Element T>
  void before(Bucket<T>& b, std::size_t lo, std::size_t hi);
  template <Element T>
  void after(Bucket<T>& b, std::size_t lo, std::size_t hi);
  /// Device sets: room for the inputs of a set of nf f32 and nd f64 elements, made once (growing
  /// it chunk by chunk reallocated and copied it over and over).
  void size_inputs(std::size_t nf, std::size_t nd);
  /// Device sets: `x` holds this rank's unscaled elements [at, at + n) of its type (chunks in
  /// any order, each once; size_inputs() first).
  template <Element T>
  void before_packed(const T* x, std::size_t at, std::size_t n);
  /// Device sets: `x` holds the average of elements [at, at + n); the outer update in place.
  template <Element T>
  void after_packed(T* x, std::size_t at, std::size_t n);
  /// Blocking: the group's maximum over `comm` (MPI_COMM_NULL: this rank alone), then record().
  void conclude(MPI_Comm comm);
  /// Non-blocking: issues the maximum into `reqs` (nothing without divergence); record() after.
  void start_conclude(MPI_Comm comm, std::vector<MPI_Request>& reqs);
  /// Marks the outer state anchored and stores (and logs) the measurement.
  void record();

 private:
  template <Element T>
  std::vector<T>& keep();
  // The pass after the average over x[0, n), elements [at, at + n) of the type: divergence sums
  // against `in` (this rank's inputs; null: not measured) and the outer update.
  template <Element T>
  void pass(T* x, const T* in, std::size_t at, std::size_t n, double& dev2, double& mean2);
  std::shared_ptr<OuterState> outer_;
  bool first_ = false;  // the outer optimizer's first average: anchor only
  std::shared_ptr<DivergenceLog> log_;
  std::size_t level_;
  std::int64_t step_;
  bool speaker_;
  std::vector<float> keep_f_;
  std::vector<double> keep_d_;
  double dev2_ = 0, mean2_ = 0;  // this rank's sum (x_in - mean)^2, and sum mean^2
  double max_dev2_ = 0;          // the group's maximum, once concluded
  bool reduced_ = false;
};

}  // namespace hma::detail
