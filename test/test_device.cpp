// Device buffers without a GPU: every device path (direct blocking, MPI_Iallreduce, progress
// thread, staged pipeline polled / blocking / threaded) runs on the host emulation backend,
// whose streams run their work late, so reading a buffer before its event completed shows up
// as a wrong value. Plus the staged chunk arithmetic, the path choice, the options and errors.
// The path under test comes from the environment (test/meson.build runs this binary with
// HMA_CUDA_AWARE, HMA_DEVICE_PATH, HMA_PROGRESS and HMA_STAGING_* variants).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "device/device_backend.hpp"
#include "control/device_path.hpp"
#include "device/emulation.hpp"
#include "device/segments.hpp"
#include "hma/hma.hpp"
#include "exact_values.hpp"
#include "mpi_test.hpp"
#include "transport/staged.hpp"
#include "transport/uses.hpp"

using hma_test::block_mean;
using hma_test::rank;
using hma_test::value;
using hma_test::size;
namespace hd = hma::detail;

namespace {

// Every test here uses the emulation backend for new DeviceParamSets.
struct Emulated {
  Emulated() { hd::set_device_backend_for_testing(hd::host_emulation_backend()); }
  ~Emulated() { hd::set_device_backend_for_testing(nullptr); }
};


// Zero-copy and registered arrays of both dtypes. "Device" memory is host memory here.
struct DeviceModel {
  std::vector<float> uf1, uf2;  // registered arrays outlive the set (declared first)
  std::vector<double> ud;
  hma::DeviceParamSet ps;
  hma::DeviceArray<float> wf;
  hma::DeviceArray<double> wd;
  explicit DeviceModel(std::size_t big = 0) {
    wf = ps.allocate<float>(37 + big);
    uf1.resize(3);
    ps.add(uf1.data(), uf1.size());
    wd = ps.allocate<double>(5);
    uf2.resize(64 + big / 2);
    ps.add(uf2.data(), uf2.size());
    ud.resize(11);
    ps.add(ud.data(), ud.size());
  }
  template <class F>
  void each(F&& f) {  // f(pointer to element as double-convertible, global index)
    std::size_t k = 0;
    for (std::size_t i = 0; i < wf.size(); ++i) f(wf.data()[i], k++);
    for (auto& x : uf1) f(x, k++);
    for (std::size_t i = 0; i < wd.size(); ++i) f(wd.data()[i], k++);
    for (auto& x : uf2) f(x, k++);
    for (auto& x : ud) f(x, k++);
  }
  void fill(int r, std::int64_t t) {
    each([&](auto& x, std::size_t k) { x = static_cast<std::remove_reference_t<decltype(x)>>(value(r, t, k)); });
  }
  // True when every element holds the average of its group of g at step t.
  bool averaged(int r, int g, std::int64_t t) {
    bool ok = true;
    each([&](auto& x, std::size_t k) {
      const double want = block_mean(r, g, t, k);
      if (static_cast<double>(x) != want) {
        if (ok) UNSCOPED_INFO("element " << k << ": " << static_cast<double>(x) << ", want " << want);
        ok = false;
      }
    });
    return ok;
  }
};

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

// The path this run's environment should select (see choose_device_plan).
std::string expected_path_text() {
  const bool aware = env("HMA_CUDA_AWARE") == "1";
  const bool thread = env("HMA_PROGRESS") == "thread";
  const std::string forced = env("HMA_DEVICE_PATH");
  // auto hands device pointers only to an MPI that reduces on the device, or from a calibrated
  // size (HMA_MODEL): neither here.
  if (!aware || forced != "direct")
    return thread ? "staged through pinned host memory, MPI_Allreduce per chunk on the progress thread"
                  : "staged through pinned host memory, MPI_Iallreduce per chunk";
  if (thread) return "device pointers to MPI_Allreduce on the progress thread";
  return "device pointers to MPI_Iallreduce";
}

}  // namespace

