// The node transport (lib/transport/ipc.cpp) on the host emulation backend: ranks are processes
// that map each other's "device" buffers (POSIX shared memory standing in for CUDA IPC), and the
// emulated streams run their work late, so a rank that read a peer's terms before they were
// exported, or overwrote its own while a peer still read them, gets wrong values here.
// test/meson.build runs this at np 2, 3 and 4, with and without the progress thread.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "device/device_backend.hpp"
#include "exact_values.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"
#include "transport/uses.hpp"

using hma_test::block_mean;
using hma_test::rank;
using hma_test::size;
using hma_test::value;
namespace hd = hma::detail;

namespace {

struct Emulated {
  Emulated() { hd::set_device_backend_for_testing(hd::host_emulation_backend()); }
  ~Emulated() { hd::set_device_backend_for_testing(nullptr); }
};

// An owned f32 array, a registered f32 and a registered f64 array ("device" memory is host
// memory here), on emulated device `device`.
struct Model {
  std::vector<float> uf;
  std::vector<double> ud;
  hma::DeviceParamSet ps;
  hma::DeviceArray<float> wf;
  explicit Model(std::size_t n, int device = 0) : uf(n / 2 + 3), ud(n / 3 + 5), ps(device) {
    wf = ps.allocate<float>(n + 1);
    ps.add(uf.data(), uf.size());
    ps.add(ud.data(), ud.size());
  }
  template <class F>
  void each(F&& f) {
    std::size_t k = 0;
    for (std::size_t i = 0; i < wf.size(); ++i) f(wf.data()[i], k++);
    for (auto& x : uf) f(x, k++);
    for (auto& x : ud) f(x, k++);
  }
  void fill(int r, std::int64_t t) {
    each([&](auto& x, std::size_t k) { x = static_cast<std::remove_reference_t<decltype(x)>>(value(r, t, k)); });
  }
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

std::uint64_t used(hd::Use u) { return hd::uses(u); }

}  // namespace

TEST_CASE("node transport: every call form, exact values, one exchange per layout", "[ipc][np>=2]") {
  Emulated emu;
  REQUIRE_ALL_RANKS(size() >= 2);
  const int g = size();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  REQUIRE_ALL_RANKS(avg.device_path().find("level 0: the node transport") != std::string::npos);
  Model m(5000);
  const auto ipc0 = used(hd::Use::device_ipc), ex0 = used(hd::Use::device_ipc_exchange);
  const auto staged0 = used(hd::Use::device_staged);
  std::int64_t t = 0;
  for (int round = 0; round < 3; ++round) {  // both halves of the exported buffer, twice
    m.fill(rank(), t);
    REQUIRE(avg.step(m.ps));
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    m.fill(rank(), ++t);
    {
      auto r = avg.start(m.ps);  // may complete inside start() (MPICH: the peers already arrived)
      r.wait();
    }
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    m.fill(rank(), ++t);
    {
      auto r = avg.start(m.ps);
      while (!r.test()) std::this_thread::yield();
    }
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
    ++t;
  }
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc) - ipc0 == 9);
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_exchange) - ex0 == 1);
  REQUIRE_ALL_RANKS(used(hd::Use::device_staged) == staged0);
}

TEST_CASE("node transport: a new layout, or a set made anew on one rank, exchanges again", "[ipc][np>=2]") {
  Emulated emu;
  const int g = size();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  auto m = std::make_unique<Model>(300);
  const auto ex0 = used(hd::Use::device_ipc_exchange);
  m->fill(rank(), 0);
  avg.step(m->ps);
  m->ps.synchronize();
  REQUIRE_ALL_RANKS(m->averaged(rank(), g, 0));
  // A bigger layout on every rank: new buffers, new handles.
  m = std::make_unique<Model>(7000);
  m->fill(rank(), 1);
  avg.step(m->ps);
  m->ps.synchronize();
  REQUIRE_ALL_RANKS(m->averaged(rank(), g, 1));
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_exchange) - ex0 == 2);
  // Rank 0 alone makes its set anew with the same layout (the check passes): its handshake says
  // so and the whole group exchanges, instead of reading freed buffers.
  if (rank() == 0) m = std::make_unique<Model>(7000);
  for (std::int64_t t = 2; t < 5; ++t) {
    m->fill(rank(), t);
    avg.step(m->ps);
    m->ps.synchronize();
    REQUIRE_ALL_RANKS(m->averaged(rank(), g, t));
  }
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_exchange) - ex0 == 3);
}

