#include "hma/error.hpp"

#include <mpi.h>

namespace hma {

void check(int rc, std::string_view what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  std::string msg = "hma: ";
  msg += what;
  msg += ": ";
  msg += len > 0 ? std::string(text, static_cast<std::size_t>(len)) : "MPI error " + std::to_string(rc);
  throw Error(msg);
}

}  // namespace hma
