// Internal: collective agreement helpers that turn rank-local failures and cross-rank
// disagreement into the same exception on every rank, instead of a deadlock.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>

namespace hma::detail {

/// Collective: the minimum and maximum of `v` over `comm`, in one MPI_Allreduce.
std::pair<int, int> min_max(MPI_Comm comm, int v);

/// Collective: min, max and sum of `v` over `comm` (two small MPI_Allreduce calls).
struct MinMaxSum {
  int min = 0, max = 0, sum = 0;
};
MinMaxSum min_max_sum(MPI_Comm comm, int v);

/// Collective: `v` of rank `root` of `comm`, on every rank.
int bcast_int(MPI_Comm comm, int v, int root);

/// Ranks per emulated node: `option` if non-zero, else HMA_RANKS_PER_NODE, else 0 (detect).
/// Throws hma::InvalidArgument unless it is 0 or divides the MPI_COMM_WORLD size. Local.
int ranks_per_node_setting(int option);

/// Collective over `comm`: ranks_per_node_setting(option) evaluated on every rank and checked to
/// be the same everywhere (hma::MismatchError on every rank naming the values otherwise), BEFORE
/// anything splits by it: ranks that disagree would call different splits and deadlock.
int agreed_ranks_per_node(MPI_Comm comm, int option);

/// Runs `fn` on every rank of `comm` (collective). If it throws on any rank, every rank throws:
/// a rank that failed rethrows its own exception, the others an exception of the same family
/// (hma::InvalidArgument, hma::MismatchError or hma::Error) saying "rank R failed: <its
/// message>", R the lowest failing rank.
void agree(MPI_Comm comm, const std::function<void()>& fn);

/// Collective: agree() on a duplicate of `comm`, passed to `fn` for any collective it needs (the
/// caller's communicator sees only the duplication). Throws hma::Error unless MPI is usable. With
/// MPI_COMM_NULL, runs `fn(MPI_COMM_NULL)` locally.
void agree_on_duplicate(MPI_Comm comm, const std::function<void(MPI_Comm ctrl)>& fn);

/// Collective: checks that `values` (same length on all ranks) are identical on every rank of
/// `comm`. If not, every rank throws hma::MismatchError naming the lowest rank that differs from
/// rank 0, with both ranks' `describe()` text.
void check_same(MPI_Comm comm, std::span<const std::uint64_t> values, const std::string& what,
                const std::function<std::string()>& describe);

}  // namespace hma::detail
