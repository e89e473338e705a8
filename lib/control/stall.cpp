#include "control/stall.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "control/check.hpp"
#include "hma/error.hpp"
#include "hma/comm.hpp"
#include "support/log.hpp"

namespace hma::detail {

namespace {

constexpr int kQuery = 7001;  // tags on the diagnostics communicators (nothing else uses them)
constexpr int kAnswer = 7002;

// A query: [query id]; an answer: [query id, the Position's five fields].
using Answer = std::array<std::int64_t, 6>;

struct Diag {
  MPI_Comm comm = MPI_COMM_NULL;  // shared, never freed (see Diagnostics)
  std::string schedule;
  std::vector<int> world;  // MPI_COMM_WORLD rank of each rank of comm
};

// Sends in flight (answers and queries): their buffers live until they complete. A send to a rank
// that never receives stays here (eager: it completes anyway; else it is kept, never freed).
struct Outbox {
  std::vector<std::pair<MPI_Request, std::unique_ptr<Answer>>> sends;
  void add(MPI_Request q, std::unique_ptr<Answer> buf) { sends.emplace_back(q, std::move(buf)); }
  void prune() {
    std::erase_if(sends, [](auto& s) {
      int done = 0;
      MPI_Test(&s.first, &done, MPI_STATUS_IGNORE);
      return done != 0;
    });
  }
};

struct State {
  std::recursive_mutex mu;
  std::map<std::int64_t, Diag> diags;           // by averager id
  std::map<std::vector<int>, MPI_Comm> comms;   // by the group's MPI_COMM_WORLD ranks
  Outbox out;
  Position here;  // where this rank is (averager 0: outside a wait)
  std::int64_t next_query = 1;
  std::int64_t next_id = 1;
  void (*hook)(const std::string&) = nullptr;
  // Test hook: queries are answered only this long after they arrive (a loaded machine).
  std::chrono::steady_clock::duration answer_delay{};
  struct Held {
    MPI_Comm comm;
    int source;
    std::int64_t query;
    std::chrono::steady_clock::time_point due;
  };
  std::vector<Held> held;
  // By averager: its last query, and the average it asked about (late answers to it count).
  std::map<std::int64_t, std::pair<std::int64_t, Position>> previous;
};

State& state() {
  static auto* s = new State;  // never destroyed: waits may run during static destruction
  return *s;
}

int finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f;
}

void answer(State& st, MPI_Comm comm, int source, std::int64_t q) {
  auto a = std::make_unique<Answer>(Answer{q, st.here.averager, st.here.step, st.here.level, st.here.call, st.here.stage});
  MPI_Request r = MPI_REQUEST_NULL;
  if (MPI_Isend(a->data(), 6, MPI_INT64_T, source, kAnswer, comm, &r) == MPI_SUCCESS) st.out.add(r, std::move(a));
}

// Answers the queries that have arrived on `comm` (mu held).
void serve(State& st, MPI_Comm comm) {
  const auto now = std::chrono::steady_clock::now();
  std::erase_if(st.held, [&](const State::Held& h) {
    if (h.comm != comm || h.due > now) return false;
    answer(st, h.comm, h.source, h.query);
    return true;
  });
  while (true) {
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kQuery, comm, &flag, &status) != MPI_SUCCESS || !flag) return;
    std::int64_t q = 0;
    if (MPI_Recv(&q, 1, MPI_INT64_T, status.MPI_SOURCE, kQuery, comm, MPI_STATUS_IGNORE) != MPI_SUCCESS) return;
    if (st.answer_delay.count() > 0) st.held.push_back({comm, status.MPI_SOURCE, q, now + st.answer_delay});
    else answer(st, comm, status.MPI_SOURCE, q);
  }
}

std::string list(const std::vector<int>& ranks) {
  return (ranks.size() == 1 ? "world rank " : "world ranks ") + rank_ranges(ranks);
}

}  // namespace

