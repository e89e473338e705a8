#include "control/check.hpp"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <limits>
#include <map>
#include <thread>

#include "buffer_common.hpp"
#include "hma/error.hpp"
#include "support/mpi_static.hpp"

namespace hma::detail {

std::string rank_ranges(const std::vector<int>& r) {
  std::string s;
  for (std::size_t i = 0; i < r.size();) {
    std::size_t j = i;
    while (j + 1 < r.size() && r[j + 1] == r[j] + 1) ++j;
    if (!s.empty()) s += ',';
    s += std::to_string(r[i]);
    if (j > i) s += '-' + std::to_string(r[j]);
    i = j + 1;
  }
  return s;
}

std::string GroupInfo::describe() const {
  return "level " + std::to_string(level) + " (group of " + std::to_string(world_ranks.size()) +
         " ranks, world ranks " + rank_ranges(world_ranks) + ")";
}

std::chrono::steady_clock::time_point deadline_after(double seconds) {
  using clock = std::chrono::steady_clock;
  // Beyond ~30 years the sum would overflow the clock's 64-bit nanoseconds: no limit.
  if (!(seconds > 0) || seconds > 1e9) return clock::time_point::max();
  return clock::now() +
         std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
}

namespace {

// The check's record as one MPI datatype and its reduction: min over the first `kMin` words,
// a 128-bit sum over the last two. Made on first use, freed by MPI_Finalize.
template <std::size_t kMin, std::size_t kAll>
struct CheckOp {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op op = MPI_OP_NULL;

  static void reduce(void* in, void* inout, int* len, MPI_Datatype*) {
    const auto* a = static_cast<const std::uint64_t*>(in);
    auto* b = static_cast<std::uint64_t*>(inout);
    for (int r = 0; r < *len; ++r, a += kAll, b += kAll) {
      for (std::size_t i = 0; i < kMin; ++i) b[i] = std::min(a[i], b[i]);
      const WeightSum s = ((WeightSum{a[kMin + 1]} << 64) | a[kMin]) + ((WeightSum{b[kMin + 1]} << 64) | b[kMin]);
      b[kMin] = static_cast<std::uint64_t>(s);
      b[kMin + 1] = static_cast<std::uint64_t>(s >> 64);
    }
  }
  static const CheckOp& get() {
    static const CheckOp made = [] {
      CheckOp c;
      check(MPI_Type_contiguous(static_cast<int>(kAll), MPI_UINT64_T, &c.type), "MPI_Type_contiguous(check)");
      check(MPI_Type_commit(&c.type), "MPI_Type_commit(check)");
      check(MPI_Op_create(&CheckOp::reduce, 1, &c.op), "MPI_Op_create(check)");
      free_at_finalize(c.op, c.type);
      return c;
    }();
    return made;
  }
};

}  // namespace

void ControlCheck::start(MPI_Comm ctrl, const Header& h, bool nonfinite_here, Weight weight,
                         std::string invalid_here) {
  ctrl_ = ctrl;
  mine_ = h;
  bad_ = nonfinite_here ? 1 : 0;
  invalid_ = std::move(invalid_here);
  for (std::size_t i = 0; i < K; ++i) {
    in_[i] = h.v[i];
    in_[K + i] = ~h.v[i];
  }
  in_[2 * K] = ~bad_;
  in_[2 * K + 1] = invalid_.empty() ? ~std::uint64_t{0} : ~std::uint64_t{1};
  in_[2 * K + 2] = weight;
  in_[2 * K + 3] = ~weight;
  in_[kMin] = weight;
  in_[kMin + 1] = 0;
  const auto& c = CheckOp<kMin, kAll>::get();
  check(MPI_Iallreduce(in_.data(), out_.data(), 1, c.type, c.op, ctrl_, &req_),
        "MPI_Iallreduce(agreement check)");
}

bool ControlCheck::test() {
  if (complete_) return true;
  int flag = 0;
  check(MPI_Test(&req_, &flag, MPI_STATUS_IGNORE), "MPI_Test(agreement check)");
  complete_ = flag != 0;
  return complete_;
}

bool ControlCheck::wait_until(std::chrono::steady_clock::time_point deadline) {
  if (complete_) return true;
  if (deadline == std::chrono::steady_clock::time_point::max()) {
    check(MPI_Wait(&req_, MPI_STATUS_IGNORE), "MPI_Wait(agreement check)");
    complete_ = true;
    return true;
  }
  // A few fast polls first (the usual case: the group is there), then yield the core.
  for (int i = 0; !test(); ++i) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    if (i > 1000) std::this_thread::yield();
  }
  return true;
}

