// Internal: what a DeviceParamSet holds for the node transport (lib/transport/ipc.cpp) at one
// level of one averager: the buffers it exports, which its peers map, and the peers' buffers it
// maps, in group rank order.
//  - one-shot (small and medium sets): `mine`, two halves used alternately (parity = averages
//    since the exchange, mod 2), so a rank never overwrites the half its peers may still be
//    reading from the average before; each half holds [f32 terms | f64 terms].
//  - two-shot (large sets): the set's own storage (each bucket), read in slices by the peers,
//    and `slice`, [f32 slice | f64 slice], this rank's reduced slice, read by every peer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "device/device_backend.hpp"

namespace hma::detail {

/// A destroyed set's exported buffer (or a storage that was exported): peers keep it mapped
/// until their next exchange, which may never come, and CUDA makes freeing memory a peer still
/// maps undefined. So it is never freed: kept (reachable) until the process ends.
void park_exported(DeviceBackend* be, void* p) noexcept;

struct IpcPeers {
  DeviceBackend* be = nullptr;
  std::weak_ptr<const void> owner;  // the averager's level this belongs to (see ipc.cpp)
  bool two_shot = false;
  std::size_t nf = 0, nd = 0;       // elements of each dtype
  std::size_t half = 0;             // one-shot: bytes of one half
  std::size_t off_d = 0;            // one-shot: where the f64 part starts in a half
  std::size_t lf = 0, ld = 0;       // two-shot: slice length of each dtype (ceil(n / group))
  std::size_t slice_off_d = 0, slice_bytes = 0;
  void* mine = nullptr;             // one-shot: this rank's exported buffer (two halves)
  void* slice = nullptr;            // two-shot: this rank's exported slice
  const void* store_f = nullptr;    // two-shot: this rank's storage when it was exported
  const void* store_d = nullptr;
  std::vector<void*> peer;          // one-shot: every rank's buffer (peer[me] == mine)
  std::vector<void*> peer_slice;    // two-shot: every rank's slice (peer_slice[me] == slice)
  std::vector<void*> peer_f, peer_d;  // two-shot: every rank's storage (own storage at me)
  int me = -1;
  bool exchanged = false;
  std::uint64_t token = 0;          // a hash of every rank's handles at the exchange
  std::uint64_t count = 0;          // averages through these buffers since the exchange
  void* host = nullptr;             // two-level: pinned host memory for this rank's slice
  std::size_t host_bytes = 0;

  IpcPeers() = default;
  IpcPeers(const IpcPeers&) = delete;
  IpcPeers& operator=(const IpcPeers&) = delete;
  ~IpcPeers() {
    // The set is going: its exported buffers stay allocated (see park_exported).
    park_exported(be, mine);
    park_exported(be, slice);
    mine = slice = nullptr;
    release();
    if (host != nullptr && be != nullptr) be->release_pinned(host);
  }

  static std::size_t round_up(std::size_t b) { return (b + 255) / 256 * 256; }
  /// One-shot: rank r's half `par` for dtype `d`.
  [[nodiscard]] void* at(int r, std::uint64_t par, Dtype d) const {
    return static_cast<char*>(peer[static_cast<std::size_t>(r)]) + par * half + (d == Dtype::f32 ? 0 : off_d);
  }
  /// Two-shot: rank r's reduced slice of dtype `d`.
  [[nodiscard]] void* slice_of(int r, Dtype d) const {
    return static_cast<char*>(peer_slice[static_cast<std::size_t>(r)]) + (d == Dtype::f32 ? 0 : slice_off_d);
  }
  /// Unmaps the peers' buffers.
  void close_peers() noexcept {
    if (be == nullptr) return;
    for (auto* v : {&peer, &peer_slice, &peer_f, &peer_d}) {
      for (std::size_t r = 0; r < v->size(); ++r)
        if ((*v)[r] != nullptr && static_cast<int>(r) != me) be->close_shared((*v)[r]);
      v->clear();
    }
    exchanged = false;
  }
  /// Unmaps the peers' buffers and frees this rank's (never its storage). Only once every peer
  /// has unmapped them (the exchange's collective) or never mapped them.
  void release() noexcept {
    if (be == nullptr) return;
    close_peers();
    if (mine != nullptr) be->release_shared(mine);
    if (slice != nullptr) be->release_shared(slice);
    mine = slice = nullptr;
    store_f = store_d = nullptr;
    exchanged = false;
    count = 0;
  }
};

}  // namespace hma::detail