std::string Position::describe() const {
  if (averager == 0) return "outside hma";
  return "averager " + std::to_string(averager) + " step " + std::to_string(step) + " level " +
         std::to_string(level) + (call == 1 ? " (average())" : "") +
         (stage == 0 ? " (the agreement check)" : " (the data)");
}

Diagnostics::Diagnostics(std::int64_t i, MPI_Comm world, const std::string& schedule) : id(i) {
  Diag d;
  d.schedule = schedule;
  int n = 0;
  check(MPI_Comm_size(world, &n), "MPI_Comm_size(diagnostics)");
  d.world.resize(static_cast<std::size_t>(n));
  MPI_Group g = MPI_GROUP_NULL, w = MPI_GROUP_NULL;
  check(MPI_Comm_group(world, &g), "MPI_Comm_group(diagnostics)");
  check(MPI_Comm_group(MPI_COMM_WORLD, &w), "MPI_Comm_group(diagnostics)");
  std::vector<int> mine(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) mine[static_cast<std::size_t>(k)] = k;
  MPI_Group_translate_ranks(g, n, mine.data(), w, d.world.data());
  MPI_Group_free(&g);
  MPI_Group_free(&w);
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  auto it = st.comms.find(d.world);
  if (it == st.comms.end()) {  // every rank of the group is here, and none has it yet
    MPI_Comm c = MPI_COMM_NULL;
    check(MPI_Comm_dup(world, &c), "MPI_Comm_dup(diagnostics)");
    MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN);
    it = st.comms.emplace(d.world, c).first;
  }
  d.comm = it->second;
  st.diags[id] = std::move(d);
}

Diagnostics::~Diagnostics() {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  st.diags.erase(id);
  st.previous.erase(id);
}

std::int64_t next_averager_id() noexcept {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  return st.next_id++;
}

Waiting::Waiting(const Position& where) noexcept {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  saved_ = st.here;
  st.here = where;
}

Waiting::~Waiting() {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  st.here = saved_;
}

void update_here(const Position& where) noexcept {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  st.here = where;
}

void serve_queries() noexcept {
  State& st = state();
  std::unique_lock<std::recursive_mutex> lock(st.mu, std::try_to_lock);
  if (!lock.owns_lock() || finalized()) return;  // another thread serves
  for (const auto& [ranks, c] : st.comms) serve(st, c);
  st.out.prune();
}