namespace {

std::string value_text(std::size_t field, const std::uint64_t* row) {
  switch (field) {
    case Header::step:
      return "step " + std::to_string(static_cast<std::int64_t>(row[Header::step]));
    case Header::call:
      return row[Header::call] == 0 ? "step()/start()" : "average()/start_average()";
    case Header::level:
      return "level " + std::to_string(row[Header::level]);
    case Header::set:
      return row[Header::set] == 0 ? "a ParamSet" : "a DeviceParamSet";
    default: {
      char fp[20];
      std::snprintf(fp, sizeof fp, "%016" PRIx64, row[Header::fingerprint]);
      return std::to_string(row[Header::arrays]) + " arrays: " +
             describe_bucket("f32", row[Header::f32_owned], row[Header::f32_packed]) + ", " +
             describe_bucket("f64", row[Header::f64_owned], row[Header::f64_packed]) +
             " [layout " + fp + "]";
    }
  }
}

const char* field_name(std::size_t field) {
  switch (field) {
    case Header::step: return "step counter";
    case Header::call: return "call";
    case Header::level: return "level";
    case Header::set: return "kind of set";
    default: return "buffer layout";
  }
}

}  // namespace

Verdict ControlCheck::resolve(const GroupInfo& who) {
  bool same = true;
  for (std::size_t i = 0; i < K; ++i) same = same && out_[i] == ~out_[K + i];
  const bool any_bad = ~out_[2 * K] != 0, any_invalid = ~out_[2 * K + 1] != 0;
  Verdict verdict;
  verdict.weight_min = out_[2 * K + 2];
  verdict.weight_max = ~out_[2 * K + 3];
  verdict.weight_sum = (static_cast<WeightSum>(out_[kMin + 1]) << 64) | out_[kMin];
  if (same && !any_bad && !any_invalid) return verdict;
  // Every rank of the group saw the same reduction, so all of them are here.
  const std::size_t n = who.world_ranks.size();
  constexpr std::size_t R = K + 2;  // a row: the header, the non-finite vote, invalid here
  std::array<std::uint64_t, R> row{};
  for (std::size_t i = 0; i < K; ++i) row[i] = mine_.v[i];
  row[K] = bad_;
  row[K + 1] = invalid_.empty() ? 0 : 1;
  std::vector<std::uint64_t> all(n * R);
  check(MPI_Allgather(row.data(), static_cast<int>(R), MPI_UINT64_T, all.data(), static_cast<int>(R),
                      MPI_UINT64_T, ctrl_),
        "MPI_Allgather(agreement check)");
  auto at = [&](std::size_t r) { return all.data() + r * R; };
  if (any_invalid) {
    // A rank's bad argument comes first: its header means nothing. Its reason, from the lowest
    // such rank, goes to the whole group.
    std::vector<int> invalid;
    int first = -1;
    for (std::size_t r = 0; r < n; ++r)
      if (at(r)[K + 1] != 0) {
        if (first < 0) first = static_cast<int>(r);
        invalid.push_back(who.world_ranks[r]);
      }
    int len = static_cast<int>(invalid_.size());
    check(MPI_Bcast(&len, 1, MPI_INT, first, ctrl_), "MPI_Bcast(invalid argument)");
    std::string reason = invalid_;
    reason.resize(static_cast<std::size_t>(len));
    if (len > 0) check(MPI_Bcast(reason.data(), len, MPI_CHAR, first, ctrl_), "MPI_Bcast(invalid argument)");
    const std::string others =
        invalid.size() > 1 ? " (invalid arguments on world ranks " + rank_ranges(invalid) + ")" : "";
    throw InvalidArgument("hma: " + who.describe() + ": world rank " + std::to_string(invalid.front()) +
                          " passed an invalid argument: " + reason + others +
                          "; nothing was averaged on any rank of the group");
  }
  if (!same) {
    std::string detail;
    int first = -1;
    // The layout fields are reported together, as one text.
    for (std::size_t f : {std::size_t{Header::step}, std::size_t{Header::call},
                          std::size_t{Header::level}, std::size_t{Header::set},
                          std::size_t{Header::fingerprint}}) {
      std::map<std::string, std::vector<int>> holders;
      std::vector<std::string> order;
      for (std::size_t r = 0; r < n; ++r) {
        const std::string t = value_text(f, at(r));
        if (!holders.count(t)) order.push_back(t);
        holders[t].push_back(who.world_ranks[r]);
      }
      if (order.size() < 2) continue;
      if (first < 0) first = holders[order[1]].front();
      detail += std::string(detail.empty() ? "" : "; ") + field_name(f) + ": ";
      for (std::size_t k = 0; k < order.size(); ++k)
        detail += (k ? ", " : "") + order[k] + " on world rank" +
                  (holders[order[k]].size() > 1 ? "s " : " ") + rank_ranges(holders[order[k]]);
    }
    throw MismatchError("hma: " + who.describe() +
                            ": the ranks of the group are not in the same average, so nothing was "
                            "averaged: " + detail +
                            ". A rank skipped or repeated a step()/average(), set another step "
                            "(set_step, restore), or changed its set's arrays on its own",
                        first);
  }
  for (std::size_t r = 0; r < n; ++r)
    if (at(r)[K] != 0) verdict.nonfinite_ranks.push_back(who.world_ranks[r]);
  return verdict;
}

}  // namespace hma::detail