TEST_CASE("staged pipeline: chunk arithmetic", "[device][unit]") {
  using J = hd::StagedJob;
  const std::vector<J> jobs = {J{nullptr, 10, hma::Dtype::f32}, J{nullptr, 0, hma::Dtype::f64},
                               J{nullptr, 3, hma::Dtype::f64}};
  auto c = hd::staged_chunks(jobs, 16);  // 4 floats or 2 doubles per chunk
  REQUIRE(c.size() == 5);
  REQUIRE((c[0].job == 0 && c[0].lo == 0 && c[0].n == 4));
  REQUIRE((c[2].job == 0 && c[2].lo == 8 && c[2].n == 2));
  REQUIRE((c[3].job == 2 && c[3].lo == 0 && c[3].n == 2));
  REQUIRE((c[4].job == 2 && c[4].lo == 2 && c[4].n == 1));
  REQUIRE(hd::staged_slot_bytes(jobs, 16) == 16);
  REQUIRE(hd::staged_chunks(jobs, 0).size() == 2);  // one chunk per non-empty job
  REQUIRE(hd::staged_slot_bytes(jobs, 0) == 40);
  REQUIRE(hd::staged_chunks(jobs, 1).size() == 13);  // never below one element
  REQUIRE(hd::staged_slot_bytes(jobs, 1) == 8);
  REQUIRE(hd::staged_chunks({}, 4096).empty());
  // Any size: the chunks tile each job in order, none larger than the chunk (or one element).
  for (std::size_t n : {1u, 7u, 1000u, 4097u})
    for (std::size_t cb : {4u, 12u, 4096u, 1u << 20}) {
      const std::vector<J> one = {J{nullptr, n, hma::Dtype::f32}};
      std::size_t next = 0;
      for (const auto& k : hd::staged_chunks(one, cb)) {
        REQUIRE(k.lo == next);
        REQUIRE(k.n * 4 <= std::max<std::size_t>(cb, 4));
        next += k.n;
      }
      REQUIRE(next == n);
    }
}

TEST_CASE("kernel indexing: element to segment", "[device][unit]") {
  // The lookup the pack/unpack kernels use (also run by the emulation), against a linear scan.
  std::uint64_t seed = 12345;
  auto rnd = [&](std::uint64_t n) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (seed >> 33) % n;
  };
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<hd::Segment> segs;
    std::size_t at = 0;
    const bool owned = rnd(2) == 0;
    const std::size_t nsegs = 1 + rnd(40);
    static float dummy;
    for (std::size_t k = 0; k < nsegs; ++k) {
      const std::size_t n = 1 + rnd(k % 5 == 0 ? 1000 : 7);
      segs.push_back({owned && k == 0 ? nullptr : &dummy, at, n});
      at += n;
    }
    const int ns = static_cast<int>(segs.size());
    REQUIRE(hd::unpack_start(segs.data(), ns) == (owned ? segs[0].n : 0));
    for (std::uint64_t e = 0; e < at; ++e) {
      int want = 0;
      while (static_cast<std::size_t>(want + 1) < segs.size() && segs[static_cast<std::size_t>(want) + 1].at <= e) ++want;
      if (hd::find_segment(segs.data(), ns, e) != want) FAIL("trial " << trial << ", element " << e);
    }
  }
  REQUIRE(hd::unpack_start(static_cast<const hd::Segment*>(nullptr), 0) == 0);
}

