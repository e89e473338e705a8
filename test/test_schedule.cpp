// Schedule: PyTorch's averaging rules, exhaustively, and every validation error.
#include <optional>
#include <vector>

#include "hma/error.hpp"
#include "hma/schedule.hpp"
#include "mpi_test.hpp"

using hma::Level;
using hma::Schedule;

namespace {

// Direct transcriptions of torch.distributed.algorithms.model_averaging, driven the way torch
// drives them: one average_parameters() call per step, `step` incremented after each call.
struct TorchPeriodic {
  std::int64_t period, warmup, step = 0;
  std::optional<std::size_t> average_parameters() {
    std::optional<std::size_t> used;
    if (step >= warmup && (step - warmup) % period == 0) used = 0;
    step += 1;
    return used;
  }
};
struct TorchHierarchical {
  std::vector<std::int64_t> periods;
  std::int64_t warmup, step = 0;
  std::optional<std::size_t> average_parameters() {
    std::optional<std::size_t> used;
    if (step >= warmup)
      for (std::size_t i = periods.size(); i-- > 0;)  // for period in reversed(self._periods)
        if (step % periods[i] == 0) {
          used = i;
          break;
        }
    step += 1;
    return used;
  }
};

}  // namespace

TEST_CASE("periodic schedule matches torch's PeriodicModelAverager for steps 0..1000") {
  int configs = 0;
  for (std::int64_t period = 1; period <= 13; ++period)
    for (std::int64_t warmup : {0, 1, 2, 3, 7, 10, 64, 999, 1001}) {
      const Schedule s = Schedule::periodic(period, warmup, 8);
      TorchPeriodic torch{period, warmup};
      for (std::int64_t step = 0; step <= 1000; ++step) {
        const auto want = torch.average_parameters();
        if (s.level_at(step) != want) {
          INFO("period " << period << " warmup " << warmup << " step " << step);
          REQUIRE(s.level_at(step) == want);
        }
      }
      ++configs;
    }
  REQUIRE(configs == 13 * 9);
}

TEST_CASE("hierarchical schedule matches torch's HierarchicalModelAverager for steps 0..1000") {
  // Every strictly increasing list of 1 to 3 periods from 1..12, several warmups.
  std::vector<std::vector<std::int64_t>> lists;
  for (std::int64_t a = 1; a <= 12; ++a) {
    lists.push_back({a});
    for (std::int64_t b = a + 1; b <= 12; ++b) {
      lists.push_back({a, b});
      for (std::int64_t c = b + 1; c <= 12; ++c) lists.push_back({a, b, c});
    }
  }
  int configs = 0, averaging_steps = 0;
  for (const auto& periods : lists)
    for (std::int64_t warmup : {0, 1, 5, 8, 100}) {
      std::vector<Level> levels;
      const int sizes[] = {2, 4, 8};
      for (std::size_t i = 0; i < periods.size(); ++i)
        levels.push_back({periods[i], sizes[3 - periods.size() + i]});
      const Schedule s = Schedule::hierarchical(levels, warmup, 8);
      TorchHierarchical torch{periods, warmup};
      for (std::int64_t step = 0; step <= 1000; ++step) {
        const auto want = torch.average_parameters();
        averaging_steps += want.has_value();
        if (s.level_at(step) != want) {
          INFO("periods " << Catch::Detail::stringify(periods) << " warmup " << warmup << " step "
                          << step);
          REQUIRE(s.level_at(step) == want);
        }
      }
      ++configs;
    }
  REQUIRE(configs == static_cast<int>(lists.size()) * 5);
  REQUIRE(averaging_steps > 0);
}

TEST_CASE("hierarchical uses the absolute step, periodic the step after warmup") {
  const auto h = Schedule::hierarchical({{4, 8}}, 3, 8);
  const auto p = Schedule::periodic(4, 3, 8);
  REQUIRE(!h.level_at(3));  // 3 % 4 != 0
  REQUIRE(h.level_at(4) == 0u);
  REQUIRE(p.level_at(3) == 0u);  // (3 - 3) % 4 == 0
  REQUIRE(!p.level_at(4));
  REQUIRE(p.level_at(7) == 0u);
  REQUIRE(!h.level_at(0));  // before warmup
  REQUIRE(!p.level_at(2));
}

TEST_CASE("the largest dividing period wins; non-nesting group sizes are valid") {
  const auto s = Schedule::hierarchical({{2, 2}, {3, 3}, {12, 6}}, 0, 6);
  REQUIRE(s.level_at(0) == 2u);
  REQUIRE(!s.level_at(1));
  REQUIRE(s.level_at(2) == 0u);
  REQUIRE(s.level_at(3) == 1u);
  REQUIRE(s.level_at(4) == 0u);
  REQUIRE(s.level_at(6) == 1u);  // divisible by 2 and 3: the larger period, 3
  REQUIRE(s.level_at(12) == 2u);
}

