// Shared pieces of hma's benchmark binaries: flags, timing, statistics, run metadata, and
// table / CSV / JSON output. Benchmarks print; they never assert speed.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef HMA_BUILD_TYPE
#define HMA_BUILD_TYPE "unknown"
#endif

namespace bench {

/// MPI_Init, or MPI_Init_thread(MPI_THREAD_MULTIPLE) when HMA_PROGRESS=thread asks for hma's
/// progress thread (THREAD_MULTIPLE costs some latency, so it is not the default).
inline void init(int* argc, char*** argv) {
  const char* p = std::getenv("HMA_PROGRESS");
  if (p != nullptr && std::string(p) == "thread") {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
  } else {
    MPI_Init(argc, argv);
  }
}

inline int rank(MPI_Comm c = MPI_COMM_WORLD) {
  int r = 0;
  MPI_Comm_rank(c, &r);
  return r;
}
inline int size(MPI_Comm c = MPI_COMM_WORLD) {
  int s = 0;
  MPI_Comm_size(c, &s);
  return s;
}

/// Command-line flags of the form --name value or --flag; unknown flags are an error.
class Flags {
 public:
  Flags(int argc, char** argv, std::string usage) : usage_(std::move(usage)) {
    for (int i = 1; i < argc; ++i) {
      std::string k = argv[i];
      if (k == "-h" || k == "--help") fail("");
      if (k.rfind("--", 0) != 0) fail("unexpected argument '" + k + "'");
      k = k.substr(2);
      if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) values_[k] = argv[++i];
      else values_[k] = "";
    }
  }
  std::string str(const std::string& k, const std::string& def) { return take(k) ? values_[k] : def; }
  bool flag(const std::string& k) { return take(k); }
  long long integer(const std::string& k, long long def) {
    if (!take(k)) return def;
    return parse_size(k, values_[k]);
  }
  double real(const std::string& k, double def) {
    if (!take(k)) return def;
    try {
      return std::stod(values_[k]);
    } catch (...) {
      fail("--" + k + " '" + values_[k] + "' is not a number");
    }
  }
  /// A comma list of sizes (K/M/G suffixes), each at least `min`.
  std::vector<long long> sizes(const std::string& k, const std::string& def, long long min) {
    const std::string v = str(k, def);
    std::vector<long long> out;
    for (std::size_t a = 0; a <= v.size();) {
      const std::size_t b = std::min(v.find(',', a), v.size());
      out.push_back(parse_size(k, v.substr(a, b - a)));
      if (out.back() < min) fail("--" + k + ": " + v.substr(a, b - a) + " is below " + std::to_string(min));
      a = b + 1;
    }
    return out;
  }
  /// Call after reading every flag: rejects flags nobody asked for.
  void done() {
    for (const auto& [k, v] : values_)
      if (!used_.count(k)) fail("unknown flag --" + k);
  }
  [[noreturn]] void fail(const std::string& why) {
    if (rank() == 0) {
      if (!why.empty()) std::fprintf(stderr, "error: %s\n", why.c_str());
      std::fprintf(stderr, "%s", usage_.c_str());
    }
    MPI_Finalize();
    std::exit(why.empty() ? 0 : 2);
  }

 private:
  bool take(const std::string& k) {
    used_.insert(k);
    return values_.count(k) > 0;
  }
  // Integers with optional K/M/G suffix (powers of 1024).
  long long parse_size(const std::string& k, const std::string& v) {
    try {
      std::size_t pos = 0;
      long long n = std::stoll(v, &pos);
      const std::string suf = v.substr(pos);
      if (suf == "K" || suf == "k") n <<= 10;
      else if (suf == "M" || suf == "m") n <<= 20;
      else if (suf == "G" || suf == "g") n <<= 30;
      else if (!suf.empty()) throw 0;
      return n;
    } catch (...) {
      fail("--" + k + " '" + v + "' is not an integer (K/M/G suffixes allowed)");
    }
  }
  std::string usage_;
  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
};

inline double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

/// Summary of repeated timings (µs).
struct Stats {
  double median = 0, p10 = 0, p90 = 0, min = 0, max = 0;
  int n = 0;
  /// (p90 - p10) / median, as a percentage: the spread column.
  [[nodiscard]] double spread_pct() const { return median > 0 ? 100.0 * (p90 - p10) / median : 0; }
};

inline Stats stats(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  auto q = [&](double f) {
    const double pos = f * static_cast<double>(v.size() - 1);
    const std::size_t i = static_cast<std::size_t>(pos);
    const double frac = pos - static_cast<double>(i);
    return i + 1 < v.size() ? v[i] * (1 - frac) + v[i + 1] * frac : v[i];
  };
  s.median = q(0.5);
  s.p10 = q(0.1);
  s.p90 = q(0.9);
  s.min = v.front();
  s.max = v.back();
  s.n = static_cast<int>(v.size());
  return s;
}

/// Times `op` `iters` times after `warmup` untimed runs. Each timing starts after a barrier on
/// `comm`; the time of an iteration is the slowest rank's (a collective ends when its last rank
/// does). Stops early (after at least 3) once `max_seconds` of timed work has passed on rank 0.
template <class Op>
std::vector<double> time_op(MPI_Comm comm, int warmup, int iters, double max_seconds, Op&& op) {
  for (int i = 0; i < warmup; ++i) op();
  std::vector<double> t;
  double spent = 0;
  for (int i = 0; i < iters; ++i) {
    MPI_Barrier(comm);
    const double t0 = now_us();
    op();
    const double dt = now_us() - t0;
    t.push_back(dt);
    spent += dt;
    int stop = i + 1 >= 3 && spent > max_seconds * 1e6;
    MPI_Bcast(&stop, 1, MPI_INT, 0, comm);
    if (stop) break;
  }
  std::vector<double> slowest(t.size());
  MPI_Allreduce(t.data(), slowest.data(), static_cast<int>(t.size()), MPI_DOUBLE, MPI_MAX, comm);
  return slowest;
}

