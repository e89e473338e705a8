// hma-soak: random multi-level schedules, buffer layouts, options and call modes for many steps;
// every average is checked against an independently computed exact reference. A third of the
// configurations use device buffers (DeviceParamSet) on the host emulation backend, with random
// device paths, staging chunks and slots.
//   mpirun -np 4 build/test/hma-soak --steps 100000 --seed 1
// Exit code 0 only when every step matched on every rank.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "device/device_backend.hpp"
#include "hma/hma.hpp"
#include "torch_schedule.hpp"

namespace {

// Multiples of 6 in [-48, 48]: x / g is exact for g in {1, 2, 3, 4, 6, 8}, and so is every sum.
double value(int r, std::int64_t t, std::size_t i, std::uint64_t salt) {
  const std::uint64_t h = (static_cast<std::uint64_t>(r) * 0x9e3779b97f4a7c15ULL) ^
                          (static_cast<std::uint64_t>(t) * 0xbf58476d1ce4e5b9ULL) ^
                          (static_cast<std::uint64_t>(i) * 0x94d049bb133111ebULL) ^ salt;
  return 6.0 * static_cast<double>(static_cast<int>((h >> 29) % 17) - 8);
}

struct Arr {
  bool f32, owned, device = false;
  std::size_t n;
  hma::Array<float> af;
  hma::Array<double> ad;
  hma::DeviceArray<float> df;  // emulated device memory: host-readable
  hma::DeviceArray<double> dd;
  std::vector<float> vf;
  std::vector<double> vd;
  double get(std::size_t i) const {
    if (owned && device) return f32 ? df.data()[i] : dd.data()[i];
    if (owned) return f32 ? af[i] : ad[i];
    return f32 ? vf[i] : vd[i];
  }
  void set(std::size_t i, double v) {
    if (owned && device) {
      if (f32) df.data()[i] = static_cast<float>(v);
      else dd.data()[i] = v;
    } else if (owned) {
      if (f32) af[i] = static_cast<float>(v);
      else ad[i] = v;
    } else {
      if (f32) vf[i] = static_cast<float>(v);
      else vd[i] = v;
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, np = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &np);
  std::int64_t steps = 10000;
  std::uint64_t seed = 1;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--verbose") verbose = true;
    else if (k == "--steps" && i + 1 < argc) steps = std::atoll(argv[++i]);
    else if (k == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
  }
  std::vector<int> divisors;
  for (int g = 1; g <= np; ++g)
    if (np % g == 0) divisors.push_back(g);

  hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
  std::mt19937_64 rng(seed);  // same seed on every rank: the same choices everywhere
  auto pick = [&](std::uint64_t n) { return static_cast<std::uint64_t>(rng() % n); };
  long long mismatches = 0, averages = 0, epochs = 0, done = 0;
  try {
    while (done < steps) {
      ++epochs;
      // A random schedule: a random subset of the divisors (ending with the world), random
      // strictly increasing periods, random warmup; sometimes periodic.
      // The expected levels come from torch's rule (torch_schedule.hpp), not from hma::Schedule.
      std::vector<hma::Level> levels = {{1 + static_cast<std::int64_t>(pick(5)), np}};
      std::int64_t warmup = static_cast<std::int64_t>(pick(6));
      hma::Schedule sched = hma::Schedule::periodic(levels[0].period, warmup, np);
      const bool periodic = pick(4) == 0;
      if (!periodic) {
        levels.clear();
        std::int64_t period = 0;
        for (int g : divisors)
          if (g != np && pick(2) == 0) levels.push_back({period += 1 + static_cast<std::int64_t>(pick(4)), g});
        levels.push_back({period + 1 + static_cast<std::int64_t>(pick(8)), np});
        warmup = static_cast<std::int64_t>(pick(10));
        sched = hma::Schedule::hierarchical(levels, warmup, np);
      }
      std::vector<std::int64_t> periods;
      for (const auto& l : levels) periods.push_back(l.period);
      hma::AveragerOptions o;
      o.reduction = std::vector<hma::Reduction>{hma::Reduction::automatic, hma::Reduction::mpi, hma::Reduction::ring}[pick(3)];
      o.chunk_bytes = std::vector<std::size_t>{0, 12, 4096, std::size_t{4} << 20}[pick(4)];
      o.progress = provided >= MPI_THREAD_MULTIPLE && pick(3) == 0 ? hma::Progress::thread : hma::Progress::poll;
      // Tiny pieces on a worker thread of an oversubscribed machine crawl (thousands of
      // allreduces per step, every thread spinning): keep them to the caller's thread.
      if (*o.progress == hma::Progress::thread && *o.chunk_bytes < 4096) o.chunk_bytes = 4096;
      const bool device = pick(3) == 0;
      if (device) {
        o.cuda_aware = pick(2) == 0;
        o.device_path = *o.cuda_aware ? std::vector<hma::DevicePath>{hma::DevicePath::automatic, hma::DevicePath::staged,
                                                                     hma::DevicePath::direct}[pick(3)]
                                      : std::vector<hma::DevicePath>{hma::DevicePath::automatic, hma::DevicePath::staged}[pick(2)];
        o.staging_chunk_bytes = std::vector<std::size_t>{0, 16, 4096, std::size_t{4} << 20}[pick(4)];
        if (*o.progress == hma::Progress::thread && *o.staging_chunk_bytes < 4096) o.staging_chunk_bytes = 4096;
        o.staging_slots = 1 + pick(4);
      }
      hma::Averager avg(MPI_COMM_WORLD, sched, o);
      const std::int64_t first_step = static_cast<std::int64_t>(pick(50));
      avg.set_step(first_step);
      hma_test::TorchPeriodic torch_p{levels[0].period, warmup, first_step};
      hma_test::TorchHierarchical torch_h{periods, warmup, first_step};
      // A random layout. User arrays are declared before the sets that register them.
      std::vector<Arr> arrs(1 + pick(5));
      hma::ParamSet ps;
      hma::DeviceParamSet dps;
      for (auto& a : arrs) {
        a.f32 = pick(2) == 0;
        a.owned = pick(2) == 0;
        a.device = device;
        a.n = pick(4) == 0 ? pick(4) : pick(3000);
        if (a.owned && device) {
          if (a.f32) a.df = dps.allocate<float>(a.n);
          else a.dd = dps.allocate<double>(a.n);
        } else if (a.owned) {
          if (a.f32) a.af = ps.allocate<float>(a.n);
          else a.ad = ps.allocate<double>(a.n);
        } else {
          if (a.f32) a.vf.resize(a.n);
          else a.vd.resize(a.n);
        }
      }
      for (auto& a : arrs)  // register user arrays after all allocations
        if (!a.owned) {
          if (device && a.f32) dps.add(a.vf.data(), a.n);
          else if (device) dps.add(a.vd.data(), a.n);
          else if (a.f32) ps.add(a.vf);
          else ps.add(a.vd);
        }
      if (verbose && rank == 0) {
        std::printf("epoch %lld: %s, reduction %d, chunk %zu, progress %d, step %lld, %s\n", epochs,
                    sched.to_string().c_str(), static_cast<int>(*o.reduction), *o.chunk_bytes,
                    static_cast<int>(*o.progress), static_cast<long long>(avg.step_count()),
                    device ? (dps.describe() + "; " + avg.device_path() + ", staging chunk " +
                              std::to_string(*o.staging_chunk_bytes) + ", slots " +
                              std::to_string(*o.staging_slots)).c_str()
                           : ps.describe().c_str());
        std::fflush(stdout);
      }
      const std::int64_t len = std::min<std::int64_t>(steps - done, 20 + static_cast<std::int64_t>(pick(300)));
      for (std::int64_t k = 0; k < len; ++k, ++done) {
        const std::int64_t t = avg.step_count();
        const std::uint64_t salt = rng();
        std::size_t idx = 0;  // each array gets its own index range
        for (auto& a : arrs) {
          for (std::size_t i = 0; i < a.n; ++i) a.set(i, value(rank, t, idx + i, salt));
          idx += a.n;
        }
        const auto lvl = periodic ? torch_p.average_parameters() : torch_h.average_parameters();
        const int mode = static_cast<int>(pick(3));
        if (mode == 0) {
          const bool did = device ? avg.step(dps) : avg.step(ps);
          mismatches += did != lvl.has_value();
        } else {
          auto r = device ? avg.start(dps) : avg.start(ps);
          mismatches += r.level() != lvl;
          if (mode == 1) r.wait();
          else
            while (!r.test()) std::this_thread::yield();
        }
        if (device) dps.synchronize();  // the host reads the "device" arrays next
        averages += lvl.has_value();
        const int g = lvl ? levels[*lvl].group_size : 1;
        const int first = rank / g * g;
        idx = 0;
        for (auto& a : arrs) {
          for (std::size_t i = 0; i < a.n; ++i) {
            double sum = 0;
            for (int m = first; m < first + g; ++m) sum += value(m, t, idx + i, salt);
            if (a.get(i) != sum / g) ++mismatches;
          }
          idx += a.n;
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma-soak (rank %d): %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  long long total = 0;
  MPI_Allreduce(&mismatches, &total, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    std::printf("hma-soak: np %d, seed %llu: %lld steps in %lld random configurations, %lld averages, "
                "%lld mismatched elements\n",
                np, static_cast<unsigned long long>(seed), done, epochs, averages, total);
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
