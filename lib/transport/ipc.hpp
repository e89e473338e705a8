// Internal, data plane: the node transport for device buffers. The ranks of a group that lies in
// one node average on the GPU: each exports its scaled terms (into a buffer its
// peers have mapped by CUDA IPC, or shared memory in the emulation), then every rank runs one
// kernel per dtype that adds all ranks' terms in rank order into its own buffer (the same bits
// on every rank), and unpacks. Nothing leaves the device but two tiny MPI messages:
// The pack kernel writes the terms straight into the exported buffer.
//   1. the handshake (MPI_Iallgather of 6 words, once this rank's terms are exported): it is the
//      arrival barrier (a peer's kernel reads a rank's terms only after that rank's export has
//      finished on the device) and says whether every rank's buffers are still the ones of the
//      same exchange (a token);
//   2. only when the sizes change or on first use: the exchange of handles (MPI_Iallgather) and
//      whether every rank's device reaches every other (same device or peer access; two
//      MPI_Iallreduce votes), then the terms again and an MPI_Ibarrier. Where the devices cannot
//      reach each other, the group turns the node transport off at that level for good, on
//      every rank alike, and this and later averages take the staged or direct path (this one
//      hands over to it: start_device).
// Every collective of it is non-blocking, issued from the average's stages: a blocking one
// inside one average's progress would wait for ranks that progress another average first.
// That is the one-shot sum: every rank reads (group + 1) x the set's bytes. From
// HMA_IPC_TWO_SHOT_BYTES (set bytes; by default never: not yet measured on a GPU) the two-shot sum runs
// instead: the peers map the set's own storage; each rank reduces its 1/group slice of every
// rank's raw values (scaled as the pack kernel scales them, added in rank order: the same bits
// as one-shot) into a slice buffer, an MPI_Ibarrier, then each rank copies every rank's slice
// into its storage. It reads about 2 x and writes 1 + 1/group x the set's bytes, and needs no
// pack pass over the owned arrays.
// Two-level (a level of several whole nodes): always the two-shot sum within each node, scaled
// by the whole group; after stage 1 each rank's slice goes to pinned host memory and is summed
// across nodes (MPI_Iallreduce on IpcLevel::across), comes back, then the MPI_Ibarrier and the
// gather. The handshake and the exchange's votes run over the whole group (IpcLevel::whole), so
// every node decides alike; the handles and the barriers stay within the node.
// All on communicators of their own (IpcLevel), never one that carries other data.
#pragma once

#include <mpi.h>

#include <functional>
#include <cstdint>
#include <memory>
#include <string>

#include "device/device_state.hpp"
#include "hma/comm.hpp"
#include "transport/pending.hpp"
#include "transport/device.hpp"

namespace hma::detail {

class Worker;

/// One level of one averager: the node transport's communicators and whether it is on.
/// A level whose groups lie in one node uses `comm` alone. A level of several whole nodes
/// (two-level) reduces each node's slices on the device over `comm` (the node's ranks), moves
/// this rank's slice across nodes over `across` (MPI_Iallreduce through pinned host memory),
/// and says hello and votes over `whole` (the level's ranks), so that every node decides alike
/// (exchange, fall back). All made with the averager (collective), none carries other data.
struct IpcLevel {
  Comm comm;           // this node's ranks of the group (the group itself below two-level)
  Comm whole;          // two-level only: the group
  Comm across;         // two-level only: the ranks of the group with this node-local rank
  bool off = false;    // the group found its devices cannot reach each other
  std::string why;     // why off
  [[nodiscard]] bool two_level() const { return !across.is_null(); }
  [[nodiscard]] MPI_Comm control() const { return two_level() ? whole.get() : comm.get(); }
};

/// How an average on the node transport moves, for Averager::device_path().
inline const char* describe_ipc(bool two_level) {
  return two_level ? "two-level: the node transport (on the device, node peers' slices through CUDA IPC), "
                     "this rank's slice across nodes through pinned host memory (MPI_Iallreduce)"
                   : "the node transport (on the device, peers' terms through CUDA IPC)";
}

struct IpcRoute {
  std::shared_ptr<IpcLevel> level;
  DeviceRoute fallback;  // the staged or direct route, if the devices cannot reach; its comm
                         // (the level's) is duplicated for IpcLevel::comm on first use
  Worker* worker = nullptr;     // for the fallback, when it takes over (start_device)
  std::size_t two_shot_from = SIZE_MAX;  // set bytes from which the two-shot sum runs
};

/// Queues `pack(bucket, out)` for each bucket, into this rank's exported buffer where the group's
/// buffers are mapped already (else into storage, exported after the exchange), waits for it,
/// hands the handshake to `p` (its first request) and sets its stages; complete() / wait() /
/// test() advance it.
void start_ipc(DeviceState& s, const IpcRoute& route, Pending& p,
               const std::function<void(DeviceBucket&, void*)>& pack);

}  // namespace hma::detail
