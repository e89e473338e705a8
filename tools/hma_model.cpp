// hma-model: hma's cost model (lib/control/model.hpp) from the command line.
//
//   mpirun ... hma-model calibrate [--out FILE]
//       On >= 2 nodes of equal size, ranks in node blocks: measures the link across nodes
//       (latency, one-way rate, two-way rate of one process), a reduce-scatter + allgather
//       within a node, and MPI_Allreduce over all ranks; writes the calibration (HMA_MODEL=FILE
//       makes `auto` use it).
//   hma-model predict [--model FILE] --nodes N --ranks-per-node L [--bytes 1M,4M,16M]
//       Predicted time of one average per algorithm (flat, two-level) and the winner.
//   hma-model table [--model FILE] [--nodes N] [--ranks-per-node L] [--bytes 1M,64M]
//       Communication time per step of the schedules 1, 8, 2:node,8:world, 1:node,16:world
//       (default 1,250 nodes x 8 ranks = 10,000), each level with the algorithm auto picks.
// Without --model: HMA_MODEL, else the defaults (LinkModel). Times in microseconds.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "control/model.hpp"
#include "hma/schedule.hpp"
#include "link_measure.hpp"

namespace {

using hma::detail::LinkModel;
using hma::detail::Shape;

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "hma-model: %s\nusage: hma-model calibrate [--out FILE]\n"
               "       hma-model predict [--model FILE] --nodes N --ranks-per-node L [--bytes LIST]\n"
               "       hma-model table [--model FILE] [--nodes N] [--ranks-per-node L] [--bytes LIST]\n",
               why.c_str());
  std::exit(2);
}

double parse_bytes(const std::string& t) {
  char* end = nullptr;
  double v = std::strtod(t.c_str(), &end);
  const std::string u = end;
  if (u == "K" || u == "k") v *= 1024;
  else if (u == "M") v *= 1024.0 * 1024;
  else if (u == "G") v *= 1024.0 * 1024 * 1024;
  else if (!u.empty() || !(v > 0)) usage("bad size `" + t + "` (a number with K, M or G)");
  return v;
}

std::vector<double> parse_list(const std::string& s) {
  std::vector<double> v;
  std::size_t a = 0;
  while (a <= s.size()) {
    const std::size_t b = std::min(s.find(',', a), s.size());
    v.push_back(parse_bytes(s.substr(a, b - a)));
    a = b + 1;
  }
  return v;
}