TEST_CASE("node transport: sets in flight together, completed in another order", "[ipc][np>=2]") {
  Emulated emu;
  const int g = size();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  Model a(2000), b(900), c(4000);
  for (std::int64_t t = 0; t < 4; ++t) {
    a.fill(rank(), t);
    b.fill(rank(), t + 10);
    c.fill(rank(), t + 20);
    auto ra = avg.start_average(a.ps, 0);
    auto rb = avg.start_average(b.ps, 0);
    auto rc = avg.start_average(c.ps, 0);
    if (rank() % 2 == 0) {
      rc.wait();
      ra.wait();
      rb.wait();
    } else {
      rb.wait();
      rc.wait();
      ra.wait();
    }
    a.ps.synchronize();
    b.ps.synchronize();
    c.ps.synchronize();
    REQUIRE_ALL_RANKS(a.averaged(rank(), g, t) && b.averaged(rank(), g, t + 10) && c.averaged(rank(), g, t + 20));
  }
}

TEST_CASE("node transport: two averagers' averages waited for in different orders on different ranks",
          "[ipc][np>=2]") {
  // Rank A waits for averager 1's average while rank B waits for averager 2's: each average's
  // later stages (the exchange of handles, the barrier before the sum) are issued only when it is
  // advanced, so a wait must advance the others too. Before that fix, a new layout (an exchange)
  // hung here. Each round: new sets (an exchange), the same sets again (the steady state), one
  // pair on devices that cannot reach each other (the fallback takes over mid-average), and a
  // rank that only test()s. A hang fails as hma::Timeout, not as the suite's timeout.
  Emulated emu;
  const int g = size();
  hma::AveragerOptions o;
  o.timeout_s = 30;
  hma::PeriodicAverager one(MPI_COMM_WORLD, 1, 0, o), two(MPI_COMM_WORLD, 1, 0, o);
  std::int64_t t = 0;
  for (const int pair : {0, 1}) {
    const int device = pair == 1 && rank() == 0 ? 1 : 0;  // the second pair cannot reach: fallback
    Model m1(3000 + 7 * static_cast<std::size_t>(pair), device), m2(1500, device);
    for (int round = 0; round < 3; ++round, ++t) {
      m1.fill(rank(), t);
      m2.fill(rank(), t + 100);
      auto r1 = one.start(m1.ps);
      auto r2 = two.start(m2.ps);
      if (rank() % 2 == 0) {
        r1.wait();
        r2.wait();
      } else if (round == 2) {
        while (!r2.test()) std::this_thread::yield();
        r1.wait();
      } else {
        r2.wait();
        r1.wait();
      }
      m1.ps.synchronize();
      m2.ps.synchronize();
      INFO("pair " << pair << " round " << round);
      REQUIRE_ALL_RANKS(m1.averaged(rank(), g, t) && m2.averaged(rank(), g, t + 100));
    }
  }
  REQUIRE_ALL_RANKS(one.device_path().find("cannot read device") != std::string::npos);
  REQUIRE_ALL_RANKS(two.device_path().find("cannot read device") != std::string::npos);
}

TEST_CASE("node transport: hierarchical levels and weights", "[ipc][np_even>=4]") {
  Emulated emu;
  REQUIRE_ALL_RANKS(size() >= 4 && size() % 2 == 0);
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, std::vector<hma::Level>{{1, 2}, {3, size()}});
  Model m(1500);
  const auto ipc0 = used(hd::Use::device_ipc);
  for (std::int64_t t = 0; t < 6; ++t) {
    m.fill(rank(), t);
    avg.step(m.ps);
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), t % 3 == 0 ? size() : 2, t));
  }
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc) - ipc0 == 6);
  // Weights: rank r weighs r + 1; the weighted mean of exactly representable values.
  avg.set_weight(rank() + 1.0);
  m.fill(rank(), 7);
  avg.average(m.ps, 1);
  m.ps.synchronize();
  bool ok = true;
  double wsum = 0;
  for (int r = 0; r < size(); ++r) wsum += r + 1.0;
  m.each([&](auto& x, std::size_t k) {
    double want = 0;
    for (int r = 0; r < size(); ++r) want += value(r, 7, k) * ((r + 1.0) / wsum);
    ok = ok && std::abs(static_cast<double>(x) - want) <= 1e-5 * (1 + std::abs(want));
  });
  REQUIRE_ALL_RANKS(ok);
}