TEST_CASE("staged pipeline: reduces every chunk on host memory in order and overlapped", "[device]") {
  hd::DeviceBackend& be = *hd::host_emulation_backend();
  for (const bool blocking_mpi : {true, false})
    for (const std::size_t slots : {1u, 2u, 3u})
      for (const std::size_t n : {1u, 5u, 1000u}) {
        const std::size_t chunk_bytes = 64;  // 16 floats, 8 doubles
        std::vector<float> f(n);
        std::vector<double> d(n / 2 + 1);
        for (std::size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(value(rank(), 1, i));
        for (std::size_t i = 0; i < d.size(); ++i) d[i] = value(rank(), 2, i);
        std::vector<hd::StagedJob> jobs = {{f.data(), f.size(), hma::Dtype::f32},
                                           {d.data(), d.size(), hma::Dtype::f64}};
        hd::StagingArea area;
        area.ensure(&be, slots, hd::staged_slot_bytes(jobs, chunk_bytes));
        std::memset(area.host, 0x7f, area.slots * 2 * area.slot_bytes);  // garbage, not zeros
        hma::Stream a = be.create_stream(), b = be.create_stream();
        std::size_t polls = 0;
        {
          hd::StagedPipeline p(be, area, jobs, chunk_bytes, MPI_COMM_WORLD, a, b, blocking_mpi);
          const std::size_t want_chunks = (f.size() + 15) / 16 + (d.size() + 7) / 8;
          REQUIRE(p.chunks() == want_chunks);
          if (blocking_mpi) {
            REQUIRE(p.drive(true));
          } else {
            while (!p.drive(false)) ++polls;
          }
          // Several chunks were between their copy out and their copy back at once.
          REQUIRE(p.max_in_flight() == std::min(slots, want_chunks));
        }
        be.destroy_stream(a);
        be.destroy_stream(b);
        bool ok = true;
        for (std::size_t i = 0; i < f.size(); ++i) ok &= f[i] == static_cast<float>(block_mean(0, size(), 1, i) * size());
        for (std::size_t i = 0; i < d.size(); ++i) ok &= d[i] == block_mean(0, size(), 2, i) * size();
        INFO("blocking_mpi " << blocking_mpi << ", slots " << slots << ", n " << n << ", polls " << polls);
        REQUIRE_ALL_RANKS(ok);
      }
}

TEST_CASE("device path choice", "[device][unit]") {
  hd::DevicePathInputs in;
  in.library = "Open MPI v4.1.4, package: Debian OpenMPI";
  in.mpix_query = 0;
  auto p = hd::choose_device_plan(in);
  REQUIRE(!p.cuda_aware);
  REQUIRE(p.direct_from == SIZE_MAX);
  REQUIRE(p.nonblocking == hd::DeviceNonblocking::staged_poll);
  REQUIRE_THAT(p.why, Catch::Contains("MPIX_Query_cuda_support() = 0"));
  in.thread_progress = true;
  REQUIRE(hd::choose_device_plan(in).nonblocking == hd::DeviceNonblocking::staged_thread);
  // A CUDA-aware Open MPI reduces device buffers on the host (coll/cuda, pageable copies;
  // measured 4-5x slower than staged on an H200): auto stages every call form.
  in.thread_progress = false;
  in.mpix_query = 1;
  p = hd::choose_device_plan(in);
  REQUIRE(p.cuda_aware);
  REQUIRE(p.direct_from == SIZE_MAX);
  REQUIRE(!p.direct_at(std::size_t{1} << 40));
  REQUIRE(p.nonblocking == hd::DeviceNonblocking::staged_poll);
  REQUIRE_THAT(p.why, Catch::Contains("Open MPI reduces device buffers on the host") &&
                          Catch::Contains("step()/average(): staged"));
  in.thread_progress = true;
  REQUIRE(hd::choose_device_plan(in).nonblocking == hd::DeviceNonblocking::staged_thread);
  // A calibration that measured direct faster from 1 MiB: device pointers from there on
  // (blocking calls; start() on the progress thread), staged below; start() polled stays staged
  // (no device buffers in non-blocking collectives, ompi#9845).
  in.calibrated_direct_from = 1 << 20;
  p = hd::choose_device_plan(in);
  REQUIRE(p.direct_from == std::size_t{1} << 20);
  REQUIRE((p.direct_at(1 << 20) && !p.direct_at((1 << 20) - 1)));
  REQUIRE(p.nonblocking == hd::DeviceNonblocking::thread_direct);
  REQUIRE_THAT(p.why, Catch::Contains("from 1 MiB, staged below") && Catch::Contains("calibration"));
  in.thread_progress = false;
  p = hd::choose_device_plan(in);
  REQUIRE(p.direct_from == std::size_t{1} << 20);
  REQUIRE(p.nonblocking == hd::DeviceNonblocking::staged_poll);
  REQUIRE_THAT(p.why, Catch::Contains("ompi#9845"));
  // The calibration counts only where the MPI is CUDA-aware.
  in.mpix_query = 0;
  REQUIRE(hd::choose_device_plan(in).direct_from == SIZE_MAX);
  in.mpix_query = 1;
  in.calibrated_direct_from = 0;
  // MVAPICH2(-GDR) reduces on the device and takes device buffers in MPI_Iallreduce; it has no
  // MPIX query, its MV2_USE_CUDA=1 says it is CUDA-aware.
  in.library = "MVAPICH2 Version      :\t2.3.7";
  p = hd::choose_device_plan(in);
  REQUIRE((p.direct_from == 0 && p.nonblocking == hd::DeviceNonblocking::iallreduce));
  {
    hd::DevicePathInputs mv;
    mv.library = in.library;
    REQUIRE(!hd::choose_device_plan(mv).cuda_aware);
    mv.mv2_use_cuda = true;
    p = hd::choose_device_plan(mv);
    REQUIRE((p.cuda_aware && p.direct_from == 0 && p.nonblocking == hd::DeviceNonblocking::iallreduce));
    REQUIRE_THAT(p.why, Catch::Contains("MV2_USE_CUDA=1"));
  }
  // Overrides: HMA_CUDA_AWARE beats the query; staged beats awareness; direct is an opt-in.
  in.library = "Open MPI v5.0.3";
  in.cuda_aware_override = 0;
  p = hd::choose_device_plan(in);
  REQUIRE(!p.cuda_aware);
  REQUIRE_THAT(p.why, Catch::Contains("HMA_CUDA_AWARE=0"));
  in.cuda_aware_override = 1;
  in.requested = hma::DevicePath::staged;
  p = hd::choose_device_plan(in);
  REQUIRE((p.direct_from == SIZE_MAX && p.nonblocking == hd::DeviceNonblocking::staged_poll));
  in.requested = hma::DevicePath::direct;
  p = hd::choose_device_plan(in);
  REQUIRE((p.direct_from == 0 && p.nonblocking == hd::DeviceNonblocking::iallreduce));
  in.thread_progress = true;
  REQUIRE(hd::choose_device_plan(in).nonblocking == hd::DeviceNonblocking::thread_direct);
  in.thread_progress = false;
  // No query at all (an MPI without the extension): assumed not CUDA-aware.
  in.cuda_aware_override = -1;
  in.mpix_query = -1;
  in.requested = hma::DevicePath::automatic;
  p = hd::choose_device_plan(in);
  REQUIRE(!p.cuda_aware);
  REQUIRE_THAT(p.why, Catch::Contains("HMA_CUDA_AWARE=1 if it is"));
  in.requested = hma::DevicePath::direct;
  REQUIRE_THROWS_AS(hd::choose_device_plan(in), hma::InvalidArgument);
  REQUIRE_THROWS_WITH(hd::choose_device_plan(in), Catch::Contains("device path 'direct'"));
}

TEST_CASE("device path detection on this MPI", "[device]") {
  const auto in = hd::detect_device_inputs();
  INFO("library: " << in.library << ", MPIX_Query_cuda_support: " << in.mpix_query);
  REQUIRE(!in.library.empty());
  if (in.library.find("Open MPI") != std::string::npos) REQUIRE(in.mpix_query != -1);
  // The averager logs and describes what it chose.
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  REQUIRE_THAT(avg.device_path(), Catch::Contains(expected_path_text()));
  REQUIRE_THAT(avg.describe(), Catch::Contains("device buffers: "));
}

TEST_CASE("device path by calibration: device pointers from the calibrated size, staged below", "[device]") {
  // A calibration (HMA_MODEL) that measured direct faster from 4 KiB, on a CUDA-aware MPI
  // (emulated): the small set (544 bytes) is staged, the large one (~600 KB) goes direct, in the
  // blocking call and, with the progress thread, in start(); the values are exact either way.
  Emulated emu;
  const std::string file = "/tmp/hma-test-device-model-" + std::to_string(::getpid()) + ".txt";
  {
    std::FILE* f = std::fopen(file.c_str(), "w");
    REQUIRE(f != nullptr);
    std::fputs("# direct from 4 KiB\ndevice_direct_from_bytes = 4096\n", f);
    std::fclose(f);
  }
  const std::string before = env("HMA_MODEL");
  std::vector<hma::Progress> modes = {hma::Progress::poll};
  if (hma_test::thread_multiple()) modes.push_back(hma::Progress::thread);
  for (const hma::Progress progress : modes) {
    hma::AveragerOptions o;
    o.cuda_aware = true;
    o.device_path = hma::DevicePath::automatic;  // whatever this variant's HMA_DEVICE_PATH says
    o.device_ipc = false;
    o.progress = progress;
    setenv("HMA_MODEL", file.c_str(), 1);
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    if (before.empty()) unsetenv("HMA_MODEL");
    else setenv("HMA_MODEL", before.c_str(), 1);
    CAPTURE(avg.device_path());
    REQUIRE_THAT(avg.device_path(), Catch::Contains("device pointers to MPI_Allreduce from 4 KiB, staged below") &&
                                        Catch::Contains("calibration"));
    std::int64_t t = 0;
    for (const std::size_t big : {0u, 100000u}) {
      DeviceModel m(big);
      const bool large = big > 0;
      for (const bool start : {false, true}) {
        const std::uint64_t direct0 = hd::uses(hd::Use::device_direct), staged0 = hd::uses(hd::Use::device_staged);
        m.fill(rank(), ++t);
        if (start) avg.start(m.ps).wait();
        else REQUIRE(avg.step(m.ps));
        m.ps.synchronize();
        REQUIRE_ALL_RANKS(m.averaged(rank(), size(), t));
        const bool direct = hd::uses(hd::Use::device_direct) > direct0, staged = hd::uses(hd::Use::device_staged) > staged0;
        // start() polled never hands device pointers to MPI_Iallreduce on auto (ompi#9845).
        const bool want_direct = size() > 1 && large && (!start || progress == hma::Progress::thread);
        INFO("large " << large << ", start " << start << ", progress thread " << (progress == hma::Progress::thread));
        REQUIRE_ALL_RANKS(direct == want_direct);
        REQUIRE_ALL_RANKS(staged == (size() > 1 && !want_direct));
      }
    }
  }
  std::remove(file.c_str());
}

TEST_CASE("device buffers unavailable: a clear error", "[device]") {
  const hma::DeviceInfo info = hma::device_info();
  if (!info.available()) {
    REQUIRE(!info.reason.empty());
    REQUIRE_THROWS_ALL_RANKS(hma::Error, hma::DeviceParamSet(), info.reason);
  } else {
    REQUIRE(info.reason.empty());
  }
}

TEST_CASE("device averages: every call form with exact values", "[device]") {
  Emulated emu;
  const int g = size();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  // Small, then ~0.6 MB: one staged chunk at the default 4 MiB, many in the small-chunk variants.
  for (const std::size_t big : {0u, 100000u}) {
    DeviceModel m(big);
    std::int64_t t = 0;
    // Blocking step.
    m.fill(rank(), t);
    REQUIRE(avg.step(m.ps));
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    // start() + wait().
    m.fill(rank(), ++t);
    {
      auto r = avg.start(m.ps);  // may complete inside start() (MPICH: the peers already arrived)
      if (g == 1) REQUIRE(!m.ps.in_flight());
      r.wait();
    }
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    // start() + test() until done.
    m.fill(rank(), ++t);
    {
      auto r = avg.start(m.ps);
      int polls = 0;
      while (!r.test()) ++polls;
      INFO("polls " << polls);
    }
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    // average() outside the schedule, and start_average() completed by the destructor.
    m.fill(rank(), ++t);
    avg.average(m.ps, 0);
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    m.fill(rank(), ++t);
    { auto r = avg.start_average(m.ps, 0); }
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
  }
}

TEST_CASE("device averages: hierarchical levels", "[device][np_even>=4]") {
  Emulated emu;
  REQUIRE_ALL_RANKS(size() >= 4 && size() % 2 == 0);
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, std::vector<hma::Level>{{1, 2}, {3, size()}});
  DeviceModel m;
  for (std::int64_t t = 0; t < 7; ++t) {
    m.fill(rank(), t);
    const bool nb = t % 2 == 1;
    if (nb) {
      auto r = avg.start(m.ps);
      r.wait();
    } else {
      avg.step(m.ps);
    }
    m.ps.synchronize();
    const int g = t % 3 == 0 ? size() : 2;
    INFO("step " << t << ", group " << g);
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
  }
}

