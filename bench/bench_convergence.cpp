// hma-bench-convergence: local SGD on a small real problem, one row per averaging method.
// Logistic regression on synthetic data: every rank holds its own shard, drawn around a centre of
// its own (the shards are not identically distributed, as in federated or ensemble runs), and
// processes its own batch size (rank r: batch * (1 + r % 3) samples per step: ranks of unequal
// speed). Each method starts from the same model and data and runs the same steps; only the
// averaging differs:
//   every-step        periodic 1 (synchronous SGD on the parameters)
//   periodic-8        periodic 8
//   hierarchical      2:node,8:world
//   hier-nesterov     2:node,8:world, Nesterov outer optimizer at the world level (lr 0.7, mom 0.9)
//   weighted-8        periodic 8, each rank weighted by the samples it processed since the last
//                     average (set_weight)
//   post-local        post:<steps/4>,2:node,8:world (world every step first, then hierarchical)
//   hier-bf16         2:node,8:world with the world level sent as bf16
// Loss = the mean logistic loss over ALL ranks' data of the world average of the ranks' models
// (evaluated outside hma, not counted). bytes_moved: per rank, sum over its averages of
// 2 (g - 1) / g * the bytes on the wire (what a bandwidth-optimal allreduce sends per rank).
// comm_us: time inside hma's step() per rank, the slowest rank's total.
//   mpirun -np 4 build/bench/hma-bench-convergence --csv conv.csv --curve conv_curve.csv
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "hma/hma.hpp"

namespace {

const char* kUsage =
    "usage: hma-bench-convergence [options]\n"
    "  --steps N       SGD steps per method (default 400)\n"
    "  --features D    features per sample (default 256)\n"
    "  --samples N     samples per rank (default 4096)\n"
    "  --batch B       base batch size (default 16; rank r uses B * (1 + r % 3))\n"
    "  --lr X          inner learning rate (default 0.05)\n"
    "  --skew X        distance between the ranks' data centres (default 3)\n"
    "  --every N       loss curve: evaluate every N steps (default 10)\n"
    "  --methods LIST  comma list (default: all, see the header of bench_convergence.cpp)\n"
    "  --csv FILE      one row per method: method,np,steps,final_loss,bytes_moved,comm_us,...\n"
    "  --curve FILE    loss against step and bytes: method,np,step,loss,bytes_moved\n";

struct Data {
  int d = 0;
  std::vector<float> x;  // n x d
  std::vector<float> y;  // 0 or 1
  std::size_t n() const { return y.size(); }
};

// Rank r's shard: x ~ N(centre_r, 1), y ~ Bernoulli(sigmoid(w* . x)); the centres differ by rank.
Data make_shard(int r, int d, std::size_t n, double skew) {
  std::mt19937_64 truth(12345);  // the same w* on every rank
  std::normal_distribution<double> g(0, 1);
  std::vector<double> w_star(static_cast<std::size_t>(d));
  for (auto& v : w_star) v = g(truth) / std::sqrt(d) * 3;
  std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(r));
  std::vector<double> centre(static_cast<std::size_t>(d));
  for (auto& v : centre) v = g(rng) * skew / std::sqrt(d) * 3;
  std::uniform_real_distribution<double> u(0, 1);
  Data s;
  s.d = d;
  s.x.resize(n * static_cast<std::size_t>(d));
  s.y.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    double z = 0;
    for (int j = 0; j < d; ++j) {
      const double v = centre[static_cast<std::size_t>(j)] + g(rng);
      s.x[i * static_cast<std::size_t>(d) + static_cast<std::size_t>(j)] = static_cast<float>(v);
      z += v * w_star[static_cast<std::size_t>(j)];
    }
    s.y[i] = u(rng) < 1 / (1 + std::exp(-z)) ? 1.0f : 0.0f;
  }
  return s;
}

