// hma/local_device.hpp: one GPU per rank on multi-GPU nodes. (Apart from device.hpp, which the
// CUDA backend compiles without MPI's headers.)
#pragma once

#include <mpi.h>

namespace hma {

/// Makes device (this rank's node-local rank in `comm`) modulo (the devices it sees) current in
/// the calling thread, and returns it. Without this, every rank of a node would use device 0.
/// Collective over `comm` (it splits by shared memory). Call it after MPI_Init, before any
/// DeviceParamSet or CUDA work of the rank. Throws hma::Error saying why when device buffers are
/// unavailable.
int use_local_device(MPI_Comm comm);

}  // namespace hma