TEST_CASE("parse: periodic, hierarchical, node and world tokens, spaces") {
  REQUIRE(Schedule::parse("4", 2, 8) == Schedule::periodic(4, 2, 8));
  REQUIRE(Schedule::parse("2:4,8:8", 0, 8) == Schedule::hierarchical({{2, 4}, {8, 8}}, 0, 8));
  REQUIRE(Schedule::parse(" 2 : node , 8 : world ", 1, 8, 4) ==
          Schedule::hierarchical({{2, 4}, {8, 8}}, 1, 8));
  REQUIRE(Schedule::parse("+3:2,6:4", 0, 4).levels() == std::vector<Level>{{3, 2}, {6, 4}});
  const auto s = Schedule::parse("1:2,4:4,16:8", 5, 8);
  REQUIRE(s.to_string() == "hierarchical 1:2,4:4,16:8 warmup 5 world 8");
  REQUIRE(Schedule::periodic(3, 0, 2).to_string() == "periodic 3 warmup 0 world 2");
}

TEST_CASE("fingerprints differ when anything differs") {
  const auto a = Schedule::parse("2:4,8:8", 0, 8);
  REQUIRE(a.fingerprint() == Schedule::parse("2:4,8:8", 0, 8).fingerprint());
  REQUIRE(a.fingerprint() != Schedule::parse("2:4,8:8", 1, 8).fingerprint());
  REQUIRE(a.fingerprint() != Schedule::parse("2:2,8:8", 0, 8).fingerprint());
  REQUIRE(a.fingerprint() != Schedule::parse("4:4,8:8", 0, 8).fingerprint());
  REQUIRE(Schedule::periodic(2, 0, 8).fingerprint() != Schedule::periodic(2, 0, 16).fingerprint());
  REQUIRE(Schedule::periodic(8, 0, 8).fingerprint() != Schedule::parse("8:8", 0, 8).fingerprint());
}

TEST_CASE("warnings: period 1, as torch warns") {
  REQUIRE(Schedule::periodic(1, 0, 4).warnings().size() == 1);
  REQUIRE_THAT(Schedule::periodic(1, 0, 4).warnings()[0], Catch::Contains("period is 1"));
  REQUIRE(Schedule::periodic(2, 0, 4).warnings().empty());
  REQUIRE(Schedule::hierarchical({{1, 4}}, 0, 4).warnings().size() == 1);
  REQUIRE(Schedule::hierarchical({{1, 2}, {2, 4}}, 0, 4).warnings().empty());
}

TEST_CASE("validation errors name the level, the value and the rule") {
  using hma::InvalidArgument;
  using Catch::Contains;
  auto msg = [](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "no error";
  };
  // torch's checks
  REQUIRE_THAT(msg([] { Schedule::periodic(0, 0, 4); }), Contains("period must be a positive value, got 0"));
  REQUIRE_THAT(msg([] { Schedule::periodic(-3, 0, 4); }), Contains("got -3"));
  REQUIRE_THAT(msg([] { Schedule::periodic(2, -1, 4); }), Contains("warmup must be non-negative, got -1"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({}, 0, 4); }), Contains("at least one period:group_size"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{0, 4}}, 0, 4); }),
               Contains("level 0 (0:4): period must be a positive value, got 0"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 2}, {4, 2}}, 0, 4); }),
               Contains("last level's group size 2 must equal the world size 4"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 4}}, -5, 4); }), Contains("warmup must be non-negative, got -5"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 3}, {4, 8}}, 0, 8); }),
               Contains("level 0 (2:3): group size 3 does not divide the world size 8"));
  // hma's additions
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{4, 2}, {2, 4}}, 0, 4); }),
               Contains("level 1 (2:4): period 2 must be greater than the previous level's 4"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 2}, {2, 4}}, 0, 4); }),
               Contains("periods must strictly increase"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 0}, {4, 4}}, 0, 4); }),
               Contains("level 0 (2:0): group size must be positive, got 0"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 8}, {4, 4}}, 0, 4); }),
               Contains("group size 8 exceeds the world size 4"));
  REQUIRE_THAT(msg([] { Schedule::hierarchical({{2, 4}}, 0, 0); }), Contains("world size must be >= 1, got 0"));
  // parse errors quote the token
  REQUIRE_THAT(msg([] { Schedule::parse("", 0, 4); }), Contains("is empty"));
  REQUIRE_THAT(msg([] { Schedule::parse("x", 0, 4); }), Contains("period 'x' is not an integer"));
  REQUIRE_THAT(msg([] { Schedule::parse("2:4,x:8", 0, 8); }),
               Contains("schedule \"2:4,x:8\": token 1 'x:8': period 'x' is not an integer"));
  REQUIRE_THAT(msg([] { Schedule::parse("2:four", 0, 4); }),
               Contains("token 0 '2:four': group size 'four' is not an integer, 'node' or 'world'"));
  REQUIRE_THAT(msg([] { Schedule::parse("2:4,,8:8", 0, 8); }), Contains("token 1 '': empty level"));
  REQUIRE_THAT(msg([] { Schedule::parse("2:4,8", 0, 8); }), Contains("token 1 '8': expected period:group_size"));
  REQUIRE_THAT(msg([] { Schedule::parse("2:node,4:world", 0, 8); }),
               Contains("'node' needs the ranks per node"));
  REQUIRE_THAT(msg([] { Schedule::parse("99999999999999999999", 0, 8); }), Contains("is not an integer"));
  REQUIRE_THAT(msg([] { Schedule::parse("2:4,8:8", 0, 6); }), Contains("group size 4 does not divide the world size 6"));
}
