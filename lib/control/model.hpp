// Internal, control plane: an alpha-beta cost model of one average, per algorithm, from the
// link parameters of LinkModel (defaults, or a calibration `hma-model calibrate` measured and
// HMA_MODEL names). `auto` picks flat or two-level with it, and two-level picks how it sums
// across nodes; `hma-model predict` and `hma-model table` print the same numbers.
//
// The terms (S bytes over N nodes of L ranks, alpha per message, beta bytes per second):
//   flat      2 ceil(log2 N) a_inter + 2 (N-1)/N S / b_flat + t_node(S)
//             (b_flat: the rate at which MPI_Allreduce moves a node's bytes across, calibrated:
//             it depends on MPI's algorithm and on how its processes share the link)
//   two-level pieces of c bytes (as lib/transport/two_level.cpp cuts them), pipelined:
//             t_node(c) + P max(t_across(c), t_node(c))
//   t_node(c) a_intra + c / b_intra                                 (reduce-scatter + allgather)
//   t_across  direction split, N = 2:     2 a_inter + c / b_inter
//             direction-split ring, N even: 4 (N-1) a_inter + 2 (N-1)/N c / b_inter
//             MPI_Allreduce:               2 ceil(log2 N) a_inter + 2 (N-1)/N c / (b_inter d)
//             (d: the duplex factor, the rate each way of a process that sends and receives
//             at once, relative to one way)
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "hma/options.hpp"

namespace hma::detail {

struct Shape {
  int nodes = 1;
  int per_node = 1;
};

/// The piece size (bytes) of the blocking two-level pipeline (transport/two_level.cpp) for a
/// bucket of `bytes`: at most 1 MiB, at least four pieces where that keeps them >= 256 KiB, at
/// most `chunk_bytes` when non-zero. The model's predictions cut the buffer the same way.
std::size_t two_level_piece_bytes(std::size_t bytes, std::size_t chunk_bytes);

/// How the two-level pipeline sums a piece across nodes.
enum class Across { split, mpi };

/// The smallest piece (bytes of a node's data) whose sum across nodes the model sends through
/// the direction split rather than MPI_Allreduce, and never below 64 KiB per rank's block
/// (SIZE_MAX: never, for an odd number of nodes).
std::size_t split_min_piece(const LinkModel& m, Shape s);

/// Predicted microseconds of one blocking average of `bytes` (f32) over the shape.
double predict_flat_us(const LinkModel& m, Shape s, double bytes);
double predict_two_level_us(const LinkModel& m, Shape s, double bytes, std::size_t chunk_bytes);
/// Within one node of `per_node` ranks.
double predict_node_us(const LinkModel& m, int per_node, double bytes);
/// One piece of `piece_bytes` across nodes, and which way is faster.
double predict_across_us(const LinkModel& m, Shape s, double piece_bytes, Across a);
Across best_across(const LinkModel& m, Shape s, double piece_bytes);

/// "512 B", "64 KiB", "3 MiB", "1 GiB": powers of two as describe() prints them.
std::string format_bytes(std::size_t bytes);

/// A device calibration's answer (HMA_MODEL's device_direct_from_bytes): the smallest measured
/// size from which direct beat staged at that size and at every larger one (sizes ascending);
/// 0 where direct never did (auto then stays staged).
double device_direct_from(const std::vector<double>& sizes, const std::vector<double>& staged_us,
                          const std::vector<double>& direct_us);

/// Reads a calibration file (lines `key = value`; keys as LinkModel's fields; # comments).
/// Throws hma::InvalidArgument naming the file and the line it cannot use.
LinkModel read_link_model(const std::string& path);
/// The file's text for a model (the inverse of read_link_model).
std::string format_link_model(const LinkModel& m);

}  // namespace hma::detail
