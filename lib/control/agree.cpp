#include "control/agree.hpp"

#include <exception>
#include <stdexcept>
#include <vector>

#include "hma/comm.hpp"
#include "hma/error.hpp"
#include "support/env.hpp"
#include "support/mpi_library.hpp"

namespace hma::detail {

namespace {

int comm_rank(MPI_Comm c) {
  int r = 0;
  check(MPI_Comm_rank(c, &r), "MPI_Comm_rank");
  return r;
}
int comm_size(MPI_Comm c) {
  int s = 0;
  check(MPI_Comm_size(c, &s), "MPI_Comm_size");
  return s;
}

// Broadcasts `text` from `root` to all ranks of comm.
std::string bcast_string(MPI_Comm comm, std::string text, int root) {
  int len = static_cast<int>(text.size());
  check(MPI_Bcast(&len, 1, MPI_INT, root, comm), "MPI_Bcast(message length)");
  text.resize(static_cast<std::size_t>(len));
  if (len > 0) check(MPI_Bcast(text.data(), len, MPI_CHAR, root, comm), "MPI_Bcast(message)");
  return text;
}

}  // namespace

std::pair<int, int> min_max(MPI_Comm comm, int v) {
  int in[2] = {v, -v}, out[2] = {0, 0};  // min(-v) = -max(v)
  check(MPI_Allreduce(in, out, 2, MPI_INT, MPI_MIN, comm), "MPI_Allreduce(min/max)");
  return {out[0], -out[1]};
}

MinMaxSum min_max_sum(MPI_Comm comm, int v) {
  const auto [lo, hi] = min_max(comm, v);
  int sum = 0;
  check(MPI_Allreduce(&v, &sum, 1, MPI_INT, MPI_SUM, comm), "MPI_Allreduce(sum)");
  return {lo, hi, sum};
}

int bcast_int(MPI_Comm comm, int v, int root) {
  check(MPI_Bcast(&v, 1, MPI_INT, root, comm), "MPI_Bcast(int)");
  return v;
}

int ranks_per_node_setting(int option) {
  int universe = 0;
  check(MPI_Comm_size(MPI_COMM_WORLD, &universe), "MPI_Comm_size(MPI_COMM_WORLD)");
  const int rpn = option != 0 ? option : env_int("HMA_RANKS_PER_NODE", 0, 0, universe);
  if (rpn < 0 || rpn > universe || (rpn > 0 && universe % rpn != 0))
    throw InvalidArgument("hma: ranks per node " + std::to_string(rpn) +
                          " (HMA_RANKS_PER_NODE or HierarchyOptions::ranks_per_node) must be "
                          "between 1 and the MPI_COMM_WORLD size " + std::to_string(universe) +
                          " and divide it");
  return rpn;
}

int agreed_ranks_per_node(MPI_Comm comm, int option) {
  int rpn = 0;
  agree(comm, [&] { rpn = ranks_per_node_setting(option); });
  const auto [lo, hi] = min_max(comm, rpn);
  if (lo != hi) {
    int mine = rpn == lo ? comm_size(comm) : comm_rank(comm), first = 0;
    check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce(ranks per node)");
    throw MismatchError("hma: ranks per node (HMA_RANKS_PER_NODE or HierarchyOptions::ranks_per_node) "
                        "differs across ranks: values from " + std::to_string(lo) + " to " +
                            std::to_string(hi) + " (0 = detect by shared memory); rank " +
                            std::to_string(first) + " is the lowest without " + std::to_string(lo) +
                            ". Set it alike on every rank",
                        first);
  }
  return rpn;
}

void agree(MPI_Comm comm, const std::function<void()>& fn) {
  std::exception_ptr err;
  std::string msg;
  int family = 0;  // 0 invalid argument, 1 runtime error, 2 mismatch
  try {
    fn();
  } catch (const MismatchError& e) {
    err = std::current_exception();
    msg = e.what();
    family = 2;
  } catch (const std::invalid_argument& e) {
    err = std::current_exception();
    msg = e.what();
  } catch (const std::exception& e) {
    err = std::current_exception();
    msg = e.what();
    family = 1;
  }
  const int rank = comm_rank(comm), size = comm_size(comm);
  int mine = err ? rank : size, first = size;
  check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce(agreement)");
  if (first == size) return;
  check(MPI_Bcast(&family, 1, MPI_INT, first, comm), "MPI_Bcast(agreement)");
  msg = bcast_string(comm, msg, first);
  if (err) std::rethrow_exception(err);  // a rank that failed itself reports its own error
  const std::string text = "hma: rank " + std::to_string(first) + " failed: " + msg;
  if (family == 0) throw InvalidArgument(text);
  if (family == 2) throw MismatchError(text, first);
  throw Error(text);
}

void check_same(MPI_Comm comm, std::span<const std::uint64_t> values, const std::string& what,
                const std::function<std::string()>& describe) {
  const int rank = comm_rank(comm), size = comm_size(comm);
  std::vector<std::uint64_t> root(values.begin(), values.end());
  check(MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_UINT64_T, 0, comm),
        "MPI_Bcast(consistency check)");
  bool same = true;
  for (std::size_t i = 0; i < root.size(); ++i) same = same && root[i] == values[i];
  int mine = same ? size : rank, first = size;
  check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce(consistency check)");
  if (first == size) return;
  const std::string theirs = bcast_string(comm, rank == first ? describe() : std::string(), first);
  const std::string zeros = bcast_string(comm, rank == 0 ? describe() : std::string(), 0);
  throw MismatchError("hma: " + what + " differs across ranks: rank " + std::to_string(first) +
                          " has " + theirs + ", rank 0 has " + zeros,
                      first);
}

void agree_on_duplicate(MPI_Comm comm, const std::function<void(MPI_Comm ctrl)>& fn) {
  require_mpi("averager");
  if (comm == MPI_COMM_NULL) return fn(comm);
  const Comm ctrl = Comm::attach(comm).dup();  // the only collective on the caller's comm
  agree(ctrl.get(), [&] { fn(ctrl.get()); });
}

}  // namespace hma::detail
