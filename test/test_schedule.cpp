// Schedule: PyTorch's averaging rules, exhaustively, and every validation error.
#include <optional>
#include <vector>

#include "hma/error.hpp"
#include "hma/schedule.hpp"
#include "mpi_test.hpp"
#include "torch_schedule.hpp"

using hma::Level;
using hma::Schedule;

using hma_test::TorchHierarchical;
using hma_test::TorchPeriodic;
using hma_test::torch_levels;

TEST_CASE("periodic schedule matches torch's PeriodicModelAverager for steps 0..1000") {
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
    }
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
        if (s.level_at(step) != want) {
          INFO("periods " << Catch::Detail::stringify(periods) << " warmup " << warmup << " step "
                          << step);
          REQUIRE(s.level_at(step) == want);
        }
      }
    }
  REQUIRE(lists.size() == 12 + 66 + 220);  // every list of 1, 2 or 3 periods from 1..12
}

// The transcriptions above are themselves checked against tables written out by hand from
// torch's rules (and its docstring example), so an error shared by the transcription and
// hma::Schedule cannot pass unseen. -1: no average at that step.
TEST_CASE("hand-written schedule tables: torch's transcription and hma::Schedule agree with them") {
  struct Table {
    bool periodic;
    std::vector<std::int64_t> periods;
    std::int64_t warmup;
    std::vector<int> levels;  // steps 0, 1, 2, ...
  };
  const std::vector<Table> tables = {
      // PeriodicModelAverager(period=4, warmup_steps=100) averages at 100, 104, ...
      {true, {4}, 100, [] {
         std::vector<int> v(110, -1);
         v[100] = v[104] = v[108] = 0;
         return v;
       }()},
      // period 3, warmup 2: steps 2, 5, 8 (the step after warmup counts)
      {true, {3}, 2, {-1, -1, 0, -1, -1, 0, -1, -1, 0, -1}},
      {true, {1}, 0, {0, 0, 0, 0}},
      // torch's docstring: OrderedDict([(2, 2), (4, world_size)]), warmup_steps=100: nothing
      // before 100; then every 4th absolute step the world, every other 2nd step the group of 2.
      {false, {2, 4}, 100, [] {
         std::vector<int> v(110, -1);
         for (int t = 100; t < 110; ++t) v[static_cast<std::size_t>(t)] = t % 4 == 0 ? 1 : t % 2 == 0 ? 0 : -1;
         return v;
       }()},
      // Absolute steps after warmup: warmup 5 starts at step 6 (6 % 2 == 0), not at step 5.
      {false, {2, 6}, 5, {-1, -1, -1, -1, -1, -1, 1, -1, 0, -1, 0, -1, 1, -1, 0}},
      // The largest period that divides the step wins: 12 is divisible by 2, 3 and 4.
      {false, {2, 3, 4}, 0, {2, -1, 0, 1, 2, -1, 1, -1, 2, 1, 0, -1, 2}},
      {false, {1, 3, 9}, 0, {2, 0, 0, 1, 0, 0, 1, 0, 0, 2, 0, 0, 1}},
  };
  for (const Table& t : tables) {
    CAPTURE(t.periodic, t.periods, t.warmup);
    const auto torch = torch_levels(t.periodic, t.periods, t.warmup, static_cast<std::int64_t>(t.levels.size()));
    std::vector<Level> lv;
    for (std::size_t i = 0; i < t.periods.size(); ++i) lv.push_back({t.periods[i], 1 << (i + 1)});
    const Schedule s = t.periodic ? Schedule::periodic(t.periods[0], t.warmup, 8)
                                  : Schedule::hierarchical(lv, t.warmup, 1 << t.periods.size());
    for (std::size_t step = 0; step < t.levels.size(); ++step) {
      CAPTURE(step);
      const std::optional<std::size_t> want =
          t.levels[step] < 0 ? std::nullopt : std::optional<std::size_t>(static_cast<std::size_t>(t.levels[step]));
      REQUIRE(torch[step] == want);
      REQUIRE(s.level_at(static_cast<std::int64_t>(step)) == want);
    }
  }
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

TEST_CASE("post-local SGD: world every step before the switch, then torch's averager") {
  using hma_test::TorchPostLocal;
  for (std::int64_t sw : {0, 1, 5, 16, 100})
    for (std::int64_t warmup : {std::int64_t{0}, sw, sw + 3}) {
      const Schedule p = Schedule::post_local(Schedule::periodic(4, warmup, 8), sw);
      const Schedule h = Schedule::post_local(Schedule::hierarchical({{2, 4}, {8, 8}}, warmup, 8), sw);
      REQUIRE(p.post_local_switch() == sw);
      TorchPostLocal<TorchPeriodic> tp{sw, TorchPeriodic{4, warmup}, 0};
      TorchPostLocal<TorchHierarchical> th{sw, TorchHierarchical{{2, 8}, warmup}, 1};
      for (std::int64_t step = 0; step <= 300; ++step) {
        INFO("switch " << sw << " warmup " << warmup << " step " << step);
        REQUIRE(p.level_at(step) == tp.step());
        REQUIRE(h.level_at(step) == th.step());
      }
    }
  // Parsed, printed, fingerprinted (so checkpoints carry the switch).
  const auto s = Schedule::parse("post:100, 2:node,8:world", 100, 8, 4);
  REQUIRE(s == Schedule::post_local(Schedule::hierarchical({{2, 4}, {8, 8}}, 100, 8), 100));
  REQUIRE(s.to_string() == "hierarchical 2:4,8:8 warmup 100 world 8 post 100");
  REQUIRE(Schedule::parse("post:3,8", 3, 4) == Schedule::post_local(Schedule::periodic(8, 3, 4), 3));
  REQUIRE(s.fingerprint() != Schedule::parse("2:node,8:world", 100, 8, 4).fingerprint());
  REQUIRE(s.fingerprint() != Schedule::parse("post:99,2:node,8:world", 100, 8, 4).fingerprint());
  // switch 0 is no post-local phase at all: the plain schedule, fingerprint included.
  REQUIRE(Schedule::post_local(Schedule::periodic(8, 0, 4), 0).fingerprint() ==
          Schedule::periodic(8, 0, 4).fingerprint());
  // A warmup past the switch leaves a gap: warned.
  REQUIRE(Schedule::post_local(Schedule::periodic(8, 20, 4), 10).warnings().size() == 1);
  REQUIRE_THAT(Schedule::post_local(Schedule::periodic(8, 20, 4), 10).warnings()[0],
               Catch::Contains("no averaging from the switch at step 10 until the warmup ends at step 20"));
  REQUIRE(Schedule::post_local(Schedule::periodic(8, 10, 4), 10).warnings().empty());
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
  REQUIRE_THAT(msg([] { Schedule::post_local(Schedule::periodic(2, 0, 4), -1); }),
               Contains("post-local switch step must be non-negative, got -1"));
  REQUIRE_THAT(msg([] { Schedule::parse("post:x,8", 0, 4); }),
               Contains("token 'post:x': expected post:S, S the switch step"));
  REQUIRE_THAT(msg([] { Schedule::parse("post:5", 0, 4); }),
               Contains("post:S must be followed by the schedule after the switch, e.g. \"post:5,8\""));
  REQUIRE_THAT(msg([] { Schedule::parse("postal:5,8", 0, 4); }), Contains("expected post:S"));
  REQUIRE_THAT(msg([] { Schedule::parse("post:5,post:10,8", 0, 4); }), Contains("post:S may appear once, at the start"));
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
