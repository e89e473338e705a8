// Internal, data plane: the node transport's exchange of handles (see ipc.hpp), in four parts
// issued from an average's stages: begin_exchange (new buffers, the cards to every rank), reach
// (adopt them, vote on whether every device reaches every other), map_peers (map the peers'
// buffers, vote), conclude_exchange (the group's verdict). Every collective is non-blocking, on
// the level's own communicators.
#pragma once

#include <mpi.h>

#include <array>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "device/device_state.hpp"

namespace hma::detail {

constexpr int kIdBytes = 64;

// What one rank says in the exchange.
struct Card {
  IpcHandle buffer;            // one-shot: the two halves; two-shot: the slice
  IpcHandle store_f, store_d;  // two-shot: the set's storage
  std::uint64_t bytes_f = 0, bytes_d = 0;
  char id[kIdBytes] = {};  // device_id()
};

// The handshake: [buffers mapped and current here, f32 elements, f64 elements, averages since
// the exchange, this rank's weight factor's bits (weighted two-shot sums need every rank's),
// the exchange's token (a hash of every rank's handles: which buffers this rank means)].
using Hello = std::array<std::uint64_t, 6>;

// One average's state across its stages. The exchange, when one is needed, runs as
// non-blocking collectives between stages like the rest: a blocking collective inside one
// average's progress would wait for ranks that progress another average (of another averager)
// first, and neither would ever get there.
struct Flow {
  Hello mine{};
  std::vector<Hello> all;
  bool done = false;           // nothing left for the last stage
  std::exception_ptr error;    // a failed stage: the average ends with this error, never as done
  // The exchange (see begin_exchange):
  bool exchanging = false;
  Card card;                   // this rank's
  std::vector<Card> cards;     // every rank's
  IpcPeers fresh;              // the new buffers until the handles are out
  std::string why;             // why this rank cannot take part ("" if it can)
  int ok = 0, all_ok = 0;      // the group's verdict (MPI_MIN)
  bool crossing = false;       // two-level: this rank's slice is on its way across nodes
};

/// Part 1: new buffers and this rank's card, the peers' old buffers unmapped, the cards to every
/// rank of `c` (g ranks) issued into `reqs`.
void begin_exchange(DeviceState& s, IpcPeers& e, Flow& f, MPI_Comm c, int g, bool two,
                    std::vector<MPI_Request>& reqs);
/// Part 2: the new buffers adopted, whether this rank reaches every device voted over `c`.
void reach(DeviceState& s, IpcPeers& e, Flow& f, MPI_Comm c, int g, std::vector<MPI_Request>& reqs);
/// Part 3: the peers' buffers mapped (this rank is `me` of `g`), voted over `c`.
void map_peers(DeviceState& s, IpcPeers& e, Flow& f, MPI_Comm c, int me, int g, std::vector<MPI_Request>& reqs);
/// Part 4: whether the group may use the node transport; false on every rank alike.
bool conclude_exchange(IpcPeers& e, Flow& f);

}  // namespace hma::detail