// Sum of the logistic loss of model (w[0..d), bias w[d]) over the shard.
double loss_sum(const Data& s, const float* w) {
  double sum = 0;
  for (std::size_t i = 0; i < s.n(); ++i) {
    double z = w[s.d];
    for (int j = 0; j < s.d; ++j) z += static_cast<double>(w[j]) * s.x[i * static_cast<std::size_t>(s.d) + static_cast<std::size_t>(j)];
    // log(1 + e^z) - y z, computed stably
    sum += (z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z))) - s.y[i] * z;
  }
  return sum;
}

struct Method {
  std::string name, schedule;
  bool nesterov = false, weighted = false, bf16 = false;
};

struct Result {
  double final_loss = 0, bytes = 0, comm_us = 0;
  int averages = 0;
};

}  // namespace

int main(int argc, char** argv) {
  bench::init(&argc, &argv);
  bench::Flags flags(argc, argv, kUsage);
  const bench::Meta meta = bench::collect_meta(argc, argv);
  const int steps = static_cast<int>(flags.integer("steps", 400));
  const int d = static_cast<int>(flags.integer("features", 256));
  const long long samples = flags.integer("samples", 4096);
  const int batch = static_cast<int>(flags.integer("batch", 16));
  const double lr = flags.real("lr", 0.05), skew = flags.real("skew", 3.0);
  const int every = static_cast<int>(flags.integer("every", 10));
  const std::string only = flags.str("methods", "");
  const std::string csv = flags.str("csv", ""), curve = flags.str("curve", "");
  flags.done();
  if (steps < 1 || d < 1 || samples < 1 || batch < 1 || every < 1 || !(lr > 0))
    flags.fail("need steps, features, samples, batch, every >= 1 and lr > 0");
  const int me = bench::rank(), np = bench::size();
  const std::string post = "post:" + std::to_string(steps / 4) + ",2:node,8:world";
  const std::vector<Method> all = {
      {"every-step", "1"},
      {"periodic-8", "8"},
      {"hierarchical", "2:node,8:world"},
      {"hier-nesterov", "2:node,8:world", true},
      {"weighted-8", "8", false, true},
      {"post-local", post},
      {"hier-bf16", "2:node,8:world", false, false, true},
  };
  std::vector<Method> methods;
  for (const auto& m : all)
    if (only.empty() || ("," + only + ",").find("," + m.name + ",") != std::string::npos) methods.push_back(m);
  if (methods.empty()) flags.fail("--methods: none of the names is known");

  const Data shard = make_shard(me, d, static_cast<std::size_t>(samples), skew);
  const int my_batch = batch * (1 + me % 3);
  bench::Table rows({"method", "np", "steps", "final_loss", "bytes_moved", "comm_us", "averages",
                     "schedule"});
  bench::Table points({"method", "np", "step", "loss", "bytes_moved"});
  // Evaluation is outside hma (a communicator of its own): the loss of the world mean model.
  MPI_Comm eval;
  MPI_Comm_dup(MPI_COMM_WORLD, &eval);
  auto global_loss = [&](const std::vector<float>& w) {
    std::vector<float> mean(w.size());
    MPI_Allreduce(w.data(), mean.data(), static_cast<int>(w.size()), MPI_FLOAT, MPI_SUM, eval);
    for (auto& v : mean) v /= static_cast<float>(np);
    double local[2] = {loss_sum(shard, mean.data()), static_cast<double>(shard.n())}, sum[2];
    MPI_Allreduce(local, sum, 2, MPI_DOUBLE, MPI_SUM, eval);
    return sum[0] / sum[1];
  };
  if (me == 0)
    std::printf("# hma-bench-convergence: np %d, %d steps, logistic regression, %d features, %lld "
                "samples per rank, batch %d x (1 + rank %% 3), lr %g, skew %g, %s\n",
                np, steps, d, samples, batch, lr, skew, meta.mpi.c_str());
  if (me == 0)
    std::printf("%-14s %-32s %11s %13s %12s %9s\n", "method", "schedule", "final loss", "bytes moved",
                "comm ms", "averages");
  for (const Method& m : methods) {
    hma::AveragerOptions o;
    if (m.nesterov) o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
    if (m.bf16) o.wire = std::vector<hma::Wire>{hma::Wire::exact, hma::Wire::bf16};
    hma::HierarchicalAverager avg(MPI_COMM_WORLD, m.schedule, 0, o);
    const auto& levels = avg.schedule().levels();
    hma::ParamSet ps;
    auto w = ps.allocate<float>(static_cast<std::size_t>(d) + 1, 0.0f);
    std::mt19937_64 pick(77 + static_cast<std::uint64_t>(me));
    std::uniform_int_distribution<std::size_t> idx(0, shard.n() - 1);
    std::vector<double> grad(static_cast<std::size_t>(d) + 1);
    Result res;
    long long since = 0;  // samples since this rank's last average (weighted-8)
    auto record = [&](int step) {
      std::vector<float> wv(w.begin(), w.end());
      const double l = global_loss(wv);
      double bytes = 0;
      MPI_Allreduce(&res.bytes, &bytes, 1, MPI_DOUBLE, MPI_MAX, eval);
      points.add({m.name, std::to_string(np), std::to_string(step), bench::fmt(l, 6), bench::fmt(bytes, 0)});
      return l;
    };
    record(0);
    for (int t = 0; t < steps; ++t) {
      std::fill(grad.begin(), grad.end(), 0.0);
      for (int b = 0; b < my_batch; ++b) {
        const std::size_t i = idx(pick);
        const float* x = shard.x.data() + i * static_cast<std::size_t>(d);
        double z = w[static_cast<std::size_t>(d)];
        for (int j = 0; j < d; ++j) z += static_cast<double>(w[static_cast<std::size_t>(j)]) * x[j];
        const double e = 1 / (1 + std::exp(-z)) - shard.y[i];
        for (int j = 0; j < d; ++j) grad[static_cast<std::size_t>(j)] += e * x[j];
        grad[static_cast<std::size_t>(d)] += e;
      }
      for (std::size_t j = 0; j <= static_cast<std::size_t>(d); ++j)
        w[j] -= static_cast<float>(lr * grad[j] / my_batch);
      since += my_batch;
      if (m.weighted) avg.set_weight(static_cast<double>(since));
      const auto level = avg.level_now();
      const double t0 = bench::now_us();
      const bool did = avg.step(ps);
      res.comm_us += bench::now_us() - t0;
      if (did) {
        const int g = levels[*level].group_size;
        const bool narrow = m.bf16 && *level == levels.size() - 1;
        res.bytes += 2.0 * (g - 1) / g * static_cast<double>(ps.bytes()) / (narrow ? 2 : 1);
        ++res.averages;
        since = 0;
      }
      if ((t + 1) % every == 0 || t + 1 == steps) res.final_loss = record(t + 1);
    }
    double bytes = 0, comm = 0;
    MPI_Allreduce(&res.bytes, &bytes, 1, MPI_DOUBLE, MPI_MAX, eval);
    MPI_Allreduce(&res.comm_us, &comm, 1, MPI_DOUBLE, MPI_MAX, eval);
    std::string sched = avg.schedule().to_string();
    if (m.nesterov) sched += " + nesterov outer";
    if (m.bf16) sched += " + bf16 world";
    if (m.weighted) sched += " + weights";
    rows.add({m.name, std::to_string(np), std::to_string(steps), bench::fmt(res.final_loss, 6),
              bench::fmt(bytes, 0), bench::fmt(comm, 0), std::to_string(res.averages), sched});
    if (me == 0)
      std::printf("%-14s %-32s %11.5f %13s %12.1f %9d\n", m.name.c_str(), m.schedule.c_str(),
                  res.final_loss, bench::human_bytes(bytes).c_str(), comm / 1e3, res.averages);
  }
  if (me == 0) {
    if (!csv.empty()) rows.write_csv(csv);
    if (!curve.empty()) points.write_csv(curve);
  }
  MPI_Comm_free(&eval);
  MPI_Finalize();
  return 0;
}