int calibrate(const std::string& out) {
  int rank = 0, size = 0, L = 0, lr = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  MPI_Comm_size(node, &L);
  MPI_Comm_rank(node, &lr);
  int lmin = 0, lmax = 0;
  MPI_Allreduce(&L, &lmin, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&L, &lmax, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  const int N = size / L;
  // Nodes must be contiguous blocks of ranks (rank r on the node of rank r - r % L): the figures
  // across nodes come from world ranks 0 and L, and flat's from MPI_Allreduce in that layout.
  int leader = rank;
  MPI_Bcast(&leader, 1, MPI_INT, 0, node);
  const int blocks_here = leader == rank - rank % L ? 1 : 0;
  int blocks = 0;
  MPI_Allreduce(&blocks_here, &blocks, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (lmin != lmax || N < 2 || blocks == 0) {
    if (rank == 0)
      std::fprintf(stderr,
                   "hma-model calibrate: needs >= 2 nodes of equal size in contiguous blocks of ranks "
                   "(--map-by ppr:L:node, or tools/cluster --map slot); got %d ranks, %d-%d per node%s\n",
                   size, lmin, lmax, blocks == 0 ? ", not in blocks" : "");
    MPI_Comm_free(&node);
    return 2;
  }
  LinkModel m;
  // Across nodes: world rank 0 and rank L (the first rank of the next node, ranks in blocks).
  const hma_tools::LinkFigures link = hma_tools::measure_link(MPI_COMM_WORLD, 0, L);
  m.inter_alpha_us = link.latency_s * 1e6;
  m.inter_bytes_per_s = link.one_way_Bps;
  m.inter_duplex = std::min(1.0, link.two_way_Bps / link.one_way_Bps);
  // Within a node: reduce-scatter + allgather of c bytes (f32), at two sizes.
  std::vector<float> x(std::size_t{2} << 20), y(std::size_t{2} << 20);
  auto node_pair = [&](std::size_t bytes) {
    const int blk = static_cast<int>(bytes / 4 / static_cast<std::size_t>(L));
    MPI_Reduce_scatter_block(x.data(), y.data(), blk, MPI_FLOAT, MPI_SUM, node);
    MPI_Allgather(y.data(), blk, MPI_FLOAT, x.data(), blk, MPI_FLOAT, node);
  };
  const double c1 = 256 << 10, c2 = 4 << 20;
  const double t1 = hma_tools::timed(MPI_COMM_WORLD, 10, [&] { node_pair(static_cast<std::size_t>(c1)); });
  const double t2 = hma_tools::timed(MPI_COMM_WORLD, 10, [&] { node_pair(static_cast<std::size_t>(c2)); });
  m.intra_bytes_per_s = (c2 - c1) / std::max(t2 - t1, 1e-9);
  m.intra_alpha_us = std::max(1.0, (t1 - c1 / m.intra_bytes_per_s) * 1e6);
  // MPI_Allreduce over all ranks at 1 and 4 MiB: the rate a node's bytes cross at.
  std::vector<float> w(std::size_t{1} << 20);
  const double s1 = 1 << 20, s2 = 4 << 20;
  const double f1 = hma_tools::timed(MPI_COMM_WORLD, 6, [&] { MPI_Allreduce(MPI_IN_PLACE, w.data(), 1 << 18, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); });
  const double f2 = hma_tools::timed(MPI_COMM_WORLD, 6, [&] { MPI_Allreduce(MPI_IN_PLACE, w.data(), 1 << 20, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); });
  const double node_d = (s2 - s1) / m.intra_bytes_per_s;
  m.flat_bytes_per_s = 2.0 * (N - 1) / N * (s2 - s1) / std::max(f2 - f1 - node_d, 1e-9);
  if (rank == 0) {
    char head[160];
    std::snprintf(head, sizeof head, "# hma-model calibrate: %d nodes x %d ranks\n", N, L);
    const std::string text = head + hma::detail::format_link_model(m);
    std::fputs(text.c_str(), stdout);
    if (!out.empty()) {
      std::ofstream f(out);
      f << text;
      if (!f) {
        std::fprintf(stderr, "hma-model: cannot write %s\n", out.c_str());
        return 1;
      }
    }
  }
  MPI_Comm_free(&node);
  return 0;
}

LinkModel load(const std::string& file) {
  if (!file.empty()) return hma::detail::read_link_model(file);
  if (const char* e = std::getenv("HMA_MODEL"); e != nullptr && *e != 0) return hma::detail::read_link_model(e);
  return LinkModel{};
}

// One average at a level of groups of `group` ranks, with auto's choice.
double level_us(const LinkModel& m, int group, int L, double bytes, const char** how) {
  if (group <= L) {
    *how = "node";
    return hma::detail::predict_node_us(m, group, bytes);
  }
  const Shape s{group / L, L};
  const double f = hma::detail::predict_flat_us(m, s, bytes);
  const double t = hma::detail::predict_two_level_us(m, s, bytes, 4 << 20);
  *how = t < f ? "two-level" : "flat";
  return std::min(f, t);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("no command");
  const std::string cmd = argv[1];
  std::string model_file, out, bytes_list;
  int nodes = 0, per_node = 0;
  for (int i = 2; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    if (k == "--model") model_file = next();
    else if (k == "--out") out = next();
    else if (k == "--bytes") bytes_list = next();
    else if (k == "--nodes") nodes = std::atoi(next().c_str());
    else if (k == "--ranks-per-node") per_node = std::atoi(next().c_str());
    else usage("unknown argument " + k);
  }
  if (cmd == "calibrate") {
    MPI_Init(&argc, &argv);
    const int rc = calibrate(out);
    MPI_Finalize();
    return rc;
  }
  LinkModel m;
  try {
    m = load(model_file);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  if (cmd == "predict") {
    if (nodes < 1 || per_node < 1) usage("predict needs --nodes and --ranks-per-node");
    const Shape s{nodes, per_node};
    std::printf("# hma-model predict: %d nodes x %d ranks; times in us\n", nodes, per_node);
    std::printf("bytes,flat_us,two_level_us,across,winner\n");
    for (double b : parse_list(bytes_list.empty() ? "64K,256K,1M,4M,16M" : bytes_list)) {
      const double f = hma::detail::predict_flat_us(m, s, b);
      const double t = hma::detail::predict_two_level_us(m, s, b, 4 << 20);
      const double c =
          std::min(b, static_cast<double>(hma::detail::two_level_piece_bytes(static_cast<std::size_t>(b), 4 << 20)));
      const bool split = c >= static_cast<double>(hma::detail::split_min_piece(m, s));
      std::printf("%.0f,%.1f,%.1f,%s,%s\n", b, f, t, split ? "split" : "mpi", t < f ? "two-level" : "flat");
    }
    return 0;
  }
  if (cmd == "table") {
    if (nodes == 0) nodes = 1250;
    if (per_node == 0) per_node = 8;
    const int world = nodes * per_node;
    std::printf("# hma-model table: %d nodes x %d ranks = %d; communication per step (us), each level with "
                "auto's algorithm\n",
                nodes, per_node, world);
    std::printf("schedule,bytes,us_per_step,levels\n");
    for (double b : parse_list(bytes_list.empty() ? "1M,64M" : bytes_list)) {
      for (const char* spec : {"1", "8", "2:node,8:world", "1:node,16:world"}) {
        const auto sch = hma::Schedule::parse(spec, 0, world, per_node);
        const auto& lv = sch.levels();
        constexpr int kSteps = 1 << 12;  // a multiple of every period above
        std::vector<int> count(lv.size(), 0);
        for (int t = 1; t <= kSteps; ++t)
          if (auto l = sch.level_at(t)) ++count[*l];
        double total = 0;
        std::string what;
        for (std::size_t i = 0; i < lv.size(); ++i) {
          const char* how = "";
          const double us = level_us(m, lv[i].group_size, per_node, b, &how);
          total += us * count[i];
          char buf[160];
          std::snprintf(buf, sizeof buf, "%sgroup %d every %lld: %s %.0f us", what.empty() ? "" : "; ",
                        lv[i].group_size, static_cast<long long>(lv[i].period), how, us);
          what += buf;
        }
        std::printf("%s,%.0f,%.1f,\"%s\"\n", spec, b, total / kSteps, what.c_str());
      }
    }
    return 0;
  }
  usage("unknown command " + cmd);
}
