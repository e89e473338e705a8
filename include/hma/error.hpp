// hma/error.hpp: the exceptions hma throws and the one MPI result check.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>
#include <cstddef>
#include <cstdint>

namespace hma {

/// A failure at run time: an MPI call returned an error, a collective check found that ranks
/// disagree, or an operation was used out of order. The message says what hma was doing and,
/// for MPI failures, carries MPI's own error string.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bad argument: the message names the argument, the value given and what is allowed.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Ranks disagree about something that must be identical on all of them (the schedule, a buffer
/// layout, the step counter). Thrown on every rank of the communicator; `rank()` is the lowest
/// rank whose value differs from rank 0's.
class MismatchError : public Error {
 public:
  MismatchError(const std::string& what, int rank) : Error(what), rank_(rank) {}
  [[nodiscard]] int rank() const noexcept { return rank_; }

 private:
  int rank_;
};

/// An average did not complete within the averager's timeout (AveragerOptions::timeout_s or
/// HMA_TIMEOUT_S): a rank of the group is slow, stuck or dead. The average is still in flight
/// (MPI cannot cancel a collective): wait() again to keep waiting, or end the job (MPI_Abort).
class Timeout : public Error {
 public:
  Timeout(const std::string& what, std::size_t level, std::int64_t step, std::size_t bytes,
          std::vector<int> ranks)
      : Error(what), level_(level), step_(step), bytes_(bytes), ranks_(std::move(ranks)) {}
  [[nodiscard]] std::size_t level() const noexcept { return level_; }
  [[nodiscard]] std::int64_t step() const noexcept { return step_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }
  /// MPI_COMM_WORLD ranks of the group that was averaging.
  [[nodiscard]] const std::vector<int>& ranks() const noexcept { return ranks_; }

 private:
  std::size_t level_;
  std::int64_t step_;
  std::size_t bytes_;
  std::vector<int> ranks_;
};

/// A NaN or infinity was found in the buffers about to be averaged, with the non-finite guard
/// set to throw (AveragerOptions::nonfinite or HMA_NONFINITE=throw). Thrown on every rank of the
/// group, which then did not average; `ranks()` are the world ranks holding non-finite values.
class NonFiniteError : public Error {
 public:
  NonFiniteError(const std::string& what, std::int64_t step, std::vector<int> ranks)
      : Error(what), step_(step), ranks_(std::move(ranks)) {}
  [[nodiscard]] std::int64_t step() const noexcept { return step_; }
  [[nodiscard]] const std::vector<int>& ranks() const noexcept { return ranks_; }

 private:
  std::int64_t step_;
  std::vector<int> ranks_;
};

/// Throws hma::Error("hma: <what>: <MPI error string>") unless rc is MPI_SUCCESS.
void check(int rc, std::string_view what);

}  // namespace hma
