// hma-bench-device: device-buffer averages next to host-buffer averages of the same bytes, and
// next to their floors measured in the same run: bare MPI_Allreduce on host memory, the
// device<->pinned-host copies that the staged path cannot avoid, and one device-to-device copy of
// the buffer (the floor of the node transport, which reads every rank's terms on the device).
// Columns: dev-mpi is the MPI path (staged or direct, HMA_DEVICE_PATH) with the node transport
// off; dev-ipc and ipc-nb the node transport (blocking; start + wait), where every group lies in
// one node. Also checks, per size, that the MPI path's result equals the host result bit for bit,
// and that the node transport's equals, on every rank, the terms x_r / np added in rank order. CUDA builds only; without a usable GPU it
// says why and exits 77.
//   mpirun -np 2 build/bench/hma-bench-device --sizes 1M,16M,256M --csv dev.csv --json dev.json
#include <cuda_runtime.h>

#include <cstring>
#include <memory>

#include "bench_util.hpp"
#include "control/model.hpp"
#include "hma/hma.hpp"

namespace {

const char* kUsage =
    "usage: hma-bench-device [options]\n"
    "  (HMA_DEVICE_IPC=0 leaves out the node transport's columns)\n"
    "  --sizes LIST      comma list of byte sizes (default 1M,16M,256M; K/M/G suffixes)\n"
    "  --iters N         timed iterations per measurement (default 20)\n"
    "  --warmup N        untimed iterations (default 2)\n"
    "  --max-seconds S   stop a measurement after S s of timed work, >= 3 iterations (default 1)\n"
    "  --post WHAT       none (default), outer (Nesterov, lr 0.7, momentum 0.9), divergence or both:\n"
    "                    every average (host and device) with that work; the exact column then\n"
    "                    compares the first average of each size (it only anchors the outer state)\n"
    "  --calibrate FILE  instead of the table: time staged and direct (device pointers to a\n"
    "                    CUDA-aware MPI) per size, node transport off, and write the device\n"
    "                    calibration (device_direct_from_bytes) for HMA_MODEL to FILE\n"
    "  --csv FILE        write the results as CSV\n"
    "  --json FILE       write the results and the run's metadata as JSON\n";

void cu(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(rc));
}