namespace {
// Every node size that splits the world into at least two whole nodes of two ranks or more.
std::vector<int> node_sizes() {
  std::vector<int> out;
  for (int l = 2; l <= size() / 2; ++l)
    if (size() % l == 0) out.push_back(l);
  return out;
}

hma::AveragerOptions two_level_on(int ranks_per_node) {
  hma::AveragerOptions o;
  o.hierarchy.ranks_per_node = ranks_per_node;
  o.algorithm = hma::Algorithm::two_level;
  o.timeout_s = 30;
  return o;
}

// True when this rank's set holds rank 0's bits.
bool same_bits_as_rank0(Model& m) {
  std::vector<double> v;
  m.each([&](auto& x, std::size_t) { v.push_back(static_cast<double>(x)); });
  std::vector<double> r0 = v;
  MPI_Bcast(r0.data(), static_cast<int>(r0.size()), MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return std::memcmp(v.data(), r0.data(), v.size() * sizeof(double)) == 0;
}
}  // namespace

TEST_CASE("two-level device sets: node stages on the device, slices across nodes, exact values",
          "[ipc][np_even>=4]") {
  // Nodes of l ranks (emulated): each node reduces its slices over IPC, each rank's slice is
  // summed across nodes (MPI_Iallreduce), the node gathers the slices. Exactly representable
  // values: the result is the exact mean whatever the order; every call form; sizes from one
  // element (most slices empty) to uneven slices; a new layout exchanges again.
  Emulated emu;
  const int g = size();
  for (const int l : node_sizes()) {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, two_level_on(l));
    INFO("ranks per node " << l << ": " << avg.device_path());
    REQUIRE_ALL_RANKS(avg.device_path().find("level 0: two-level: the node transport") != std::string::npos);
    std::int64_t t = 0;
    for (const std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{5003}}) {
      Model m(n);
      const auto two0 = used(hd::Use::device_ipc_two_level), ex0 = used(hd::Use::device_ipc_exchange);
      const auto staged0 = used(hd::Use::device_staged);
      for (int form = 0; form < 3; ++form, ++t) {
        m.fill(rank(), t);
        if (form == 0) {
          avg.step(m.ps);
        } else if (form == 1) {
          auto r = avg.start(m.ps);
          r.wait();
        } else {
          auto r = avg.start(m.ps);
          while (!r.test()) std::this_thread::yield();
        }
        m.ps.synchronize();
        INFO("n " << n << " form " << form);
        REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
      }
      REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_two_level) - two0 == 3);
      REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_exchange) - ex0 == 1);  // per layout, per node
      REQUIRE_ALL_RANKS(used(hd::Use::device_staged) == staged0);
    }
  }
}

TEST_CASE("two-level device sets: the same bits on every rank, weights, and a node that cannot reach",
          "[ipc][np_even>=4]") {
  Emulated emu;
  const int l = node_sizes().front();
  // Values that round when scaled and added: every rank still holds the same bits.
  {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, two_level_on(l));
    Model m(4099);
    for (int t = 0; t < 2; ++t) {
      m.each([&](auto& v, std::size_t k) {
        v = static_cast<std::remove_reference_t<decltype(v)>>((rank() + 1) * 0.1 + static_cast<double>((k * 7 + t) % 1013) / 7.0);
      });
      avg.set_weight(t == 1 ? 1.0 + rank() % 3 : 1.0);
      avg.step(m.ps);
      m.ps.synchronize();
      INFO("t " << t);
      REQUIRE_ALL_RANKS(same_bits_as_rank0(m));
    }
    // Weights: rank r weighs r + 1; the weighted mean of exactly representable values.
    avg.set_weight(rank() + 1.0);
    m.fill(rank(), 7);
    avg.step(m.ps);
    m.ps.synchronize();
    bool ok = true;
    double wsum = 0;
    for (int r = 0; r < size(); ++r) wsum += r + 1.0;
    m.each([&](auto& x, std::size_t k) {
      double want = 0;
      for (int r = 0; r < size(); ++r) want += value(r, 7, k) * ((r + 1.0) / wsum);
      ok = ok && std::abs(static_cast<double>(x) - want) <= 1e-5 * (1 + std::abs(want));
    });
    REQUIRE_ALL_RANKS(ok);
  }
  // One node's devices cannot reach each other: the whole group falls back (every node alike),
  // to the flat staged path, for good.
  {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, two_level_on(l));
    Model m(3000, rank() == 0 ? 1 : 0);
    const auto two0 = used(hd::Use::device_ipc_two_level), staged0 = used(hd::Use::device_staged);
    for (std::int64_t t = 0; t < 2; ++t) {
      m.fill(rank(), t);
      avg.step(m.ps);
      m.ps.synchronize();
      REQUIRE_ALL_RANKS(m.averaged(rank(), size(), t));
    }
    REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_two_level) == two0);
    REQUIRE_ALL_RANKS(used(hd::Use::device_staged) - staged0 == 2);
    // The ranks of node 0 say why; the other nodes' that another rank could not.
    INFO(avg.device_path());
    REQUIRE_ALL_RANKS(avg.device_path().find(rank() < l ? "cannot read device" : "another rank of the group could not") !=
                      std::string::npos);
  }
}