std::string where_is_everyone(std::int64_t id, const std::vector<int>& world_ranks, const Position& here,
                              double answer_s) {
  State& st = state();
  std::unique_lock<std::recursive_mutex> lock(st.mu);
  auto it = st.diags.find(id);
  if (it == st.diags.end() || finalized()) return "";
  const Diag& d = it->second;
  const std::int64_t q = st.next_query++;
  const int me_world = Comm::world_rank();
  // MPI_COMM_WORLD rank -> rank on the diagnostics communicator.
  std::map<int, int> at;
  for (std::size_t i = 0; i < d.world.size(); ++i) at[d.world[i]] = static_cast<int>(i);
  std::map<int, Position> answers;  // by world rank
  answers[me_world] = here;
  std::size_t asked = 0;
  for (int w : world_ranks) {
    if (w == me_world || !at.count(w)) continue;
    auto buf = std::make_unique<Answer>(Answer{q, 0, 0, 0, 0, 0});
    MPI_Request r = MPI_REQUEST_NULL;
    if (MPI_Isend(buf->data(), 1, MPI_INT64_T, at[w], kQuery, d.comm, &r) == MPI_SUCCESS) {
      st.out.add(r, std::move(buf));
      ++asked;
    }
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                          std::chrono::duration<double>(answer_s));
  std::size_t got = 0;
  // Answers to this averager's previous query about the same average that came after their
  // bound (a loaded machine): a rank that answered late is in hma, and was where it said a
  // moment ago. Used for the ranks silent now. (Answers to older queries are stale: dropped.)
  std::int64_t late_q = 0;
  if (auto prev = st.previous.find(id); prev != st.previous.end() && prev->second.second.same_average(here))
    late_q = prev->second.first;
  st.previous[id] = {q, here};
  std::map<int, Position> late;
  while (got < asked && std::chrono::steady_clock::now() < until) {
    for (const auto& [ranks, c] : st.comms) serve(st, c);  // askers answer each other
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kAnswer, d.comm, &flag, &status) != MPI_SUCCESS) break;
    if (!flag) {
      lock.unlock();
      std::this_thread::yield();
      lock.lock();
      continue;
    }
    Answer a{};
    if (MPI_Recv(a.data(), 6, MPI_INT64_T, status.MPI_SOURCE, kAnswer, d.comm, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
    const int w = d.world[static_cast<std::size_t>(status.MPI_SOURCE)];
    if (a[0] != q) {  // the answer to an earlier query, come late
      if (a[0] == late_q) late[w] = Position{a[1], a[2], a[3], a[4], a[5]};
      continue;
    }
    if (answers.count(w)) continue;
    answers[w] = Position{a[1], a[2], a[3], a[4], a[5]};
    ++got;
  }
  st.out.prune();
  for (const auto& [w, l] : late)
    if (!answers.count(w)) answers[w] = l;
  // Group by where each rank is: first the ranks that have not reached this average. Every list
  // in ascending world rank (a group's communicator may order its ranks otherwise).
  std::vector<int> ranks = world_ranks;
  std::sort(ranks.begin(), ranks.end());
  std::vector<int> here_ranks, silent;
  std::map<std::array<std::int64_t, 5>, std::vector<int>> elsewhere;
  for (int w : ranks) {
    auto a = answers.find(w);
    if (a == answers.end()) silent.push_back(w);
    else if (a->second.same_average(here)) here_ranks.push_back(w);
    else {
      const Position& p = a->second;
      elsewhere[{p.averager, p.step, p.level, p.call, p.stage}].push_back(w);
    }
  }
  std::string missing_line;
  std::vector<int> missing = silent;
  for (const auto& [k, v] : elsewhere) missing.insert(missing.end(), v.begin(), v.end());
  std::sort(missing.begin(), missing.end());
  std::string s;
  if (missing.empty()) {
    s = "every rank of the group is in this average (" + here.describe() + ")";
  } else {
    s = list(missing) + (missing.size() == 1 ? " has" : " have") + " not reached this average";
    for (const auto& [k, v] : elsewhere) {
      const Position p{k[0], k[1], k[2], k[3], k[4]};
      s += "; " + list(v) + (v.size() == 1 ? " is" : " are") + " " +
           (p.averager == 0 ? "outside hma (it answered from no wait of hma)" : "at " + p.describe());
    }
    if (!silent.empty()) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", answer_s);
      s += "; " + list(silent) + (silent.size() == 1 ? " is" : " are") +
           " outside hma (no answer within " + secs + " s: computing, blocked elsewhere, or dead)";
    }
    s += "; " + list(here_ranks) + " wait" + (here_ranks.size() == 1 ? "s" : "") + " at " + here.describe();
  }
  auto sched = st.diags.find(here.averager);
  if (here.averager != 0 && sched != st.diags.end())
    s += " [averager " + std::to_string(here.averager) + ": " + sched->second.schedule + "]";
  return s;
}

void set_stall_hook_for_testing(void (*hook)(const std::string&)) {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  st.hook = hook;
}

void set_answer_delay_for_testing(double s) {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  st.answer_delay = std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

void report_stall(const std::string& line) {
  void (*hook)(const std::string&) = nullptr;
  {
    State& st = state();
    std::lock_guard<std::recursive_mutex> lock(st.mu);
    hook = st.hook;
  }
  if (hook != nullptr) hook(line);
  log(LogLevel::warn, line);
}

}  // namespace hma::detail
