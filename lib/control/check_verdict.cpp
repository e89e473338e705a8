// The agreement check's verdict (ControlCheck::resolve): when the ranks of a group are not in
// the same average, or one passed a bad argument, every rank learns who holds what and throws
// the same error naming them; otherwise the non-finite votes and the weights.
#include <cinttypes>
#include <cstdio>
#include <map>

#include "buffer_common.hpp"
#include "control/check.hpp"
#include "hma/error.hpp"

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
  const std::uint64_t flags = state_[kFlags];
  const bool same = (flags & kDiffer) == 0, any_bad = (flags & kBad) != 0, any_invalid = (flags & kInvalid) != 0;
  Verdict verdict;
  verdict.weight_min = state_[kWMin];
  verdict.weight_max = state_[kWMax];
  verdict.weight_sum = (static_cast<WeightSum>(state_[kSumHi]) << 64) | state_[kSumLo];
  fused_ = same && !any_invalid && (flags & kUnfused) == 0;
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