TEST_CASE("device averages: ordered after the caller stream and the stream after them", "[device]") {
  Emulated emu;
  hd::DeviceBackend& be = *hd::host_emulation_backend();
  hma::Stream user = be.create_stream();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  DeviceModel m;
  for (int form = 0; form < 2; ++form) {
    m.fill(rank(), 0);
    // The caller's "kernel" writes the step-5 values LATE, on its stream: hma must wait for it.
    hd::emulation_enqueue(user, [&m] { m.fill(rank(), 5); });
    std::vector<double> seen;
    if (form == 0) {
      avg.step(m.ps, user);
    } else {
      auto r = avg.start(m.ps, user);
      r.wait();
    }
    // Work queued on the caller's stream after the average sees its result.
    hd::emulation_enqueue(user, [&m, &seen] { m.each([&](auto& x, std::size_t) { seen.push_back(static_cast<double>(x)); }); });
    hd::emulation_run_all(user);
    bool ok = !seen.empty();
    for (std::size_t k = 0; k < seen.size(); ++k) ok &= seen[k] == block_mean(rank(), size(), 5, k);
    INFO("form " << form);
    REQUIRE_ALL_RANKS(ok);
  }
  be.destroy_stream(user);
}

TEST_CASE("device averages: several sets in flight completed in different orders", "[device]") {
  Emulated emu;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  DeviceModel a(5000), b(3000);
  a.fill(rank(), 1);
  b.fill(rank(), 2);
  hma::ParamSet host;
  auto h = host.allocate<double>(4000);
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = value(rank(), 3, i);
  auto ra = avg.start_average(a.ps, 0);
  auto rb = avg.start_average(b.ps, 0);
  auto rh = avg.start_average(host, 0);
  if (rank() % 2 == 0) {
    rb.wait();
    rh.wait();
    ra.wait();
  } else {
    rh.wait();
    ra.wait();
    rb.wait();
  }
  a.ps.synchronize();
  b.ps.synchronize();
  bool hok = true;
  for (std::size_t i = 0; i < h.size(); ++i) hok &= h[i] == block_mean(rank(), size(), 3, i);
  REQUIRE_ALL_RANKS(a.averaged(rank(), size(), 1));
  REQUIRE_ALL_RANKS(b.averaged(rank(), size(), 2));
  REQUIRE_ALL_RANKS(hok);
}

