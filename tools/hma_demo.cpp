// hma-demo: local SGD on a least-squares problem, one data shard per rank, with hierarchical
// model averaging: node-local averages often, world averages rarely. Run under mpirun, e.g.
//   HMA_RANKS_PER_NODE=4 mpirun -np 8 build/tools/hma-demo --schedule 2:node,8:world --steps 40
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "hma/hma.hpp"

namespace {

struct Args {
  std::string schedule = "2:node,8:world";
  std::int64_t steps = 40, warmup = 0;
  int dim = 16, rows = 64;
  double lr = 0.05;
  bool nonblocking = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "hma-demo: %s\nusage: hma-demo [--schedule SPEC] [--steps N] [--warmup N] "
               "[--dim D] [--rows R] [--lr X] [--nonblocking]\n",
               why);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + k).c_str());
      return argv[++i];
    };
    try {
      if (k == "--schedule") a.schedule = next();
      else if (k == "--steps") a.steps = std::stoll(next());
      else if (k == "--warmup") a.warmup = std::stoll(next());
      else if (k == "--dim") a.dim = std::stoi(next());
      else if (k == "--rows") a.rows = std::stoi(next());
      else if (k == "--lr") a.lr = std::stod(next());
      else if (k == "--nonblocking") a.nonblocking = true;
      else usage(("unknown argument " + k).c_str());
    } catch (const std::logic_error&) {
      usage(("bad value for " + k).c_str());
    }
  }
  if (a.steps < 1 || a.dim < 1 || a.rows < 1) usage("steps, dim and rows must be positive");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const Args args = parse(argc, argv);
  int rc = 0;
  try {
    hma::HierarchicalAverager avg(MPI_COMM_WORLD, args.schedule, args.warmup);
    if (rank == 0) std::printf("%s", avg.describe().c_str());

    // The problem: b = A w* + noise; each rank draws its own shard of rows (A_r, b_r), with a
    // rank-dependent bias so that purely local training would disagree.
    const int d = args.dim, m = args.rows;
    std::vector<double> w_true(static_cast<std::size_t>(d));
    std::mt19937_64 g0(42);
    std::normal_distribution<double> n01(0.0, 1.0);
    for (auto& x : w_true) x = n01(g0);
    std::mt19937_64 gen(1000 + static_cast<unsigned>(rank));
    std::vector<double> A(static_cast<std::size_t>(m * d)), b(static_cast<std::size_t>(m));
    for (int i = 0; i < m; ++i) {
      double dot = 0;
      for (int j = 0; j < d; ++j) {
        const double a = n01(gen) + (j == rank % d ? 1.0 : 0.0);
        A[static_cast<std::size_t>(i * d + j)] = a;
        dot += a * w_true[static_cast<std::size_t>(j)];
      }
      b[static_cast<std::size_t>(i)] = dot + 0.1 * n01(gen);
    }

    // Parameters: the weights live in hma's buffer (zero-copy); the scalar bias is the caller's
    // own float, packed and unpacked by hma on each average.
    hma::ParamSet params;
    hma::Array<double> w = params.allocate<double>(static_cast<std::size_t>(d), 0.0);
    std::vector<float> bias(1, 0.0f);
    params.add(bias);

    auto local_loss = [&] {
      double s = 0;
      for (int i = 0; i < m; ++i) {
        double r = -b[static_cast<std::size_t>(i)] + bias[0];
        for (int j = 0; j < d; ++j) r += A[static_cast<std::size_t>(i * d + j)] * w[static_cast<std::size_t>(j)];
        s += r * r;
      }
      return s / m;
    };

    if (rank == 0)
      std::printf("\n%6s  %-28s  %12s  %12s\n", "step", "averaged over", "mean loss", "spread");
    std::vector<double> grad(static_cast<std::size_t>(d));
    for (std::int64_t t = 0; t < args.steps + 1; ++t) {
      // Local SGD step on this rank's shard.
      double gb = 0;
      std::fill(grad.begin(), grad.end(), 0.0);
      for (int i = 0; i < m; ++i) {
        double r = -b[static_cast<std::size_t>(i)] + bias[0];
        for (int j = 0; j < d; ++j) r += A[static_cast<std::size_t>(i * d + j)] * w[static_cast<std::size_t>(j)];
        for (int j = 0; j < d; ++j) grad[static_cast<std::size_t>(j)] += 2 * r * A[static_cast<std::size_t>(i * d + j)] / m;
        gb += 2 * r / m;
      }
      for (int j = 0; j < d; ++j) w[static_cast<std::size_t>(j)] -= args.lr * grad[static_cast<std::size_t>(j)];
      bias[0] -= static_cast<float>(args.lr * gb);

      // Average on the scheduled level.
      const auto level = avg.level_now();
      if (args.nonblocking) {
        hma::Request req = avg.start(params);
        req.wait();
      } else {
        avg.step(params);
      }

      // Report: mean loss over ranks and the spread of w[0] across ranks (0 after a world average).
      double loss = local_loss(), sum = 0, lo = 0, hi = 0;
      MPI_Allreduce(&loss, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      MPI_Allreduce(&w[0], &lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
      MPI_Allreduce(&w[0], &hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      if (rank == 0) {
        std::string where = "-";
        if (level) {
          const auto& lv = avg.schedule().levels()[*level];
          where = "level " + std::to_string(*level) + ": " + std::to_string(size / lv.group_size) +
                  " group(s) of " + std::to_string(lv.group_size);
        }
        std::printf("%6lld  %-28s  %12.6f  %12.3e\n", static_cast<long long>(t), where.c_str(),
                    sum / size, hi - lo);
      }
    }

    // Final check: after the last world average all ranks must hold bit-identical parameters.
    const auto& levels = avg.schedule().levels();
    std::int64_t last_world = -1;
    for (std::int64_t t = 0; t <= args.steps; ++t)
      if (auto l = avg.schedule().level_at(t); l && levels[*l].group_size == size) last_world = t;
    std::vector<double> mine(w.begin(), w.end());
    mine.push_back(static_cast<double>(bias[0]));
    std::vector<double> lo(mine.size()), hi(mine.size());
    MPI_Allreduce(mine.data(), lo.data(), static_cast<int>(mine.size()), MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(mine.data(), hi.data(), static_cast<int>(mine.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    bool agree = lo == hi;
    double err = 0;
    for (int j = 0; j < d; ++j) err = std::max(err, std::abs(w[static_cast<std::size_t>(j)] - w_true[static_cast<std::size_t>(j)]));
    if (rank == 0) {
      if (last_world == args.steps) {
        std::printf("\nfinal step %lld was a world average: all %d ranks agree bit-for-bit: %s\n",
                    static_cast<long long>(args.steps), size, agree ? "yes" : "NO");
        if (!agree) rc = 1;
      } else {
        std::printf("\nfinal step %lld was not a world average (last one: %lld); ranks agree: %s\n",
                    static_cast<long long>(args.steps), static_cast<long long>(last_world),
                    agree ? "yes" : "no");
      }
      std::printf("max |w - w*| = %.4f after %lld steps\n", err, static_cast<long long>(args.steps));
    }
    MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma-demo (rank %d): %s\n", rank, e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
