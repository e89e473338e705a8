// Internal, control plane: who is missing when an average stalls. Each averager registers with
// the diagnostics communicator of its group (a duplicate of its world made by the first averager
// over that group, kept for the process). While a
// rank waits inside hma it serves "where are you?" queries on every registered diagnostics
// communicator (point-to-point, never on a communicator that carries a check or data). A waiting
// rank asks the ranks of its group only once its wait passes the stall warning (or times out):
// nothing is sent before, so the fast path pays one MPI_Iprobe per registered averager per poll.
// A rank that does not answer within a short bound is outside hma (computing, blocked elsewhere,
// or dead), unless its late answer to an earlier query arrives meanwhile (then it is where that
// answer says).
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>


namespace hma::detail {

/// Where a rank is, as it answers "where are you?".
struct Position {
  std::int64_t averager = 0;  // the averager's id (Averager::id()); 0: not waiting inside hma
  std::int64_t step = -1;
  std::int64_t level = -1;
  std::int64_t call = 0;      // 0: step()/start(), 1: average()/start_average()
  std::int64_t stage = 0;     // 0: the agreement check, 1: the data
  [[nodiscard]] bool same_average(const Position& o) const {
    return averager == o.averager && step == o.step && level == o.level && call == o.call;
  }
  /// "averager 2 step 5 level 0 (the agreement check)"
  [[nodiscard]] std::string describe() const;
};

/// An averager's diagnostics: its id and the diagnostics communicator of its ranks, registered
/// while it lives. Collective over `world` (the averager's ranks) the first time this process
/// sees that group of ranks: the communicator (a duplicate of `world`) is then kept for the rest
/// of the process and shared by every later averager over the same ranks. It is never freed: a
/// query may arrive at any time, and a message for a freed communicator would land on whichever
/// communicator reuses its context.
struct Diagnostics {
  std::int64_t id = 0;
  Diagnostics(std::int64_t i, MPI_Comm world, const std::string& schedule);
  ~Diagnostics();
  Diagnostics(const Diagnostics&) = delete;
  Diagnostics& operator=(const Diagnostics&) = delete;
};
/// A new averager id: 1, 2, ... in construction order in this process.
std::int64_t next_averager_id() noexcept;

/// While alive, this rank answers queries with `where` (the innermost wait wins).
class Waiting {
 public:
  explicit Waiting(const Position& where) noexcept;
  ~Waiting();
  Waiting(const Waiting&) = delete;
  Waiting& operator=(const Waiting&) = delete;

 private:
  Position saved_;
};

/// Where this rank is now, inside the innermost Waiting (its stage moved on).
void update_here(const Position& where) noexcept;

/// Answers every query that has arrived (non-blocking). Called from every wait's poll loop.
void serve_queries() noexcept;

/// Asks every rank of the group (MPI_COMM_WORLD ranks) of averager `id` where it is, waiting at
/// most `answer_s` for the answers (serving others' queries meanwhile), and says in one line who
/// has not reached `here`'s average and where each rank is. Empty when `id` has no
/// diagnostics communicator here.
std::string where_is_everyone(std::int64_t id, const std::vector<int>& world_ranks, const Position& here,
                              double answer_s);

/// Test hook: receives every stall warning (whatever HMA_LOG says). Null: none.
void set_stall_hook_for_testing(void (*hook)(const std::string&));

/// Test hook: this rank answers each query only `s` seconds after it arrives (0: at once), as a
/// loaded machine may.
void set_answer_delay_for_testing(double s);
/// Logs a stall warning (and hands it to the test hook).
void report_stall(const std::string& line);

}  // namespace hma::detail
