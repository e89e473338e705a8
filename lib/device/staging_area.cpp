#include "device/staging_area.hpp"

#include <algorithm>

namespace hma::detail {

StagingArea::~StagingArea() {
  if (be == nullptr) return;
  if (host != nullptr) be->release_pinned(host);
  for (Event e : in) be->destroy_event(e);
  for (Event e : out) be->destroy_event(e);
}

void StagingArea::ensure(DeviceBackend* backend, std::size_t want_slots, std::size_t want_bytes) {
  be = backend;
  if (want_slots > slots || want_bytes > slot_bytes) {
    const std::size_t s = std::max(want_slots, slots), b = std::max(want_bytes, slot_bytes);
    void* fresh = be->alloc_pinned(s * 2 * b);
    if (host != nullptr) be->release_pinned(host);
    host = fresh;
    slots = s;
    slot_bytes = b;
  }
  while (in.size() < slots) in.push_back(be->create_event());
  while (out.size() < slots) out.push_back(be->create_event());
}

char* StagingArea::send(std::size_t slot) const { return static_cast<char*>(host) + 2 * slot * slot_bytes; }
char* StagingArea::recv(std::size_t slot) const { return send(slot) + slot_bytes; }

}  // namespace hma::detail