TEST_CASE("two-level device sets: hierarchical, the node level on the device and the world two-level",
          "[ipc][np_even>=4]") {
  Emulated emu;
  const int l = node_sizes().front();
  hma::AveragerOptions o = two_level_on(l);
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, std::vector<hma::Level>{{1, l}, {2, size()}}, 0, o);
  INFO(avg.device_path());
  REQUIRE_ALL_RANKS(avg.device_path().find("level 0: the node transport") != std::string::npos);
  REQUIRE_ALL_RANKS(avg.device_path().find("level 1: two-level") != std::string::npos);
  Model m(2500);
  const auto ipc0 = used(hd::Use::device_ipc), two0 = used(hd::Use::device_ipc_two_level);
  for (std::int64_t t = 0; t < 4; ++t) {
    m.fill(rank(), t);
    auto r = avg.start(m.ps);
    r.wait();
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), t % 2 == 0 ? size() : l, t));
  }
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc) - ipc0 == 4);
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_two_level) - two0 == 2);
}

TEST_CASE("node transport: devices that cannot reach each other fall back for good", "[ipc][np>=2]") {
  Emulated emu;
  const int g = size();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  // The emulation's device 1 cannot read device 0's memory (no peer access).
  Model m(3000, rank() == 0 ? 1 : 0);
  const auto ipc0 = used(hd::Use::device_ipc), staged0 = used(hd::Use::device_staged);
  for (std::int64_t t = 0; t < 3; ++t) {
    m.fill(rank(), t);
    avg.step(m.ps);
    m.ps.synchronize();
    REQUIRE_ALL_RANKS(m.averaged(rank(), g, t));
  }
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc) == ipc0);
  REQUIRE_ALL_RANKS(used(hd::Use::device_staged) - staged0 == 3);
  INFO(avg.device_path());
  REQUIRE_ALL_RANKS(avg.device_path().find("node transport off since the group's first average there: device "
                                           "emulated:") != std::string::npos);
  REQUIRE_ALL_RANKS(avg.device_path().find("cannot read device") != std::string::npos);
}

TEST_CASE("node transport: a late rank with the check off gives hma::Timeout in the handshake, and the wait resumes",
          "[ipc][np>=2]") {
  Emulated emu;
  hma::AveragerOptions o;
  o.timeout_s = 0.3;
  o.check_every_average = false;  // the handshake is then the first place a rank waits
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  Model m(1000);
  m.fill(rank(), 0);
  avg.step(m.ps);  // the exchange
  m.ps.synchronize();
  REQUIRE_ALL_RANKS(m.averaged(rank(), size(), 0));
  m.fill(rank(), 1);
  const int late = size() - 1;
  int timeouts = 0;
  std::string msg;
  if (rank() == late) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1200));
    avg.step(m.ps);
  } else {
    try {
      avg.step(m.ps);
    } catch (const hma::Timeout& e) {
      ++timeouts;
      msg = e.what();
    }
    timeouts += hma_test::wait_through_timeouts(m.ps);
  }
  m.ps.synchronize();
  INFO(msg);
  REQUIRE_ALL_RANKS(rank() == late || timeouts >= 1);
  REQUIRE_ALL_RANKS(rank() == late || msg.find("did not complete within 0.3 s") != std::string::npos);
  REQUIRE_ALL_RANKS(m.averaged(rank(), size(), 1));
}

