// hma-bench-average: the time of one average, per size, next to its floor measured in the same
// run: bare MPI_Allreduce on the same bytes, bare MPI_Iallreduce + wait, and memcpy.
//   mpirun -np 2 build/bench/hma-bench-average --max-bytes 64M --csv avg.csv --json avg.json
#include <cstring>
#include <memory>
#include <numeric>

#include "bench_util.hpp"
#include "device/device_backend.hpp"
#include "hma/hma.hpp"

namespace {

const char* kUsage =
    "usage: hma-bench-average [options]\n"
    "  --min-bytes N     smallest size (default 4; K/M/G suffixes)\n"
    "  --max-bytes N     largest size (default 256M)\n"
    "  --factor F        size step factor (default 4)\n"
    "  --dtype f32|f64   element type (default f32)\n"
    "  --group G         average over contiguous groups of G ranks (default: all ranks)\n"
    "  --iters N         timed iterations per size (default 30)\n"
    "  --warmup N        untimed iterations per size (default 3)\n"
    "  --max-seconds S   stop a measurement after S s of timed work, >= 3 iterations (default 1)\n"
    "  --arrays K        arrays of the scattered (pack/unpack) variant (default 100)\n"
    "  --chunk-bytes N   hma's blocking chunk size (default: hma's default or HMA_CHUNK_BYTES)\n"
    "  --variants LIST   comma list of contiguous,scattered,start-wait,bare-nb,memcpy,flat,two-level\n"
    "                    (default: the first five; bare MPI_Allreduce is always measured: it is\n"
    "                    the floor). flat and two-level force HMA_ALGORITHM for the group's level\n"
    "                    (two-level needs groups of whole nodes) and print a second line per size.\n"
    "                    device-emulated: a DeviceParamSet on hma's host emulation backend (device\n"
    "                    memory = host memory): the staged path's chunking and MPI calls plus two\n"
    "                    memcpy passes standing in for the PCIe copies; blocking and start/wait\n"
    "                    unchecked: the contiguous average with the agreement check off\n"
    "                    (HMA_CHECK=0, unsafe), so the check's cost is measured in the same run\n"
    "                    bf16, fp16: the contiguous average sent as 16-bit values (AveragerOptions::wire;\n"
    "                    flat MPI_Allreduce with hma's op), next to hma's flat f32 average (add flat)\n"
    "                    outer: with an outer optimizer (Nesterov, lr 0.7, momentum 0.9) at the level\n"
    "                    divergence: with the divergence metric\n"
    "                    exchange: the floor of the agreement check's protocol, groups of 2: one\n"
    "                    MPI_Isend + MPI_Irecv of the check's message (72 bytes + the bytes, or the\n"
    "                    72-byte header alone above what rides in the check) with the partner\n"
    "  --csv FILE        write the results as CSV\n"
    "  --json FILE       write the results and the run's metadata as JSON\n";

template <class T>
void run(bench::Flags& flags, const bench::Meta& meta) {
  const long long min_b = flags.integer("min-bytes", 4), max_b = flags.integer("max-bytes", 256LL << 20);
  const double factor = flags.real("factor", 4);
  const int world = bench::size();
  const int group = static_cast<int>(flags.integer("group", world));
  const int iters = static_cast<int>(flags.integer("iters", 30)), warm = static_cast<int>(flags.integer("warmup", 3));
  const double max_s = flags.real("max-seconds", 1.0);
  const int arrays = static_cast<int>(flags.integer("arrays", 100));
  const long long chunk = flags.integer("chunk-bytes", -1);
  const std::string csv = flags.str("csv", ""), json = flags.str("json", "");
  const std::string variants = "," + flags.str("variants", "contiguous,scattered,start-wait,bare-nb,memcpy") + ",";
  auto on = [&](const char* v) { return variants.find("," + std::string(v) + ",") != std::string::npos; };
  flags.str("dtype", "");
  flags.done();
  if (min_b < 1 || max_b < min_b || factor <= 1 || iters < 1 || warm < 0 || arrays < 1)
    flags.fail("need 1 <= min-bytes <= max-bytes, factor > 1, iters >= 1, arrays >= 1");
  if (group < 1 || world % group != 0) flags.fail("--group must divide the rank count");
  if (on("exchange") && group != 2) flags.fail("--variants exchange: groups of 2 only");

  std::vector<hma::Level> levels;
  if (group < world) levels.push_back({std::int64_t{1} << 40, group});
  levels.push_back({std::int64_t{1} << 41, world});
  hma::AveragerOptions opt;
  if (chunk >= 0) opt.chunk_bytes = static_cast<std::size_t>(chunk);
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, levels, 0, opt);
  hma::AveragerOptions opt_flat = opt, opt_two = opt;
  opt_flat.algorithm = hma::Algorithm::flat;
  opt_two.algorithm = hma::Algorithm::two_level;
  std::unique_ptr<hma::HierarchicalAverager> avg_flat, avg_two, avg_unchecked;
  if (on("unchecked")) {
    hma::AveragerOptions o = opt;
    o.check_every_average = false;
    avg_unchecked = std::make_unique<hma::HierarchicalAverager>(MPI_COMM_WORLD, levels, 0, o);
  }
  if (on("flat")) avg_flat = std::make_unique<hma::HierarchicalAverager>(MPI_COMM_WORLD, levels, 0, opt_flat);
  // The features beyond torch, each on an averager of its own with the same other options.
  auto with = [&](auto&& set) {
    hma::AveragerOptions o = opt;
    set(o);
    return std::make_unique<hma::HierarchicalAverager>(MPI_COMM_WORLD, levels, 0, o);
  };
  std::unique_ptr<hma::HierarchicalAverager> avg_bf16, avg_fp16, avg_outer, avg_div;
  if (on("bf16")) avg_bf16 = with([](hma::AveragerOptions& o) { o.wire = std::vector<hma::Wire>{hma::Wire::bf16}; });
  if (on("fp16")) avg_fp16 = with([](hma::AveragerOptions& o) { o.wire = std::vector<hma::Wire>{hma::Wire::fp16}; });
  // The outer optimizer's state belongs to one set: a new averager per size (below).
  auto make_outer = [&] { return with([](hma::AveragerOptions& o) { o.outer = hma::OuterOptimizer{0.7, 0.9, true, 0}; }); };
  if (on("divergence")) avg_div = with([](hma::AveragerOptions& o) { o.divergence = true; });
  if (on("two-level")) {
    avg_two = std::make_unique<hma::HierarchicalAverager>(MPI_COMM_WORLD, levels, 0, opt_two);
    if (avg_two->hierarchy().two_level(0) == nullptr)
      flags.fail("--variants two-level: the groups are not made of several whole nodes here");
  }
  const MPI_Comm comm = avg.hierarchy().level(0).get();
  const MPI_Datatype type = std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
  const int n_ranks = group;