/// nccl-tests convention: algbw = bytes / time, busbw = algbw * 2 (n - 1) / n. GB/s.
inline double algbw(double bytes, double us) { return us > 0 ? bytes / us / 1e3 : 0; }
inline double busbw(double bytes, double us, int n) {
  return n > 1 ? algbw(bytes, us) * 2.0 * (n - 1) / n : 0;
}

inline std::string human_bytes(double b) {
  const char* u[] = {"B", "KiB", "MiB", "GiB"};
  int i = 0;
  while (b >= 1024 && i < 3) {
    b /= 1024;
    ++i;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, b == std::floor(b) ? "%.0f %s" : "%.1f %s", b, u[i]);
  return buf;
}

inline std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\', o += c;
    else if (c == '\n') o += "\\n";
    else if (static_cast<unsigned char>(c) < 0x20) o += ' ';
    else o += c;
  }
  return o;
}

/// What a result means only with: rank count, hosts, MPI library, build type, date.
struct Meta {
  int np = 0;
  std::vector<std::string> hosts;
  std::string mpi, build = HMA_BUILD_TYPE, date, command;
};

inline Meta collect_meta(int argc, char** argv) {
  Meta m;
  m.np = size();
  char host[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  MPI_Get_processor_name(host, &len);
  std::vector<char> all(static_cast<std::size_t>(MPI_MAX_PROCESSOR_NAME) * static_cast<std::size_t>(m.np));
  MPI_Allgather(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR,
                MPI_COMM_WORLD);
  std::set<std::string> uniq;
  for (int r = 0; r < m.np; ++r) uniq.insert(std::string(all.data() + r * MPI_MAX_PROCESSOR_NAME));
  m.hosts.assign(uniq.begin(), uniq.end());
  char lib[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  MPI_Get_library_version(lib, &len);
  m.mpi = std::string(lib, static_cast<std::size_t>(len));
  if (auto nl = m.mpi.find_first_of("\n,"); nl != std::string::npos) m.mpi.resize(nl);
  const std::time_t t = std::time(nullptr);
  char d[32];
  std::strftime(d, sizeof d, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  m.date = d;
  for (int i = 0; i < argc; ++i) {
    if (i > 0) m.command += ' ';
    m.command += argv[i];
  }
  return m;
}

/// A line of warning when ranks outnumber the cores of this machine: timings then include
/// waiting for a core, and compute phases overrun.
inline void warn_oversubscribed() {
  int local = 0;
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  MPI_Comm_size(node, &local);
  MPI_Comm_free(&node);
  const unsigned cores = std::thread::hardware_concurrency();
  if (rank() == 0 && cores > 0 && static_cast<unsigned>(local) > cores)
    std::printf("# warning: %d ranks share %u cores on this node (oversubscribed): times include "
                "waiting for a core\n", local, cores);
}

inline std::string meta_json(const Meta& m) {
  std::ostringstream o;
  o << "{\"np\": " << m.np << ", \"hosts\": [";
  for (std::size_t i = 0; i < m.hosts.size(); ++i) o << (i ? ", " : "") << '"' << json_escape(m.hosts[i]) << '"';
  o << "], \"mpi\": \"" << json_escape(m.mpi) << "\", \"build_type\": \"" << m.build
    << "\", \"date\": \"" << m.date << "\", \"command\": \"" << json_escape(m.command) << "\"}";
  return o.str();
}

/// A table of rows of named columns, written as CSV (header + rows) and as JSON
/// ({"meta": ..., "rows": [{col: value}, ...]}). Values are numbers unless quoted text.
class Table {
 public:
  explicit Table(std::vector<std::string> cols) : cols_(std::move(cols)) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void write_csv(const std::string& path) const {
    std::ofstream f(path);
    for (std::size_t i = 0; i < cols_.size(); ++i) f << (i ? "," : "") << cols_[i];
    f << "\n";
    for (const auto& r : rows_) {
      for (std::size_t i = 0; i < r.size(); ++i) f << (i ? "," : "") << r[i];
      f << "\n";
    }
  }
  void write_json(const std::string& path, const Meta& m) const {
    std::ofstream f(path);
    f << "{\"meta\": " << meta_json(m) << ",\n \"rows\": [\n";
    for (std::size_t j = 0; j < rows_.size(); ++j) {
      f << "  {";
      for (std::size_t i = 0; i < cols_.size(); ++i) {
        const std::string& v = rows_[j][i];
        const bool num = !v.empty() && (std::isdigit(static_cast<unsigned char>(v[0])) || v[0] == '-');
        f << (i ? ", " : "") << '"' << cols_[i] << "\": " << (num ? v : '"' + json_escape(v) + '"');
      }
      f << "}" << (j + 1 < rows_.size() ? "," : "") << "\n";
    }
    f << " ]}\n";
  }

 private:
  std::vector<std::string> cols_;
  std::vector<std::vector<std::string>> rows_;
};

inline std::string fmt(double v, int prec = 2) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

}  // namespace bench
