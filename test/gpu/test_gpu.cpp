// Device buffers on a real GPU (CUDA builds): the same averages as host buffers, bit for bit;
// scattered device arrays packed by one kernel; ordering on the caller's stream against slow
// kernels; errors. Without a usable device this binary prints why and exits 77 (SKIP, see
// test/main.cpp): it never counts as passed. The path comes from the environment, as for
// test_device (test/meson.build, tools/gpu-check).
#ifdef HMA_TEST_HAVE_CUDA
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <limits>
#include <string>
#include <vector>

#include "gpu_kernels.hpp"
#include "hma/hma.hpp"
#include "exact_values.hpp"
#include "mpi_test.hpp"

using hma_test::block_mean;
using hma_test::rank;
using hma_test::value;
using hma_test::size;

namespace {

void ok(cudaError_t rc) {
  if (rc != cudaSuccess) FAIL("CUDA: " << cudaGetErrorString(rc));
}


template <class T>
struct DeviceVec {  // a cudaMalloc'd user array
  T* p = nullptr;
  std::size_t n = 0;
  explicit DeviceVec(std::size_t count) : n(count) { ok(cudaMalloc(&p, n * sizeof(T) + 1)); }
  ~DeviceVec() { cudaFree(p); }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  std::vector<T> host() const {
    std::vector<T> h(n);
    ok(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <class T>
std::vector<T> to_host(const T* p, std::size_t n) {
  std::vector<T> h(n);
  ok(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <class T>
bool all_mean(const std::vector<T>& h, std::size_t first, int g, std::int64_t t) {
  for (std::size_t i = 0; i < h.size(); ++i)
    if (static_cast<double>(h[i]) != block_mean(rank(), g, t, first + i)) {
      UNSCOPED_INFO("element " << first + i << ": " << h[i] << ", want " << block_mean(rank(), g, t, first + i));
      return false;
    }
  return true;
}

}  // namespace

TEST_CASE("gpu: device averages equal host averages bit for bit", "[gpu]") {
  // Compare like with like: the host average issues the same MPI_Allreduce calls on the same
  // pieces as the device path (staged: staging-chunk pieces; direct: the whole buffer), so MPI
  // sums in the same order and even rounded values must agree to the bit.
  const std::string path = hma::PeriodicAverager(MPI_COMM_WORLD, 1).device_path();
  const bool direct = path.find("step()/average(): device pointers") != std::string::npos;
  hma::AveragerOptions o;
  o.reduction = hma::Reduction::mpi;
  o.device_ipc = false;  // the MPI paths here; the node transport has its own test below
  const char* chunk = std::getenv("HMA_STAGING_CHUNK_BYTES");
  o.chunk_bytes = direct ? 0
                  : chunk != nullptr ? std::stoul(chunk)
                                     : hma::AveragerOptions::kDefaultStagingChunkBytes;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  INFO(path);
  for (const std::size_t n : {std::size_t{1000}, std::size_t{1} << 20, (std::size_t{3} << 20) + 7}) {
    // Non-exact values this time (x / 3 rounds): the device and host recipes must still agree.
    std::vector<float> hf(n);
    std::vector<double> hd(n / 3 + 1);
    for (std::size_t i = 0; i < hf.size(); ++i) hf[i] = static_cast<float>(rank() + 1) * 0.1f + static_cast<float>(i % 1013) / 7.0f;
    for (std::size_t i = 0; i < hd.size(); ++i) hd[i] = (rank() + 1) * 0.3 + static_cast<double>(i % 997) / 3.0;
    hma::ParamSet host;
    host.add(hf);
    host.add(hd);
    DeviceVec<double> dd(hd.size());  // registered arrays outlive their set: declared first
    hma::DeviceParamSet dev;
    auto df = dev.allocate<float>(n);
    dev.add(dd.p, dd.n);
    ok(cudaMemcpy(df.data(), hf.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    ok(cudaMemcpy(dd.p, hd.data(), hd.size() * sizeof(double), cudaMemcpyHostToDevice));
    avg.average(host, 0);
    avg.average(dev, 0);
    dev.synchronize();
    const auto gf = to_host(df.data(), n);
    const auto gd = dd.host();
    const bool same = std::memcmp(gf.data(), hf.data(), n * sizeof(float)) == 0 &&
                      std::memcmp(gd.data(), hd.data(), hd.size() * sizeof(double)) == 0;
    INFO("n " << n);
    REQUIRE_ALL_RANKS(same);
  }
}

TEST_CASE("gpu: the node transport adds every rank's terms in rank order, the same bits everywhere", "[gpu]") {
  // CUDA IPC between the ranks (processes) of this node: each rank's average must equal
  // fl(x_0 / g) + fl(x_1 / g) + ... in rank order, in the dtype's arithmetic, bit for bit.
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  INFO(avg.device_path());
  const bool ipc = avg.device_path().find("level 0: the node transport") != std::string::npos;
  const char* env = std::getenv("HMA_DEVICE_IPC");
  REQUIRE_ALL_RANKS(ipc == (size() > 1 && !(env != nullptr && std::string(env) == "0")));
  if (!ipc) return;  // MPI sums in its own order: the test above compares the MPI paths
  const int g = size();
  auto xf = [](int r, int t, std::size_t i) { return static_cast<float>(r + 1) * 0.1f + static_cast<float>((i + t) % 1013) / 7.0f; };
  auto xd = [](int r, int t, std::size_t i) { return (r + 1) * 0.3 + static_cast<double>((i * 3 + t) % 997) / 3.0; };
  for (const std::size_t n : {std::size_t{1}, std::size_t{1001}, (std::size_t{1} << 22) + 3}) {
    DeviceVec<double> dd(n / 2 + 1);
    hma::DeviceParamSet dev;
    auto df = dev.allocate<float>(n);
    dev.add(dd.p, dd.n);
    for (int t = 0; t < 3; ++t) {  // both halves of the exported buffer, and back
      std::vector<float> hf(n);
      std::vector<double> hd(dd.n);
      for (std::size_t i = 0; i < n; ++i) hf[i] = xf(rank(), t, i);
      for (std::size_t i = 0; i < dd.n; ++i) hd[i] = xd(rank(), t, i);
      ok(cudaMemcpy(df.data(), hf.data(), n * sizeof(float), cudaMemcpyHostToDevice));
      ok(cudaMemcpy(dd.p, hd.data(), dd.n * sizeof(double), cudaMemcpyHostToDevice));
      if (t == 1) {
        auto r = avg.start(dev);
        r.wait();
      } else {
        avg.step(dev);
      }
      dev.synchronize();
      const auto gf = to_host(df.data(), n);
      const auto gd = dd.host();
      bool same = true;
      for (std::size_t i = 0; i < n && same; ++i) {
        float acc = xf(0, t, i) / static_cast<float>(g);
        for (int r = 1; r < g; ++r) acc += xf(r, t, i) / static_cast<float>(g);
        same = std::memcmp(&acc, &gf[i], sizeof acc) == 0;
        if (!same) UNSCOPED_INFO("f32 element " << i << ": " << gf[i] << ", want " << acc);
      }
      for (std::size_t i = 0; i < dd.n && same; ++i) {
        double acc = xd(0, t, i) / g;
        for (int r = 1; r < g; ++r) acc += xd(r, t, i) / g;
        same = std::memcmp(&acc, &gd[i], sizeof acc) == 0;
        if (!same) UNSCOPED_INFO("f64 element " << i << ": " << gd[i] << ", want " << acc);
      }
      INFO("n " << n << " t " << t);
      REQUIRE_ALL_RANKS(same);
    }
  }
}

TEST_CASE("gpu: weights, the outer optimizer and divergence give the host's results", "[gpu]") {
  // Weights alone: the CUDA pack kernel multiplies by w_i / sum(w) in double, as the host does.
  // Outer optimizer + divergence (+ weights): the staged path, scaled and updated on the host
  // chunks. Same MPI pieces as the host average (chunk = staging chunk), so the same bits.
  const std::string path = hma::PeriodicAverager(MPI_COMM_WORLD, 1).device_path();
  const bool direct = path.find("step()/average(): device pointers") != std::string::npos;
  const char* chunk = std::getenv("HMA_STAGING_CHUNK_BYTES");
  const std::size_t staging = chunk != nullptr ? std::stoul(chunk) : hma::AveragerOptions::kDefaultStagingChunkBytes;
  auto noise = [](int r, int t, std::size_t k) {  // full mantissas, both signs, several binades
    std::uint64_t z = (static_cast<std::uint64_t>(r) << 40) ^ (static_cast<std::uint64_t>(t) << 20) ^ k;
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    const double m = std::ldexp(0.5 + static_cast<double>(z >> 11) * 0x1p-53, static_cast<int>(z % 7) - 3);
    return (z & 1) ? -m : m;
  };
  for (bool post : {false, true}) {
    hma::AveragerOptions o;
    o.reduction = hma::Reduction::mpi;
    o.device_ipc = false;
    o.chunk_bytes = direct && !post ? 0 : staging;
    if (post) {
      o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
      o.divergence = true;
    }
    hma::PeriodicAverager host_avg(MPI_COMM_WORLD, 1, 0, o), dev_avg(MPI_COMM_WORLD, 1, 0, o);
    host_avg.set_weight(1 + rank() % 3);
    dev_avg.set_weight(1 + rank() % 3);
    const std::size_t nf = (std::size_t{1} << 20) + 5, nd = 70001;
    std::vector<float> hf(nf);
    std::vector<double> hd(nd);
    hma::ParamSet host;
    host.add(hf);
    host.add(hd);
    DeviceVec<double> dd(nd);
    hma::DeviceParamSet dev;
    auto df = dev.allocate<float>(nf);
    dev.add(dd.p, nd);
    for (int t = 0; t < 4; ++t) {
      for (std::size_t k = 0; k < nf; ++k) hf[k] = static_cast<float>(noise(rank(), t, k));
      for (std::size_t k = 0; k < nd; ++k) hd[k] = noise(rank(), t, nf + k);
      ok(cudaMemcpy(df.data(), hf.data(), nf * sizeof(float), cudaMemcpyHostToDevice));
      ok(cudaMemcpy(dd.p, hd.data(), nd * sizeof(double), cudaMemcpyHostToDevice));
      if (t % 2 == 0) {
        (void)host_avg.step(host);
        (void)dev_avg.step(dev);
      } else {
        auto r1 = host_avg.start(host);
        r1.wait();
        auto r2 = dev_avg.start(dev);
        r2.wait();
      }
      dev.synchronize();
      const auto gf = to_host(df.data(), nf);
      const auto gd = dd.host();
      const bool same = std::memcmp(gf.data(), hf.data(), nf * sizeof(float)) == 0 &&
                        std::memcmp(gd.data(), hd.data(), nd * sizeof(double)) == 0;
      INFO("post " << post << " step " << t << ": " << dev_avg.device_path());
      REQUIRE_ALL_RANKS(same);
      if (post) {
        const auto a = host_avg.last_divergence(), b = dev_avg.last_divergence();
        REQUIRE_ALL_RANKS(a && b && a->step == t && b->step == t);
        INFO("divergence host " << a->value << " device " << b->value);
        REQUIRE_ALL_RANKS(std::fabs(a->value - b->value) <= 1e-12 * a->value);
        if (size() > 1) REQUIRE_ALL_RANKS(a->value > 0.1);
      }
    }
  }
}

TEST_CASE("gpu: scattered device arrays and every call form", "[gpu]") {
  std::vector<hma::Level> levels;
  if (size() >= 4 && size() % 2 == 0) levels.push_back({1, 2});
  levels.push_back({levels.empty() ? 1 : 3, size()});
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, levels);
  std::vector<std::unique_ptr<DeviceVec<float>>> uf;  // outlive the set: declared first
  std::vector<std::unique_ptr<DeviceVec<double>>> ud;
  hma::DeviceParamSet ps;
  auto zf = ps.allocate<float>(4097);
  for (std::size_t n : {1u, 31u, 1000u, 65536u, 3u}) {
    uf.push_back(std::make_unique<DeviceVec<float>>(n));
    ps.add(uf.back()->p, n);
  }
  auto zd = ps.allocate<double>(77);
  for (std::size_t n : {5u, 100000u}) {
    ud.push_back(std::make_unique<DeviceVec<double>>(n));
    ps.add(ud.back()->p, n);
  }
  cudaStream_t s = nullptr;
  ok(cudaStreamCreate(&s));
  for (std::int64_t t = 0; t < 7; ++t) {
    // Global element index: zf, then uf..., zd, ud... (fill order = check order).
    std::size_t k = 0;
    hma_gpu::fill_values(zf.data(), zf.size(), k, rank(), t, s);
    k += zf.size();
    for (auto& u : uf) {
      hma_gpu::fill_values(u->p, u->n, k, rank(), t, s);
      k += u->n;
    }
    hma_gpu::fill_values(zd.data(), zd.size(), k, rank(), t, s);
    k += zd.size();
    for (auto& u : ud) {
      hma_gpu::fill_values(u->p, u->n, k, rank(), t, s);
      k += u->n;
    }
    const int form = static_cast<int>(t % 3);
    if (form == 0) {
      avg.step(ps, s);
    } else {
      auto r = avg.start(ps, s);
      if (form == 1) r.wait();
      else
        while (!r.test()) {
        }
    }
    ok(cudaStreamSynchronize(s));  // the caller's stream is ordered after the average
    const auto lvl = avg.schedule().level_at(t);
    const int g = lvl ? avg.schedule().levels()[*lvl].group_size : 1;
    bool good = true;
    k = 0;
    good &= all_mean(to_host(zf.data(), zf.size()), k, g, t);
    k += zf.size();
    for (auto& u : uf) {
      good &= all_mean(u->host(), k, g, t);
      k += u->n;
    }
    good &= all_mean(to_host(zd.data(), zd.size()), k, g, t);
    k += zd.size();
    for (auto& u : ud) {
      good &= all_mean(u->host(), k, g, t);
      k += u->n;
    }
    INFO("step " << t << ", form " << form << ", group " << g);
    REQUIRE_ALL_RANKS(good);
  }
  ok(cudaStreamDestroy(s));
}

TEST_CASE("gpu: ordered after a slow producer kernel and before the consumer", "[gpu]") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  const std::size_t n = std::size_t{1} << 22;  // 16 MiB of floats: several staged chunks
  hma::DeviceParamSet ps;
  auto w = ps.allocate<float>(n);
  DeviceVec<float> out(n);
  cudaStream_t s = nullptr;
  ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int form = 0; form < 2; ++form) {
    hma_gpu::fill_values(w.data(), n, 0, rank(), 1, s);
    ok(cudaStreamSynchronize(s));
    // The producer spins 50 ms before writing the step-9 values; nothing waits for it on the host.
    hma_gpu::fill_values(w.data(), n, 0, rank(), 9, s, 50000);
    if (form == 0) {
      avg.step(ps, s);
    } else {
      auto r = avg.start(ps, s);
      r.wait();
    }
    hma_gpu::copy(out.p, w.data(), n, s);  // the consumer, queued without a host sync
    ok(cudaStreamSynchronize(s));
    INFO("form " << form << ": " << avg.device_path());
    REQUIRE_ALL_RANKS(all_mean(out.host(), 0, size(), 9));
  }
  ok(cudaStreamDestroy(s));
}

TEST_CASE("gpu: bad input", "[gpu][errors]") {
  hma::DeviceParamSet ps;
  std::vector<float> host(16);
  REQUIRE_THROWS_WITH(ps.add(host.data(), host.size()), Catch::Contains("host memory"));
  REQUIRE_THAT(ps.describe(), Catch::Contains("(CUDA)"));
}

TEST_CASE("gpu: non-finite values name the rank", "[gpu][errors][np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  DeviceVec<double> d(1000);
  hma::DeviceParamSet ps;
  hma::AveragerOptions o;
  o.nonfinite = hma::NonFinite::error;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  ok(cudaMemset(d.p, 0, 1000 * sizeof(double)));
  if (rank() == 1) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    ok(cudaMemcpy(d.p + 500, &nan, sizeof nan, cudaMemcpyHostToDevice));
  }
  ps.add(d.p, d.n);
  REQUIRE_THROWS_ALL_RANKS(hma::NonFiniteError, avg.step(ps), "world rank(s) 1");
}
#endif  // HMA_TEST_HAVE_CUDA
