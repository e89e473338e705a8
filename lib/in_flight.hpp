// Internal, core: an average in flight on a set, as the set sees it. The averager's record of an
// average (Pending, transport/pending.hpp) implements it; a set (ParamSet, DeviceParamSet) only
// holds it, keeps it pointing at itself when it moves, waits for it, and settles it before its
// buffers go. So the sets (core, device) need nothing from the layers above them.
#pragma once

#include <memory>

namespace hma {
class ParamSet;
}

namespace hma::detail {

struct InFlight : std::enable_shared_from_this<InFlight> {
  ParamSet* params = nullptr;  // kept current when the ParamSet moves (host sets)
  bool done = false;

  InFlight() = default;
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
  virtual ~InFlight() = default;

  /// Completes it: blocks (up to its timeout, then hma::Timeout, resumable); throws what the
  /// average throws.
  virtual void wait() = 0;
  /// Completes it before its buffers go away (a destructor cannot throw): never launches a data
  /// stage not yet launched; after a timeout only tests, never waits a second timeout. Returns
  /// false when it may still be in flight: the buffers must then be leaked (it is kept alive for
  /// the rest of the process, since MPI may still write into what it holds).
  virtual bool settle() noexcept = 0;
};

/// settle() for what a set holds (nothing, or a finished average: true).
inline bool finish_quietly(const std::shared_ptr<InFlight>& p) noexcept {
  return !p || p->done || p->settle();
}

}  // namespace hma::detail
