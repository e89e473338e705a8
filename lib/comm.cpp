#include "hma/comm.hpp"

#include "hma/error.hpp"
#include "support/mpi_static.hpp"

namespace hma {

namespace {
Comm own_with_errors_return(MPI_Comm c) {
  Comm out = Comm::take(c);
  if (c != MPI_COMM_NULL) check(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  return out;
}
}  // namespace

Comm& Comm::operator=(Comm&& other) noexcept {
  if (this != &other) {
    reset();
    comm_ = other.comm_;
    owned_ = other.owned_;
    other.comm_ = MPI_COMM_NULL;
    other.owned_ = false;
  }
  return *this;
}

void Comm::reset() noexcept {
  if (owned_ && comm_ != MPI_COMM_NULL) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  comm_ = MPI_COMM_NULL;
  owned_ = false;
}

Comm Comm::dup() const {
  if (is_null()) return {};
  MPI_Comm out = MPI_COMM_NULL;
  check(MPI_Comm_dup(comm_, &out), "MPI_Comm_dup");
  return own_with_errors_return(out);
}

Comm Comm::split(int color, int key) const {
  if (is_null()) return {};
  MPI_Comm out = MPI_COMM_NULL;
  check(MPI_Comm_split(comm_, color, key, &out), "MPI_Comm_split");
  return own_with_errors_return(out);
}

Comm Comm::split_shared() const {
  if (is_null()) return {};
  MPI_Comm out = MPI_COMM_NULL;
  check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank(), MPI_INFO_NULL, &out),
        "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
  return own_with_errors_return(out);
}

int Comm::rank() const {
  if (is_null()) return -1;
  int r = 0;
  check(MPI_Comm_rank(comm_, &r), "MPI_Comm_rank");
  return r;
}

int Comm::size() const {
  if (is_null()) return 0;
  int s = 0;
  check(MPI_Comm_size(comm_, &s), "MPI_Comm_size");
  return s;
}

int Comm::world_rank() noexcept { return detail::mpi_world_rank(); }

}  // namespace hma
