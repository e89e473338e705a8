// The cost model (lib/control/model.hpp): its formulas on hand-computed cases, the calibration
// file (reading, writing, errors naming file and line), the direction-split threshold, and that
// `auto` follows the model (describe() and the path taken) and that ranks must agree on it.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "control/model.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"

using hma::detail::Across;
using hma::detail::LinkModel;
using hma::detail::Shape;

namespace {

// Round numbers: 10 us per message, 1e9 B/s one way, duplex 0.5, node pair 2 us + 4e9 B/s,
// flat 5e8 B/s.
LinkModel round_model() {
  LinkModel m;
  m.inter_alpha_us = 10;
  m.inter_bytes_per_s = 1e9;
  m.inter_duplex = 0.5;
  m.intra_alpha_us = 2;
  m.intra_bytes_per_s = 4e9;
  m.flat_bytes_per_s = 5e8;
  return m;
}

std::string temp_file(const std::string& text) {
  const std::string path = "/tmp/hma_test_model_" + std::to_string(hma_test::rank()) + ".txt";
  std::ofstream(path) << text;
  return path;
}

}  // namespace

TEST_CASE("the model's terms, computed by hand") {
  const LinkModel m = round_model();
  const double MiB = 1 << 20;
  // Within a node: 2 + S / 4e9 s.
  CHECK(hma::detail::predict_node_us(m, 4, 4 * MiB) == Approx(2 + 4 * MiB / 4e9 * 1e6));
  CHECK(hma::detail::predict_node_us(m, 1, 4 * MiB) == 0);
  // Flat over 4 nodes x 2: 2 ceil(log2 4) 10 + 1.5 S / 5e8 + node(S).
  CHECK(hma::detail::predict_flat_us(m, {4, 2}, 4 * MiB) ==
        Approx(40 + 1.5 * 4 * MiB / 5e8 * 1e6 + 2 + 4 * MiB / 4e9 * 1e6));
  // Across two nodes, split: 2 alpha + c / beta; MPI: 2 alpha + c / (beta d).
  CHECK(hma::detail::predict_across_us(m, {2, 2}, MiB, Across::split) == Approx(20 + MiB / 1e9 * 1e6));
  CHECK(hma::detail::predict_across_us(m, {2, 2}, MiB, Across::mpi) == Approx(20 + MiB / 5e8 * 1e6));
  // Across 4 nodes, the split ring: 4 (N-1) alpha + 1.5 c / beta.
  CHECK(hma::detail::predict_across_us(m, {4, 2}, MiB, Across::split) == Approx(120 + 1.5 * MiB / 1e9 * 1e6));
  // An odd number of nodes has no split: MPI_Allreduce's term either way.
  CHECK(hma::detail::best_across(m, {3, 2}, 64 * MiB) == Across::mpi);
  // Two-level, 4 MiB over 2 x 2: four pieces of 1 MiB, each max(across, node), plus one node term.
  const double node = 2 + MiB / 4e9 * 1e6, across = 20 + MiB / 1e9 * 1e6;
  CHECK(hma::detail::predict_two_level_us(m, {2, 2}, 4 * MiB, 4 << 20) == Approx(node + 4 * across));
  // A buffer smaller than a piece is one piece of its own size; at 64 KiB over nodes of 2 it is
  // under the split's 64 KiB-per-rank floor (128 KiB), so MPI_Allreduce's term, as the
  // transport does.
  CHECK(hma::detail::predict_two_level_us(m, {2, 2}, 64 << 10, 4 << 20) ==
        Approx(2 + 65536 / 4e9 * 1e6 + 20 + 65536 / 5e8 * 1e6));
  // 16 ranks per node: the floor is 16 x 64 KiB = 1 MiB; 2 MiB goes in 4 pieces of 512 KiB, none
  // split.
  const double node16 = 2 + 512 * 1024 / 4e9 * 1e6, mpi16 = 20 + 512 * 1024 / 5e8 * 1e6;
  CHECK(hma::detail::predict_two_level_us(m, {2, 16}, 2 * MiB, 4 << 20) == Approx(node16 + 4 * mpi16));
}

TEST_CASE("the direction split where its fewer bytes outweigh its messages") {
  const LinkModel m = round_model();
  // Two nodes: the split costs no more messages, so from the 64 KiB-per-rank floor (L = 2).
  CHECK(hma::detail::split_min_piece(m, {2, 2}) == std::size_t{128} << 10);
  CHECK(hma::detail::split_min_piece(m, {3, 2}) == SIZE_MAX);
  // 1,250 nodes: 4 * 1249 messages of 10 us against MPI_Allreduce's 2 * 11: only pieces where
  // 2 (1249/1250) c (1 / (beta d) - 1 / beta) > (4996 - 22) alpha, c > 24.89 MB, take the ring
  // (the threshold is searched in steps of 1/8).
  const std::size_t c = hma::detail::split_min_piece(m, {1250, 8});
  CHECK(c > 24'890'000);
  CHECK(c < 24'890'000 * 9 / 8);
  CHECK(hma::detail::best_across(m, {1250, 8}, static_cast<double>(c)) == Across::split);
  CHECK(hma::detail::best_across(m, {1250, 8}, static_cast<double>(c) / 1.2) == Across::mpi);
}

