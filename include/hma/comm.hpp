// hma/comm.hpp: a move-only owner (or non-owning view) of an MPI communicator.
#pragma once

#include <mpi.h>

namespace hma {

/// Holds an MPI_Comm. An owning Comm frees its communicator exactly once, in its destructor
/// (skipped if MPI is already finalized); a non-owning one (`attach`) never frees it.
/// hma sets MPI_ERRORS_RETURN on every communicator it creates, so failures become hma::Error.
/// Not thread safe; creating communicators is collective over the parent.
class Comm {
 public:
  Comm() noexcept = default;  ///< MPI_COMM_NULL: this rank is not a member.
  /// Wraps `comm` without taking ownership (the caller keeps freeing it, e.g. MPI_COMM_WORLD).
  static Comm attach(MPI_Comm comm) noexcept { return Comm(comm, false); }
  /// Takes ownership of `comm`: it is freed when the Comm dies.
  static Comm take(MPI_Comm comm) noexcept { return Comm(comm, true); }

  Comm(Comm&& other) noexcept : comm_(other.comm_), owned_(other.owned_) {
    other.comm_ = MPI_COMM_NULL;
    other.owned_ = false;
  }
  Comm& operator=(Comm&& other) noexcept;
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  ~Comm() { reset(); }

  /// Collective: a duplicate with its own context, MPI_ERRORS_RETURN set. Null stays null.
  [[nodiscard]] Comm dup() const;
  /// Collective: MPI_Comm_split. `color` MPI_UNDEFINED gives a null Comm.
  [[nodiscard]] Comm split(int color, int key) const;
  /// Collective: MPI_Comm_split_type(MPI_COMM_TYPE_SHARED): the ranks sharing this node's memory.
  [[nodiscard]] Comm split_shared() const;

  /// Lets go of the communicator without freeing it (it may still have collectives in flight).
  void release() noexcept {
    comm_ = MPI_COMM_NULL;
    owned_ = false;
  }
  [[nodiscard]] MPI_Comm get() const noexcept { return comm_; }
  [[nodiscard]] bool is_null() const noexcept { return comm_ == MPI_COMM_NULL; }
  [[nodiscard]] bool owned() const noexcept { return owned_; }
  /// Rank in this communicator; -1 when null.
  [[nodiscard]] int rank() const;
  /// Number of ranks; 0 when null.
  [[nodiscard]] int size() const;
  /// Rank of this process in MPI_COMM_WORLD (for messages); -1 before MPI_Init.
  static int world_rank() noexcept;

 private:
  Comm(MPI_Comm comm, bool owned) noexcept : comm_(comm), owned_(owned) {}
  void reset() noexcept;
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owned_ = false;
};

}  // namespace hma
