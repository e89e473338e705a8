// hma-bench-schedule: a training-like loop (a compute phase, then an average on the scheduled
// level) for several schedules, blocking and overlapped (start, compute, wait). Reports the
// communication time per step, the fraction of averaging time hidden behind compute, and the
// bytes each level moved.
//   HMA_RANKS_PER_NODE=2 mpirun -np 4 build/bench/hma-bench-schedule --bytes 4M --compute-us 5000
#include <cstring>

#include "bench_util.hpp"
#include "hma/hma.hpp"

namespace {

const char* kUsage =
    "usage: hma-bench-schedule [options]\n"
    "  --bytes N          bytes averaged (f32; default 4M; K/M/G suffixes)\n"
    "  --steps N          steps per run (default 48)\n"
    "  --compute-us U     compute phase per step, µs of busy work (default 5000)\n"
    "  --poll-us U        while overlapping, call Request::test() every U µs of compute\n"
    "                     (default 200; 0: never, Open MPI then progresses only in wait)\n"
    "  --compute KIND     spin (busy CPU, default) or sleep (idle CPU, like a GPU step)\n"
    "  --schedules LIST   ';'-separated schedule specs (default: '1;8;2:node,8:world',\n"
    "                     with node = HMA_RANKS_PER_NODE or shared-memory ranks)\n"
    "  --csv FILE, --json FILE\n";

bool g_sleep = false;  // --compute sleep: the CPU idles, as while a GPU computes

// "Compute" for `us` µs (busy, or sleeping with --compute sleep), calling `poll` every `poll_us`
// µs (if > 0).
template <class Poll>
void compute(double us, double poll_us, Poll&& poll) {
  const double t0 = bench::now_us();
  if (g_sleep) {
    while (true) {
      const double left = us - (bench::now_us() - t0);
      if (left <= 0) return;
      const double nap = poll_us > 0 ? std::min(left, poll_us) : left;
      std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(nap));
      if (poll_us > 0) poll();
    }
  }
  double next = t0 + poll_us;
  volatile double sink = 0;
  while (true) {
    const double t = bench::now_us();
    if (t - t0 >= us) break;
    if (poll_us > 0 && t >= next) {
      poll();
      next = t + poll_us;
    }
    for (int i = 0; i < 64; ++i) sink = sink + 1.0;
  }
}

struct Result {
  double total_us_per_step = 0;
  std::vector<int> averages;  // per level
};