TEST_CASE("device calibration: direct from the smallest size where it wins from there on") {
  using hma::detail::device_direct_from;
  const std::vector<double> sizes = {1 << 20, 16 << 20, 128 << 20};
  CHECK(device_direct_from(sizes, {800, 7000, 53000}, {1000, 29000, 250000}) == 0);  // Open MPI 4.1 on an H200
  CHECK(device_direct_from(sizes, {800, 7000, 53000}, {1000, 6000, 40000}) == 16 << 20);
  CHECK(device_direct_from(sizes, {800, 7000, 53000}, {700, 6000, 40000}) == 1 << 20);
  CHECK(device_direct_from(sizes, {800, 7000, 53000}, {700, 8000, 40000}) == 128 << 20);  // not from 1 MiB
  CHECK(device_direct_from(sizes, {800, 7000, 53000}, {700, 6000, 53000}) == 0);  // a tie is no win
  CHECK(device_direct_from({}, {}, {}) == 0);
  CHECK_THROWS_WITH(device_direct_from(sizes, {1, 2}, {1, 2, 3}), Catch::Matchers::Contains("one time of each path"));
  CHECK_THROWS_WITH(device_direct_from({2, 1}, {2, 2}, {1, 1}), Catch::Matchers::Contains("ascend"));
}

TEST_CASE("calibration files: written, read back, and errors that name the file and line") {
  const LinkModel m = round_model();
  const std::string path = temp_file("# from a test\n" + hma::detail::format_link_model(m));
  const LinkModel r = hma::detail::read_link_model(path);
  CHECK(r.inter_alpha_us == m.inter_alpha_us);
  CHECK(r.inter_bytes_per_s == m.inter_bytes_per_s);
  CHECK(r.inter_duplex == m.inter_duplex);
  CHECK(r.intra_alpha_us == m.intra_alpha_us);
  CHECK(r.intra_bytes_per_s == m.intra_bytes_per_s);
  CHECK(r.flat_bytes_per_s == m.flat_bytes_per_s);
  CHECK(r.device_direct_from_bytes == 0);  // not calibrated: the key is left out
  CHECK(hma::detail::format_link_model(m).find("device_direct_from_bytes") == std::string::npos);
  LinkModel d = m;
  d.device_direct_from_bytes = 3 << 20;  // a device calibration (hma-bench-device --calibrate)
  CHECK(hma::detail::read_link_model(temp_file(hma::detail::format_link_model(d))).device_direct_from_bytes ==
        3 << 20);
  CHECK_THROWS_WITH(hma::detail::read_link_model(temp_file("inter_alpha_us = 3\nspeed = 9\n")),
                    Catch::Matchers::Contains("line 2: unknown key `speed`"));
  CHECK_THROWS_WITH(hma::detail::read_link_model(temp_file("inter_duplex = -1\n")),
                    Catch::Matchers::Contains("line 1: expected `key = positive number`"));
  CHECK_THROWS_WITH(hma::detail::read_link_model(temp_file("inter_bytes_per_s = 1e9 2e9\n")),
                    Catch::Matchers::Contains("line 1: expected `key = positive number`"));
  CHECK_THROWS_WITH(hma::detail::read_link_model(temp_file("intra_alpha_us = 1\nintra_alpha_us = 2\n")),
                    Catch::Matchers::Contains("line 2: `intra_alpha_us` given twice"));
  CHECK_THROWS_WITH(hma::detail::read_link_model(temp_file("inter_duplex = 1.5\n")),
                    Catch::Matchers::Contains("inter_duplex is a fraction of the one-way rate"));
  CHECK_THROWS_WITH(hma::detail::read_link_model("/nonexistent/hma-model.txt"),
                    Catch::Matchers::Contains("cannot read the calibration file /nonexistent/hma-model.txt"));
  std::remove(path.c_str());
}

TEST_CASE("HMA_MODEL reaches the settings, a bad file is refused at construction") {
  const std::string good = temp_file(hma::detail::format_link_model(round_model()));
  setenv("HMA_MODEL", good.c_str(), 1);
  {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
    CHECK(avg.describe().find("cost model") == std::string::npos);  // one node: no choice to make
  }
  const std::string bad = temp_file("flat_bytes_per_s = fast\n");
  setenv("HMA_MODEL", bad.c_str(), 1);
  CHECK_THROWS_WITH(hma::PeriodicAverager(MPI_COMM_WORLD, 1),
                    Catch::Matchers::Contains("HMA_MODEL " + bad + " line 1"));
  unsetenv("HMA_MODEL");
}