TEST_CASE("device averages: non-finite guard", "[device][np>=2]") {
  Emulated emu;
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::AveragerOptions o;
  o.nonfinite = hma::NonFinite::error;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  DeviceModel m;
  m.fill(rank(), 0);
  if (rank() == 1) m.ud[3] = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_ALL_RANKS(hma::NonFiniteError, avg.step(m.ps), "world rank(s) 1");
}

TEST_CASE("device buffers: bad input", "[device][errors]") {
  Emulated emu;
  std::vector<float> v(8);
  hma::DeviceParamSet ps;
  REQUIRE_THROWS_WITH(ps.add(static_cast<float*>(nullptr), 4), Catch::Contains("null data pointer"));
  ps.add(v.data(), 8);
  REQUIRE_THROWS_WITH(ps.add(v.data() + 4, 2), Catch::Contains("overlaps user array #0"));
  auto w = ps.allocate<float>(4, 1.5f);
  REQUIRE(w.data()[3] == 1.5f);
  REQUIRE_THROWS_WITH(ps.add(w.data(), 2), Catch::Contains("inside hma's own buffer"));
  REQUIRE_THROWS_AS(hma::DeviceParamSet(7), hma::InvalidArgument);
  REQUIRE_THAT(ps.describe(), Catch::Contains("2 device arrays on device 0 (host emulation): f32 12 (zero-copy 4, packed 8)"));
  // Registering while in flight.
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  auto r = avg.start(ps);
  if (size() > 1) REQUIRE_THROWS_WITH(ps.allocate<double>(2), Catch::Contains("in flight"));
  if (size() > 1) REQUIRE_THROWS_ALL_RANKS(hma::Error, avg.start(ps), "already has an average in flight");
  r.wait();
}

