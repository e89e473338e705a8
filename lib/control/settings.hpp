// Internal, control plane: the averager's settings, resolved from AveragerOptions and the HMA_*
// environment on each rank, and checked to agree across ranks before the first collective that
// depends on them.
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

#include "control/device_path.hpp"
#include "hma/options.hpp"

namespace hma::detail {

/// Local: options first, then the environment, then defaults. Throws hma::InvalidArgument
/// naming the option or variable and the value.
Settings resolve_settings(const AveragerOptions& options);

/// Local: the device path for these options (throws hma::InvalidArgument for `direct` on an MPI
/// that is not CUDA-aware).
DevicePlan resolve_device_plan(const AveragerOptions& options, const Settings& settings);

/// Collective over `comm`: hma::MismatchError on every rank, naming the first differing rank and
/// both ranks' settings, unless every setting that decides which collectives are issued, or how
/// long a rank waits for them, is the same on all ranks.
void check_settings(MPI_Comm comm, const Settings& s, const DevicePlan& plan);

/// "bf16", "exact,bf16": one wire per level, or one for all. Throws hma::InvalidArgument naming
/// `what` (the option or variable) and the token.
std::vector<Wire> parse_wire(const std::string& text, const std::string& what);

/// "lr 0.7 momentum 0.9 nesterov at the last level"; "exact,bf16" (empty: "exact").
std::string outer_text(const OuterSettings& o);
std::string wire_text(const std::vector<Wire>& w);

}  // namespace hma::detail