Result run_loop(hma::Averager& avg, hma::ParamSet& ps, int steps, double compute_us, double poll_us,
                bool overlap) {
  Result r;
  r.averages.assign(avg.schedule().levels().size(), 0);
  avg.set_step(0);
  MPI_Barrier(MPI_COMM_WORLD);
  const double t0 = bench::now_us();
  hma::Request inflight;
  for (int s = 0; s < steps; ++s) {
    if (overlap) {
      compute(compute_us, poll_us, [&] { (void)inflight.test(); });
      inflight.wait();
      if (auto l = avg.level_now()) ++r.averages[*l];
      inflight = avg.start(ps);
    } else {
      compute(compute_us, 0, [] {});
      if (auto l = avg.level_now()) ++r.averages[*l];
      avg.step(ps);
    }
  }
  inflight.wait();
  double dt = bench::now_us() - t0, slowest = 0;
  MPI_Allreduce(&dt, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  r.total_us_per_step = slowest / steps;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  bench::init(&argc, &argv);
  bench::Flags flags(argc, argv, kUsage);
  const bench::Meta meta = bench::collect_meta(argc, argv);
  const long long bytes = flags.integer("bytes", 4LL << 20);
  const int steps = static_cast<int>(flags.integer("steps", 48));
  const double compute_us = flags.real("compute-us", 5000), poll_us = flags.real("poll-us", 200);
  const std::string kind = flags.str("compute", "spin");
  if (kind != "spin" && kind != "sleep") flags.fail("--compute must be spin or sleep");
  g_sleep = kind == "sleep";
  const std::string specs = flags.str("schedules", "1;8;2:node,8:world");
  const std::string csv = flags.str("csv", ""), json = flags.str("json", "");
  flags.done();
  if (bytes < 4 || steps < 1 || compute_us < 0 || poll_us < 0) flags.fail("bad --bytes/--steps/--compute-us/--poll-us");
  const int np = bench::size();
  try {
    hma::ParamSet ps;
    auto w = ps.allocate<float>(static_cast<std::size_t>(bytes) / 4, 1.0f);
    (void)w;
    bench::Table table({"schedule", "mode", "compute", "np", "bytes", "compute_us", "step_us", "comm_us_per_step",
                        "hidden_pct", "averages_per_level", "MB_per_rank_per_level"});
    bench::warn_oversubscribed();
    // Compute alone: the reference for the communication time.
    double c0 = bench::now_us();
    for (int s = 0; s < steps; ++s) compute(compute_us, 0, [] {});
    double calone = (bench::now_us() - c0) / steps, cmax = 0;
    MPI_Allreduce(&calone, &cmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (bench::rank() == 0) {
      std::printf("# hma-bench-schedule: np %d, %s f32, %d steps, compute %.0f µs/step (measured %.0f), "
                  "poll every %.0f µs, compute %s, %s, %s\n",
                  np, bench::human_bytes(static_cast<double>(bytes)).c_str(), steps, compute_us, cmax,
                  poll_us, kind.c_str(), meta.mpi.c_str(), meta.date.c_str());
      std::printf("%-22s %-9s %10s %12s %8s  %s\n", "schedule", "mode", "step µs", "comm µs/step",
                  "hidden", "averages per level (MB moved per rank)");
    }
    std::size_t from = 0;
    while (from <= specs.size()) {
      const std::size_t semi = specs.find(';', from);
      const std::string spec = specs.substr(from, semi == std::string::npos ? std::string::npos : semi - from);
      from = semi == std::string::npos ? specs.size() + 1 : semi + 1;
      if (spec.empty()) continue;
      // A plain number is a periodic schedule; anything else hierarchical ('node' allowed).
      std::unique_ptr<hma::Averager> avg;
      if (spec.find(':') == std::string::npos)
        avg = std::make_unique<hma::Averager>(MPI_COMM_WORLD, hma::Schedule::parse(spec, 0, np));
      else
        avg = std::make_unique<hma::HierarchicalAverager>(MPI_COMM_WORLD, spec, 0);
      const Result blocking = run_loop(*avg, ps, steps, compute_us, 0, false);
      const Result overlap = run_loop(*avg, ps, steps, compute_us, poll_us, true);
      const double comm_b = blocking.total_us_per_step - cmax, comm_o = overlap.total_us_per_step - cmax;
      const double hidden = comm_b > 0 ? 100.0 * (1.0 - comm_o / comm_b) : 0;
      std::string per_level, mb_level;
      for (std::size_t l = 0; l < blocking.averages.size(); ++l) {
        const int g = avg->schedule().levels()[l].group_size;
        // Bytes a rank sends in a bandwidth-optimal allreduce: 2 (g - 1) / g of the buffer.
        const double mb = blocking.averages[l] * 2.0 * (g - 1) / g * static_cast<double>(bytes) / 1e6;
        per_level += (l ? "/" : "") + std::to_string(blocking.averages[l]);
        mb_level += (l ? "/" : "") + bench::fmt(mb, 1);
      }
      for (int m = 0; m < 2; ++m) {
        const Result& r = m == 0 ? blocking : overlap;
        const double comm = m == 0 ? comm_b : comm_o;
        table.add({spec, m == 0 ? "blocking" : "overlap", kind, std::to_string(np), std::to_string(bytes),
                   bench::fmt(compute_us, 0), bench::fmt(r.total_us_per_step, 1), bench::fmt(comm, 1),
                   m == 0 ? "0" : bench::fmt(hidden, 1), per_level, mb_level});
        if (bench::rank() == 0)
          std::printf("%-22s %-9s %10.1f %12.1f %7.1f%%  %s (%s)\n", spec.c_str(),
                      m == 0 ? "blocking" : "overlap", r.total_us_per_step, comm,
                      m == 0 ? 0.0 : hidden, per_level.c_str(), mb_level.c_str());
      }
    }
    if (bench::rank() == 0) {
      std::printf("# comm = step time - compute alone; hidden = 1 - comm(overlap) / comm(blocking)\n");
      if (!csv.empty()) table.write_csv(csv);
      if (!json.empty()) table.write_json(json, meta);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma-bench-schedule (rank %d): %s\n", bench::rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return 0;
}