TEST_CASE("device buffers: layouts that differ across ranks are detected", "[device][errors][np>=2]") {
  Emulated emu;
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  hma::DeviceParamSet ps;
  (void)ps.allocate<float>(rank() == size() - 1 ? 9 : 10);
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps), "rank " + std::to_string(size() - 1));
  // A host set on some ranks and a device set on others is a mismatch too.
  hma::ParamSet host;
  (void)host.allocate<float>(10);
  hma::DeviceParamSet dev;
  (void)dev.allocate<float>(10);
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, rank() == 0 ? avg.step(host) : avg.step(dev), "layout");
}

TEST_CASE("device options: bad values and settings that differ between ranks", "[device][errors]") {
  setenv("HMA_DEVICE_PATH", "gpu", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1),
                           "HMA_DEVICE_PATH='gpu' must be auto, staged or direct");
  unsetenv("HMA_DEVICE_PATH");
  const std::string aware = env("HMA_CUDA_AWARE");
  setenv("HMA_CUDA_AWARE", "maybe", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1), "HMA_CUDA_AWARE");
  if (aware.empty()) unsetenv("HMA_CUDA_AWARE");
  else setenv("HMA_CUDA_AWARE", aware.c_str(), 1);
  hma::AveragerOptions o;
  o.staging_slots = 0;
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, o),
                           "staging_slots must be in [1, 64]");
  o.staging_slots.reset();
  o.device_path = hma::DevicePath::direct;
  o.cuda_aware = false;
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, o),
                           "device path 'direct'");
}