// --calibrate: staged against direct at each size on this MPI, and the size from which auto
// should hand device pointers to MPI (control/device_path.cpp reads it from HMA_MODEL).
int calibrate(const std::vector<long long>& sizes, int warm, int iters, double max_s, const std::string& out,
              const bench::Meta& meta) {
  hma::AveragerOptions staged, direct;
  staged.device_ipc = direct.device_ipc = false;
  staged.device_path = hma::DevicePath::staged;
  direct.device_path = hma::DevicePath::direct;  // refused, with the reason, where MPI is not CUDA-aware
  hma::PeriodicAverager avg_staged(MPI_COMM_WORLD, 1, 0, staged);
  std::unique_ptr<hma::PeriodicAverager> avg_direct;
  try {
    avg_direct = std::make_unique<hma::PeriodicAverager>(MPI_COMM_WORLD, 1, 0, direct);
  } catch (const hma::InvalidArgument& e) {
    if (bench::rank() == 0)
      std::printf("hma-bench-device --calibrate: no direct path to measure (%s); auto stays staged, "
                  "nothing written\n", e.what());
    return 1;
  }
  const MPI_Comm comm = avg_staged.hierarchy().level(0).get();
  cudaStream_t stream = nullptr;
  cu(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  std::vector<double> bytes, t_staged, t_direct;
  if (bench::rank() == 0) std::printf("%10s %10s %10s\n", "bytes", "staged", "direct");
  for (const long long b : sizes) {
    const std::size_t n = static_cast<std::size_t>(b) / sizeof(float);
    hma::DeviceParamSet dps;
    auto dw = dps.allocate<float>(n);
    cu(cudaMemset(dw.data(), 0, n * sizeof(float)), "cudaMemset");
    auto time = [&](hma::PeriodicAverager& a) {
      return bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
               a.average(dps, 0, stream);
               dps.synchronize();
             })).median;
    };
    bytes.push_back(static_cast<double>(n * sizeof(float)));
    t_staged.push_back(time(avg_staged));
    t_direct.push_back(time(*avg_direct));
    if (bench::rank() == 0)
      std::printf("%10s %10.1f %10.1f\n", bench::human_bytes(bytes.back()).c_str(), t_staged.back(), t_direct.back());
  }
  cudaStreamDestroy(stream);
  const double from = hma::detail::device_direct_from(bytes, t_staged, t_direct);
  if (bench::rank() == 0) {
    std::FILE* f = std::fopen(out.c_str(), "w");
    if (f == nullptr) throw std::runtime_error("cannot write " + out);
    std::fprintf(f, "# hma-bench-device --calibrate: np %d, %s, %s\n# median us of one average, node transport off:\n",
                 bench::size(), meta.mpi.c_str(), meta.date.c_str());
    for (std::size_t i = 0; i < bytes.size(); ++i)
      std::fprintf(f, "#   %.0f bytes: staged %.1f, direct %.1f\n", bytes[i], t_staged[i], t_direct[i]);
    if (from > 0) std::fprintf(f, "device_direct_from_bytes = %.0f\n", from);
    else std::fprintf(f, "# direct never beat staged from some size on: auto stays staged\n");
    std::fclose(f);
    std::printf("# %s: %s\n", out.c_str(), from > 0 ? ("direct from " + bench::human_bytes(from)).c_str()
                                                     : "direct never wins: staged");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bench::init(&argc, &argv);
  bench::Flags flags(argc, argv, kUsage);
  const bench::Meta meta = bench::collect_meta(argc, argv);
  const std::vector<long long> sizes = flags.sizes("sizes", "1M,16M,256M", 4);
  const int iters = static_cast<int>(flags.integer("iters", 20)), warm = static_cast<int>(flags.integer("warmup", 2));
  const double max_s = flags.real("max-seconds", 1.0);
  const std::string csv = flags.str("csv", ""), json = flags.str("json", "");
  const std::string post = flags.str("post", "none");
  const std::string calibration = flags.str("calibrate", "");
  if (post != "none" && post != "outer" && post != "divergence" && post != "both")
    flags.fail("--post must be none, outer, divergence or both, got '" + post + "'");
  flags.done();
  const hma::DeviceInfo info = hma::device_info();
  int ok = info.available() ? 1 : 0, all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all) {
    if (bench::rank() == 0 || !ok)
      std::printf("hma-bench-device (rank %d): no GPU: %s\n", bench::rank(),
                  ok ? "another rank has none" : info.reason.c_str());
    MPI_Finalize();
    return 77;
  }
  try {
    // One GPU per rank: node-local rank modulo the devices this rank sees.
    const int device = hma::use_local_device(MPI_COMM_WORLD);
    if (bench::rank() == 0) std::printf("# rank 0 uses device %d (node-local rank modulo devices)\n", device);
    if (!calibration.empty()) {
      const int rc = calibrate(sizes, warm, iters, max_s, calibration, meta);
      MPI_Finalize();
      return rc;
    }
    const int world = bench::size();
    const std::string path = hma::PeriodicAverager(MPI_COMM_WORLD, 1).device_path();
    const bool direct = path.find("step()/average(): device pointers") != std::string::npos;
    // The host reference issues the same MPI calls on the same pieces (see test_gpu.cpp).
    hma::AveragerOptions ref;
    ref.reduction = hma::Reduction::mpi;
    const char* chunk = std::getenv("HMA_STAGING_CHUNK_BYTES");
    ref.chunk_bytes = direct ? 0 : chunk != nullptr ? std::stoul(chunk) : hma::AveragerOptions::kDefaultStagingChunkBytes;
    // The outer optimizer keeps state for one set per averager: one averager per set and size.
    auto with_post = [&](hma::AveragerOptions o) {
      if (post == "outer" || post == "both") o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
      if (post == "divergence" || post == "both") o.divergence = true;
      return o;
    };
    int dev = 0;
    cu(cudaGetDevice(&dev), "cudaGetDevice");
    cudaDeviceProp prop{};
    cu(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    bench::warn_oversubscribed();
    if (bench::rank() == 0) {
      std::printf("# hma-bench-device: np %d on %s, f32, %s, build %s, %s\n# %s\n", world, prop.name,
                  meta.mpi.c_str(), meta.build.c_str(), meta.date.c_str(), path.c_str());
      std::printf("# median µs of one average (slowest rank); device times include the device work "
                  "(params.synchronize()); ratio = device / host\n");
      if (post != "none") std::printf("# every average with: %s\n", post.c_str());
      std::printf("%10s %6s %10s %10s %7s %10s %7s %5s %10s %10s %10s %10s %10s\n", "bytes", "exact",
                  "host-hma", "dev-mpi", "ratio", "dev-nb", "ratio", "same", "dev-ipc", "ipc-nb",
                  "bare-host", "d2h+h2d", "d2d");
    }
    bench::Table table({"bytes", "np", "variant", "median_us", "p10_us", "p90_us", "min_us", "max_us",
                        "iters", "algbw_GBps", "ratio_to_host", "bit_exact"});
    cudaStream_t stream = nullptr;
    cu(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    for (const long long b : sizes) {
      const std::size_t n = static_cast<std::size_t>(b) / sizeof(float);
      hma::PeriodicAverager avg_ref(MPI_COMM_WORLD, 1, 0, with_post(ref));
      hma::AveragerOptions mpi_path;
      mpi_path.device_ipc = false;
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, with_post(mpi_path));  // device set, through MPI
      hma::PeriodicAverager avg_ipc(MPI_COMM_WORLD, 1, 0, with_post({}));  // hma's defaults
      hma::PeriodicAverager avg_host(MPI_COMM_WORLD, 1, 0, with_post({}));  // ... and host set
      const MPI_Comm comm = avg.hierarchy().level(0).get();
      const double bytes = static_cast<double>(n * sizeof(float));
      auto init_of = [](int r, std::size_t i) {
        return static_cast<float>(r + 1) * 0.1f + static_cast<float>(i % 1013) / 7.0f;
      };
      std::vector<float> init(n);
      for (std::size_t i = 0; i < n; ++i) init[i] = init_of(bench::rank(), i);
      hma::ParamSet host;
      auto hw = host.allocate<float>(n);
      std::memcpy(hw.data(), init.data(), n * sizeof(float));
      hma::DeviceParamSet dps;
      auto dw = dps.allocate<float>(n);
      cu(cudaMemcpy(dw.data(), init.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
      // Bit-exactness first, on fresh data: one average each, then compare.
      avg_ref.average(host, 0);
      avg.average(dps, 0);
      dps.synchronize();
      std::vector<float> back(n);
      cu(cudaMemcpy(back.data(), dw.data(), n * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
      int same = std::memcmp(back.data(), hw.data(), n * sizeof(float)) == 0 ? 1 : 0, all_same = 0;
      MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
      // The node transport on fresh data: x_r / np (IEEE division, as the pack kernel) added in
      // rank order, the same bits on every rank.
      const bool ipc_on = avg_ipc.device_path().find("level 0: the node transport") != std::string::npos;
      int ipc_same = 1, all_ipc_same = 0;
      if (ipc_on) {
        cu(cudaMemcpy(dw.data(), init.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
        avg_ipc.average(dps, 0);
        dps.synchronize();
        cu(cudaMemcpy(back.data(), dw.data(), n * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
        const float g = static_cast<float>(world);
        for (std::size_t i = 0; i < n && ipc_same; ++i) {
          float acc = init_of(0, i) / g;
          for (int r = 1; r < world; ++r) acc += init_of(r, i) / g;
          ipc_same = std::memcmp(&acc, &back[i], sizeof acc) == 0 ? 1 : 0;
        }
      }
      MPI_Allreduce(&ipc_same, &all_ipc_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
      // Timings.
      float* pinned = nullptr;
      cu(cudaMallocHost(&pinned, n * sizeof(float)), "cudaMallocHost");
      std::vector<float> bare(init);
      const int cnt = static_cast<int>(n);
      auto t_host = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] { avg_host.average(host, 0); }));
      auto t_dev = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
        avg.average(dps, 0, stream);
        dps.synchronize();
      }));
      auto t_nb = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
        auto r = avg.start_average(dps, 0, stream);
        r.wait();
        dps.synchronize();
      }));
      bench::Stats t_ipc{}, t_ipc_nb{};
      if (ipc_on) {
        t_ipc = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
          avg_ipc.average(dps, 0, stream);
          dps.synchronize();
        }));
        t_ipc_nb = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
          auto r = avg_ipc.start_average(dps, 0, stream);
          r.wait();
          dps.synchronize();
        }));
      }
      float* other = nullptr;
      cu(cudaMalloc(&other, n * sizeof(float)), "cudaMalloc");
      auto t_d2d = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
        cu(cudaMemcpyAsync(other, dw.data(), n * sizeof(float), cudaMemcpyDeviceToDevice, stream), "copy");
        cu(cudaStreamSynchronize(stream), "sync");
      }));
      cudaFree(other);
      auto t_bare = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
        MPI_Allreduce(MPI_IN_PLACE, bare.data(), cnt, MPI_FLOAT, MPI_SUM, comm);
      }));
      auto t_copy = bench::stats(bench::time_op(comm, warm, iters, max_s, [&] {
        cu(cudaMemcpyAsync(pinned, dw.data(), n * sizeof(float), cudaMemcpyDeviceToHost, stream), "copy");
        cu(cudaMemcpyAsync(dw.data(), pinned, n * sizeof(float), cudaMemcpyHostToDevice, stream), "copy");
        cu(cudaStreamSynchronize(stream), "sync");
      }));
      cudaFreeHost(pinned);
      const double h = t_host.median;
      auto add = [&](const char* v, const bench::Stats& s, int exact = -1) {
        table.add({bench::fmt(bytes, 0), std::to_string(world), v, bench::fmt(s.median, 3),
                   bench::fmt(s.p10, 3), bench::fmt(s.p90, 3), bench::fmt(s.min, 3), bench::fmt(s.max, 3),
                   std::to_string(s.n), bench::fmt(bench::algbw(bytes, s.median), 4),
                   bench::fmt(s.median / h, 4), (exact < 0 ? all_same : exact) ? "1" : "0"});
      };
      add("host_hma", t_host);
      add("device_hma", t_dev);
      add("device_hma_start_wait", t_nb);
      if (ipc_on) {
        add("device_ipc", t_ipc, all_ipc_same);
        add("device_ipc_start_wait", t_ipc_nb, all_ipc_same);
      }
      add("bare_allreduce_host", t_bare);
      add("d2h_h2d_copy", t_copy);
      add("d2d_copy", t_d2d);
      if (bench::rank() == 0)
        std::printf("%10s %6s %10.1f %10.1f %7.3f %10.1f %7.3f %5s %10.1f %10.1f %10.1f %10.1f %10.1f\n",
                    bench::human_bytes(bytes).c_str(), all_same ? "yes" : "NO", h, t_dev.median,
                    t_dev.median / h, t_nb.median, t_nb.median / h,
                    !ipc_on ? "-" : all_ipc_same ? "yes" : "NO", t_ipc.median, t_ipc_nb.median,
                    t_bare.median, t_copy.median, t_d2d.median);
      std::fflush(stdout);
    }
    cudaStreamDestroy(stream);
    if (bench::rank() == 0) {
      std::printf("# exact: the MPI path's device average equals the host average of the same data bit "
                  "for bit (all ranks); same: the node transport's equals x_r/np added in rank order "
                  "(all ranks)\n");
      if (!csv.empty()) table.write_csv(csv);
      if (!json.empty()) table.write_json(json, meta);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma-bench-device (rank %d): %s\n", bench::rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return 0;
}
