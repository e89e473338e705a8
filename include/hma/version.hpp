// hma/version.hpp: the version of these headers (the macros) and of the library (hma::version()).
// meson.build refuses to configure when HMA_VERSION_STRING differs from the project's version.
#pragma once

#define HMA_VERSION_MAJOR 0
#define HMA_VERSION_MINOR 2
#define HMA_VERSION_PATCH 0
#define HMA_VERSION_STRING "0.2.0"

#include <string>

namespace hma {
/// The version of the hma library linked in, e.g. "0.2.0" (compare with HMA_VERSION_STRING to
/// catch headers and library from different installs). Same as hma_version() in the C API.
const char* version() noexcept;
/// The MPI hma was built with, from the mpi.h it was compiled against: "Open MPI 4.1.4",
/// "MPICH 4.0.2" (or "MPI 3.1" for another). Every averager compares its family with the MPI
/// loaded at run time (mpi_library()) and throws hma::Error naming both when they differ.
const char* mpi_built() noexcept;
/// The first line of MPI_Get_library_version() in this process (callable before MPI_Init), e.g.
/// "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4".
std::string mpi_library();
}  // namespace hma