TEST_CASE("device settings that differ across ranks are refused at construction", "[device][errors][np>=2]") {
  Emulated emu;
  REQUIRE_ALL_RANKS(size() >= 2);
  // One rank with another staging chunk would pair different chunks: refused at construction.
  hma::AveragerOptions d;
  if (rank() == 1) d.staging_chunk_bytes = 1024;
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, d),
                           "averaging settings");
}

TEST_CASE("device averages: a late rank gives hma::Timeout and the wait resumes", "[device][np>=2]") {
  Emulated emu;
  // (HMA_CHECK=0, the unsafe variant, bounds no blocking wait: test/meson.build excludes this.)
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::AveragerOptions o;
  o.timeout_s = 0.3;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  std::vector<double> v(1000, 1.0);
  hma::DeviceParamSet ps;
  ps.add(v.data(), v.size());
  REQUIRE(avg.step(ps));  // all present
  ps.synchronize();
  std::fill(v.begin(), v.end(), 2.0 * rank());
  const int late = size() - 1;
  int timeouts = 0;
  std::string msg;
  if (rank() == late) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1200));
    avg.step(ps);
  } else {
    try {
      avg.step(ps);
    } catch (const hma::Timeout& e) {
      ++timeouts;
      msg = e.what();
    }
    timeouts += hma_test::wait_through_timeouts(ps);
  }
  ps.synchronize();
  INFO(msg);
  REQUIRE_ALL_RANKS(rank() == late || timeouts >= 1);
  REQUIRE_ALL_RANKS(rank() == late || msg.find("8000 bytes, was not reached by every rank of the group within 0.3 s") != std::string::npos);
  REQUIRE_ALL_RANKS(v[0] == static_cast<double>(size() - 1) && v[999] == v[0]);
  REQUIRE(avg.step_count() == 2);
}

TEST_CASE("device averages: a Request outlives its averager", "[device]") {
  Emulated emu;
  DeviceModel m(100000);
  m.fill(rank(), 3);
  hma::Request r;
  {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
    r = avg.start_average(m.ps, 0);
  }  // the averager completes the average before it frees its communicators
  REQUIRE(!r.active());
  r.wait();
  m.ps.synchronize();
  REQUIRE_ALL_RANKS(m.averaged(rank(), size(), 3));
}
