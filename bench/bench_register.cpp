// hma-bench-register: the cost of registering many small arrays (issue 25) and of averaging them.
// For n one-element f32 arrays cut from one vector and registered in a shuffled order:
// registration (ParamSet::add, n times: an overlap check each) next to its floor (n push_backs
// into a vector of spans, no check), and one blocking average of the set (pack, reduce, unpack)
// next to its floor (a bare MPI_Allreduce on the same bytes). Median and spread over repeats;
// slowest rank per repeat. Usage: mpirun -np N hma-bench-register [--max N] [--csv FILE]
#include <mpi.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <span>
#include <vector>

#include "bench_util.hpp"
#include "hma/hma.hpp"

int main(int argc, char** argv) {
  bench::init(&argc, &argv);
  {
    bench::Flags args(argc, argv, "usage: mpirun -np N hma-bench-register [--max N] [--csv FILE]\n");
    const std::size_t max = static_cast<std::size_t>(args.integer("max", 100000));
    const std::string csv = args.str("csv", "");
    args.done();
    const int me = bench::rank(), np = bench::size();
    if (me == 0)
      std::printf("hma-bench-register: n one-element f32 arrays, np %d, build %s; µs, median (spread %%)\n"
                  "%9s %22s %22s %8s %22s %22s %8s\n",
                  np, HMA_BUILD_TYPE, "arrays", "register (add x n)", "floor (push_back x n)", "ratio",
                  "average (step)", "floor (MPI_Allreduce)", "ratio");
    std::ofstream out;
    if (me == 0 && !csv.empty()) {
      out.open(csv);
      out << "np,arrays,register_us,register_spread_pct,push_back_us,average_us,average_spread_pct,allreduce_us\n";
    }
    for (std::size_t n = 1000; n <= max; n *= 10) {
      std::vector<float> v(n, static_cast<float>(me));
      std::vector<std::size_t> order(n);
      for (std::size_t i = 0; i < n; ++i) order[i] = (i * 7919) % n;  // a permutation (7919 is prime)
      std::unique_ptr<hma::ParamSet> ps;
      const auto reg = bench::stats(bench::time_op(MPI_COMM_WORLD, 1, 10, 5.0, [&] {
        ps = std::make_unique<hma::ParamSet>();
        for (std::size_t i : order) ps->add(std::span<float>(v.data() + i, 1));
      }));
      const auto floor_reg = bench::stats(bench::time_op(MPI_COMM_WORLD, 1, 10, 5.0, [&] {
        std::vector<std::span<float>> spans;
        for (std::size_t i : order) spans.emplace_back(v.data() + i, 1);
        if (spans.size() != n) std::abort();
      }));
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
      const auto average = bench::stats(bench::time_op(MPI_COMM_WORLD, 2, 20, 5.0, [&] { (void)avg.step(*ps); }));
      std::vector<float> buf(n, 1.0f);
      const auto floor_avg = bench::stats(bench::time_op(MPI_COMM_WORLD, 2, 20, 5.0, [&] {
        MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      }));
      if (me == 0) {
        std::printf("%9zu %14.0f (%4.0f %%) %22.0f %7.1fx %14.0f (%4.0f %%) %22.0f %7.1fx\n", n, reg.median,
                    reg.spread_pct(), floor_reg.median, reg.median / floor_reg.median, average.median,
                    average.spread_pct(), floor_avg.median, average.median / floor_avg.median);
        if (out) out << np << ',' << n << ',' << reg.median << ',' << reg.spread_pct() << ',' << floor_reg.median << ','
                     << average.median << ',' << average.spread_pct() << ',' << floor_avg.median << '\n';
      }
    }
  }
  MPI_Finalize();
  return 0;
}
