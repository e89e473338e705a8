// Internal: the MPI library hma was built with against the one loaded in this process.
#pragma once

#include <string>

namespace hma::detail {

/// The MPI family a version text names: "Open MPI", "MPICH" (MPICH and its ABI: MVAPICH, Intel
/// MPI) or "" (unknown).
[[nodiscard]] std::string mpi_family(const std::string& version_text);

/// Throws hma::Error naming both libraries when the MPI in this process (MPI_Get_library_version,
/// callable before MPI_Init) is of another family than the one hma was built with (its mpi.h):
/// an Open MPI program cannot hand its communicators to an MPICH-built hma, or the reverse.
/// Local; the comparison is made once per process.
void require_same_mpi(const char* who);

/// Throws hma::Error naming `who` unless MPI is initialised and not yet finalised (hma never
/// initialises MPI itself), and is the MPI hma was built with (require_same_mpi).
void require_mpi(const char* who);

}  // namespace hma::detail