TEST_CASE("node transport: off by the option, and described", "[ipc]") {
  Emulated emu;
  hma::AveragerOptions o;
  o.device_ipc = false;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  INFO(avg.device_path());
  REQUIRE_ALL_RANKS(avg.device_path().find("node transport off (HMA_DEVICE_IPC=0") != std::string::npos);
  Model m(100);
  const auto ipc0 = used(hd::Use::device_ipc);
  m.fill(rank(), 0);
  avg.step(m.ps);
  m.ps.synchronize();
  REQUIRE_ALL_RANKS(m.averaged(rank(), size(), 0));
  REQUIRE_ALL_RANKS(used(hd::Use::device_ipc) == ipc0);
}

namespace {
// An averager whose node transport sums two-shot from `bytes` (HMA_IPC_TWO_SHOT_BYTES is read
// at construction, the same on every rank).
hma::PeriodicAverager with_two_shot_from(const char* bytes) {
  const char* old = std::getenv("HMA_IPC_TWO_SHOT_BYTES");
  const std::string keep = old != nullptr ? old : "";
  setenv("HMA_IPC_TWO_SHOT_BYTES", bytes, 1);
  hma::PeriodicAverager a(MPI_COMM_WORLD, 1);
  if (old != nullptr) setenv("HMA_IPC_TWO_SHOT_BYTES", keep.c_str(), 1);
  else unsetenv("HMA_IPC_TWO_SHOT_BYTES");
  return a;
}
}  // namespace

TEST_CASE("node transport: two-shot gives one-shot's bits, plain and weighted, any slice split", "[ipc][np>=2]") {
  Emulated emu;
  const int g = size();
  auto one = with_two_shot_from("1073741824");
  auto two = with_two_shot_from("0");
  // Values that round when divided by 3 and added: the order of the terms shows in the bits.
  auto x = [](int r, int t, std::size_t i) { return (r + 1) * 0.1 + static_cast<double>((i * 7 + t) % 1013) / 7.0; };
  for (const std::size_t n : {std::size_t{1}, std::size_t{5}, std::size_t{4099}}) {
    for (int t = 0; t < 4; ++t) {
      const bool weighted = t >= 2;
      for (auto* a : {&one, &two}) a->set_weight(weighted ? 1.0 + rank() % 3 : 1.0);
      Model m1(n), m2(n);
      auto fill = [&](Model& m) { m.each([&](auto& v, std::size_t k) { v = static_cast<std::remove_reference_t<decltype(v)>>(x(rank(), t, k)); }); };
      fill(m1);
      fill(m2);
      const auto two0 = used(hd::Use::device_ipc_two_shot);
      if (t % 2 == 0) {
        one.step(m1.ps);
        two.step(m2.ps);
      } else {
        auto r1 = one.start(m1.ps);
        auto r2 = two.start(m2.ps);
        r2.wait();
        r1.wait();
      }
      m1.ps.synchronize();
      m2.ps.synchronize();
      REQUIRE_ALL_RANKS(used(hd::Use::device_ipc_two_shot) - two0 == 1);
      // Both equal the pack kernel's terms added in rank order (plain: x / g).
      bool same = std::memcmp(m1.wf.data(), m2.wf.data(), m1.wf.size() * sizeof(float)) == 0 &&
                  std::memcmp(m1.uf.data(), m2.uf.data(), m1.uf.size() * sizeof(float)) == 0 &&
                  std::memcmp(m1.ud.data(), m2.ud.data(), m1.ud.size() * sizeof(double)) == 0;
      if (!weighted) {
        std::size_t k = 0;
        auto want = [&](auto v, std::size_t i) {
          using T = decltype(v);
          T acc = static_cast<T>(x(0, t, i)) / static_cast<T>(g);
          for (int r = 1; r < g; ++r) acc += static_cast<T>(x(r, t, i)) / static_cast<T>(g);
          return acc;
        };
        m2.each([&](auto& v, std::size_t i) {
          same = same && v == want(v, i);
          ++k;
        });
      }
      INFO("n " << n << " t " << t);
      REQUIRE_ALL_RANKS(same);
    }
  }
}