  bench::warn_oversubscribed();
  if (bench::rank() == 0) {
    std::printf("# hma-bench-average: np %d, groups of %d, %s, %s, build %s, %s\n", world, group,
                std::is_same_v<T, float> ? "f32" : "f64", meta.mpi.c_str(), meta.build.c_str(),
                meta.date.c_str());
    std::printf("# median µs of one in-place average (slowest rank per iteration); ratio = hma / bare "
                "MPI_Allreduce; spread = (p90 - p10) / median\n");
    std::printf("%10s %10s %10s %7s %6s %10s %7s %10s %10s %7s %10s %9s\n", "bytes", "bare", "hma",
                "ratio", "spread", "scattered", "ratio", "hma-nb", "bare-nb", "ratio", "memcpy",
                "busbw");
  }
  bench::Table table({"bytes", "np", "group", "dtype", "variant", "median_us", "p10_us", "p90_us",
                      "min_us", "max_us", "iters", "algbw_GBps", "busbw_GBps", "ratio_to_bare"});
  for (double fb = static_cast<double>(min_b); fb <= static_cast<double>(max_b) * 1.0001; fb *= factor) {
    const std::size_t n = std::max<std::size_t>(1, static_cast<std::size_t>(fb) / sizeof(T));
    const double bytes = static_cast<double>(n * sizeof(T));
    std::vector<T> bare(n, T(1)), src(n, T(1)), dst(n);
    hma::ParamSet contig;
    auto w = contig.allocate<T>(n, T(1));
    // Scattered: `arrays` user arrays of about equal size summing to n elements.
    const std::size_t k = std::min<std::size_t>(static_cast<std::size_t>(arrays), n);
    std::vector<std::vector<T>> pieces(k);
    hma::ParamSet scattered;
    for (std::size_t i = 0; i < k; ++i) {
      pieces[i].assign(n / k + (i < n % k ? 1 : 0), T(1));
      scattered.add(pieces[i]);
    }
    const int cnt = static_cast<int>(n);
    auto t_bare = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      MPI_Allreduce(MPI_IN_PLACE, bare.data(), cnt, type, MPI_SUM, comm);
    }));
    bench::Stats none;
    auto t_hma = !on("contiguous") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg.average(contig, 0); }));
    auto t_scat = !on("scattered") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg.average(scattered, 0); }));
    auto t_nb = !on("start-wait") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      auto r = avg.start_average(contig, 0);
      r.wait();
    }));
    auto t_bare_nb = !on("bare-nb") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      MPI_Request r;
      MPI_Iallreduce(MPI_IN_PLACE, bare.data(), cnt, type, MPI_SUM, comm, &r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
    }));
    // flat and two-level back to back in the same run, next to the same floor.
    auto t_flat = !on("flat") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_flat->average(contig, 0); }));
    auto t_two = !on("two-level") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_two->average(contig, 0); }));
    auto t_bf16 = !on("bf16") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_bf16->average(contig, 0); }));
    auto t_fp16 = !on("fp16") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_fp16->average(contig, 0); }));
    if (on("outer")) avg_outer = make_outer();
    auto t_outer = !on("outer") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_outer->average(contig, 0); }));
    auto t_div = !on("divergence") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_div->average(contig, 0); }));
    // The check's message: its 9-word header, and the terms where they ride in it (7,680 bytes
    // at most); sent as the check sends it (at most 256 bytes per inline message).
    std::vector<std::uint64_t> out_msg(9 + (bytes <= 7680 ? (static_cast<std::size_t>(bytes) + 7) / 8 : 0), 1), in_msg(out_msg.size());
    int ex_tag = 0;
    auto t_exchange = !on("exchange") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      const int peer = bench::rank() ^ 1;
      const std::size_t w = out_msg.size(), first = w <= 32 ? w : (w <= 64 ? 32 : std::min<std::size_t>(w, 489));
      MPI_Request q[4] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
      MPI_Isend(out_msg.data(), static_cast<int>(first), MPI_UINT64_T, peer, ex_tag, comm, &q[0]);
      if (w > first) MPI_Isend(out_msg.data() + first, static_cast<int>(w - first), MPI_UINT64_T, peer, ex_tag, comm, &q[1]);
      MPI_Irecv(in_msg.data(), static_cast<int>(first), MPI_UINT64_T, peer, ex_tag, comm, &q[2]);
      if (w > first) MPI_Irecv(in_msg.data() + first, static_cast<int>(w - first), MPI_UINT64_T, peer, ex_tag, comm, &q[3]);
      MPI_Waitall(4, q, MPI_STATUSES_IGNORE);
      ex_tag = (ex_tag + 1) % 1024;
    }));
    auto t_unchecked = !on("unchecked") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_unchecked->average(contig, 0); }));
    std::unique_ptr<hma::DeviceParamSet> dps;
    hma::DeviceArray<T> dw;
    if (on("device-emulated")) {
      hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
      dps = std::make_unique<hma::DeviceParamSet>();
      hma::detail::set_device_backend_for_testing(nullptr);
      dw = dps->allocate<T>(n, T(1));
    }
    auto t_dev = !on("device-emulated") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      avg.average(*dps, 0);
      dps->synchronize();
    }));
    auto t_dev_nb = !on("device-emulated") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      auto r = avg.start_average(*dps, 0);
      r.wait();
      dps->synchronize();
    }));
    auto t_copy = !on("memcpy") ? none : bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
      std::memcpy(dst.data(), src.data(), n * sizeof(T));
    }));
    (void)w;
    const double base = t_bare.median;
    auto add = [&](const char* variant, const bench::Stats& s, double ref) {
      table.add({bench::fmt(bytes, 0), std::to_string(world), std::to_string(group),
                 std::is_same_v<T, float> ? "f32" : "f64", variant, bench::fmt(s.median, 3),
                 bench::fmt(s.p10, 3), bench::fmt(s.p90, 3), bench::fmt(s.min, 3), bench::fmt(s.max, 3),
                 std::to_string(s.n), bench::fmt(bench::algbw(bytes, s.median), 4),
                 bench::fmt(bench::busbw(bytes, s.median, n_ranks), 4), bench::fmt(s.median / ref, 4)});
    };
    add("bare_allreduce", t_bare, base);
    if (on("contiguous")) add("hma_contiguous", t_hma, base);
    if (on("scattered")) add("hma_scattered", t_scat, base);
    if (on("start-wait")) add("hma_start_wait", t_nb, base);
    if (on("bare-nb")) add("bare_iallreduce_wait", t_bare_nb, base);
    if (on("memcpy")) add("memcpy", t_copy, base);
    if (on("flat")) add("hma_flat", t_flat, base);
    if (on("two-level")) add("hma_two_level", t_two, base);
    if (on("unchecked")) add("hma_unchecked", t_unchecked, base);
    if (on("exchange")) add("check_exchange", t_exchange, base);
    if (on("bf16")) add("hma_wire_bf16", t_bf16, base);
    if (on("fp16")) add("hma_wire_fp16", t_fp16, base);
    if (on("outer")) add("hma_outer_nesterov", t_outer, base);
    if (on("divergence")) add("hma_divergence", t_div, base);
    if (on("device-emulated")) add("emulated_device_staged", t_dev, base);
    if (on("device-emulated")) add("emulated_device_staged_start_wait", t_dev_nb, base);
    if (bench::rank() == 0)
      std::printf("%10s %10.1f %10.1f %7.3f %5.0f%% %10.1f %7.3f %10.1f %10.1f %7.3f %10.1f %9.3f\n",
                  bench::human_bytes(bytes).c_str(), base, t_hma.median, t_hma.median / base,
                  t_hma.spread_pct(), t_scat.median, t_scat.median / base, t_nb.median,
                  t_bare_nb.median, t_bare_nb.median > 0 ? t_nb.median / t_bare_nb.median : 0.0, t_copy.median,
                  bench::busbw(bytes, t_hma.median, n_ranks));
    if (bench::rank() == 0 && (on("flat") || on("two-level")))
      std::printf("%10s   flat %10.1f µs (%.3f)   two-level %10.1f µs (%.3f)\n", "",
                  t_flat.median, t_flat.median / base, t_two.median, t_two.median / base);
    if (bench::rank() == 0 && on("unchecked"))
      std::printf("%10s   agreement check: checked %10.1f µs, unchecked %10.1f µs: %+.1f%%\n", "",
                  t_hma.median, t_unchecked.median, 100.0 * (t_hma.median / t_unchecked.median - 1));
    if (bench::rank() == 0 && on("exchange"))
      std::printf("%10s   the check's exchange alone (%zu bytes) %10.2f µs (%.3f of bare)\n", "", out_msg.size() * 8,
                  t_exchange.median, t_exchange.median / base);
    if (bench::rank() == 0 && (on("bf16") || on("fp16")))
      std::printf("%10s   16-bit wire: bf16 %10.1f µs (%.3f of flat f32)   fp16 %10.1f µs (%.3f)\n", "",
                  t_bf16.median, t_flat.median > 0 ? t_bf16.median / t_flat.median : 0.0, t_fp16.median,
                  t_flat.median > 0 ? t_fp16.median / t_flat.median : 0.0);
    if (bench::rank() == 0 && (on("outer") || on("divergence")))
      std::printf("%10s   plain %10.1f µs   outer optimizer %10.1f µs (%+.1f%%)   divergence %10.1f µs (%+.1f%%)\n", "",
                  t_hma.median, t_outer.median, 100.0 * (t_outer.median / t_hma.median - 1), t_div.median,
                  100.0 * (t_div.median / t_hma.median - 1));
    if (bench::rank() == 0 && on("device-emulated"))
      std::printf("%10s   emulated device, staged: blocking %10.1f µs (%.3f)   start+wait %10.1f µs (%.3f)\n",
                  "", t_dev.median, t_dev.median / base, t_dev_nb.median, t_dev_nb.median / base);
    std::fflush(stdout);
  }
  if (bench::rank() == 0) {
    std::printf("# hma-nb ratio is to bare MPI_Iallreduce + MPI_Wait; busbw (GB/s) is hma's, "
                "nccl-tests convention\n");
    if (!csv.empty()) table.write_csv(csv);
    if (!json.empty()) table.write_json(json, meta);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bench::init(&argc, &argv);
  bench::Flags flags(argc, argv, kUsage);
  const bench::Meta meta = bench::collect_meta(argc, argv);
  const std::string dtype = flags.str("dtype", "f32");
  try {
    if (dtype == "f32") run<float>(flags, meta);
    else if (dtype == "f64") run<double>(flags, meta);
    else flags.fail("--dtype must be f32 or f64");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma-bench-average (rank %d): %s\n", bench::rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return 0;
}
