// Internal: MPI objects hma makes once per process (its own reduction ops and their datatypes)
// and hands to MPI_Finalize to free; whether MPI is still there.
#pragma once

#include <mpi.h>

namespace hma::detail {

/// Frees `op` and `type` (either may be the null handle) when MPI_Finalize runs, through an
/// attribute on MPI_COMM_SELF, whose deletion MPI performs first thing in MPI_Finalize.
void free_at_finalize(MPI_Op op, MPI_Datatype type);

/// True when MPI has been finalised (no MPI call may be made).
bool mpi_finalized() noexcept;

/// True from the moment MPI_Finalize begins (mpi_finalized() only once it returned); after the
/// first call with MPI initialised, a flag read instead of a call into MPI.
bool mpi_finalizing() noexcept;

/// This process's rank in MPI_COMM_WORLD; -1 before MPI_Init or after MPI_Finalize.
int mpi_world_rank() noexcept;

}  // namespace hma::detail
