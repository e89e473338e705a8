// The averager's entry points for device buffers: prepare a DeviceParamSet's average (the
// caller's stream ordered before hma's, segment tables, non-finite scan, header), whose data
// stage packs (one kernel per dtype, divided by the group size, or multiplied by the weight factor,
// on the way; with the outer optimizer or the divergence metric it only packs, and the host
// scales the staged chunks) and hands the bytes to
// a device transport (lib/transport/device.cpp). Every path starts by recording an event on the
// caller's stream and making hma's stream wait for it, and ends by making the caller's stream
// wait for `done`: no host synchronisation of the caller's stream, never cudaDeviceSynchronize.
#include "control/device_path.hpp"
#include "device/device_state.hpp"
#include "hma/averager.hpp"
#include "control/settings.hpp"
#include "hma/error.hpp"
#include "averager/request.hpp"
#include "support/timeline.hpp"
#include "support/worker.hpp"
#include "transport/device.hpp"
#include "transport/ipc.hpp"
#include "transport/post.hpp"

namespace hma {

std::string Averager::ipc_why(std::size_t level) const {
  if (!settings_.device_ipc) return "off (HMA_DEVICE_IPC=0, or AveragerOptions::device_ipc)";
  const int g = schedule_.levels()[level].group_size;
  if (g < 2) return "not needed (groups of one rank)";
  const int rpn = hierarchy_.ranks_per_node();
  const bool one_node = hierarchy_.num_nodes() <= 1 ||
                        (hierarchy_.contiguous_nodes() && rpn > 0 && g <= rpn && rpn % g == 0);
  const int node = one_node ? g : (hierarchy_.two_level(level) != nullptr ? rpn : 0);
  if (!one_node) {
    // Two-level: the node stages on the device, this rank's slice across nodes.
    if (node == 0) return "not used: the groups span several nodes, not as whole nodes of equal size";
    if (settings_.algorithm == Algorithm::flat) return "not used: the groups span several nodes (HMA_ALGORITHM=flat)";
    if (settings_.algorithm == Algorithm::automatic && hierarchy_.emulated_nodes())
      return "not used: the groups span several emulated nodes (HMA_ALGORITHM=two_level to use it there)";
    if (node < 2) return "not used: the groups span several nodes of one rank each";
  }
  if (node > detail::kMaxIpcPeers)
    return "not used: groups of " + std::to_string(node) + " ranks in a node (it reads at most " +
           std::to_string(detail::kMaxIpcPeers) + ")";
  if (level < ipc_.size() && ipc_[level] && ipc_[level]->off)
    return "off since the group's first average there: " + ipc_[level]->why;
  return "";
}

std::string Averager::device_path() const {
  if (!device_plan_) return "device buffers: this rank is outside the averaging group";
  std::string why;
  for (std::size_t i = 0; i < schedule_.levels().size(); ++i) {
    const std::string no = ipc_why(i);
    const bool two = ipc_.size() > i && ipc_[i] && ipc_[i]->two_level();
    why += "level " + std::to_string(i) + ": " + (!no.empty() ? "node transport " + no : detail::describe_ipc(two)) + "; ";
  }
  why += device_plan_->why;
  if (settings_.outer.enabled || settings_.divergence)
    why += std::string("; averages ") +
           (settings_.outer.enabled ? "at level " + std::to_string(settings_.outer.level) +
                                          " (the outer optimizer)" + (settings_.divergence ? " and " : "")
                                    : std::string()) +
           (settings_.divergence ? "with the divergence metric" : "") +
           ": staged, whatever the above (their passes run on the host chunks)";
  return why;
}

bool Averager::step(DeviceParamSet& params, Stream stream) {
  return scheduled(true, nullptr, [&](std::size_t l, bool b, bool s) {
    return prepare_device(params, l, b, s, stream);
  });
}

Request Averager::start(DeviceParamSet& params, Stream stream) {
  Request r;
  scheduled(false, &r, [&](std::size_t l, bool b, bool s) { return prepare_device(params, l, b, s, stream); });
  return r;
}

void Averager::average(DeviceParamSet& params, std::size_t level, Stream stream) {
  at_level(level, true, nullptr, [&](std::size_t l, bool b, bool s) {
    return prepare_device(params, l, b, s, stream);
  });
}

Request Averager::start_average(DeviceParamSet& params, std::size_t level, Stream stream) {
  Request r;
  at_level(level, false, &r, [&](std::size_t l, bool b, bool s) {
    return prepare_device(params, l, b, s, stream);
  });
  return r;
}

detail::Prepared Averager::prepare_device(DeviceParamSet& params, std::size_t level, bool blocking,
                                          bool scheduled, Stream user) {
  if (params.in_flight())
    throw Error("hma: step " + std::to_string(step_) +
                ": this DeviceParamSet already has an average in flight; wait() on its Request first");
  detail::DeviceState& s = params.state();
  detail::DeviceGuard on_device(s.be, s.device);  // the caller's current device comes back
  const Comm& comm = hierarchy_.level(level);
  const int g = comm.size();
  detail::Prepared job;
  job.p = new_pending(level, params.bytes());
  if (settings_.wire[level] != Wire::exact)
    job.p->refusal = "hma: step " + std::to_string(step_) + ": level " + std::to_string(level) +
                     " sends " + detail::wire_text({settings_.wire[level]}) +
                     " on the wire, which is for host ParamSets only: a DeviceParamSet cannot be "
                     "averaged there; nothing was averaged";
  job.header.v = {static_cast<std::uint64_t>(step_), scheduled ? 0u : 1u, level, 1,
                  params.layout_fingerprint(), params.arrays(), s.f32.owned, s.f32.user_elems,
                  s.f64.owned, s.f64.user_elems};
  job.attach = [&params](std::shared_ptr<detail::Pending> q) { params.set_pending(std::move(q)); };
  // Everything hma does to the buffers comes after the caller's work on `user`.
  s.be->record(s.ready, user);
  s.be->stream_wait(s.stream, s.ready);
  s.tables();
  if (settings_.nonfinite != NonFinite::ignore)
    for (detail::DeviceBucket* b : {&s.f32, &s.f64})
      if (b->size() > 0)
        job.nonfinite_here |= s.be->any_nonfinite(b->dtype, b->storage, b->table, b->segs, b->size(), s.stream, s.flag);
  // The outer optimizer and the divergence metric: their state and passes are on the host, on
  // the chunks of the staged path (also for a group of one: its outer update still applies).
  std::shared_ptr<detail::Post> post = make_post(job.p, params.layout_fingerprint(), s.f32.size(), s.f64.size());
  if (post) post->size_inputs(s.f32.size(), s.f64.size());
  // The node transport: on the device, when the group lies in one node (see ipc.hpp).
  std::shared_ptr<detail::IpcLevel> ipc;
  if (!post && g > 1 && level < ipc_.size() && ipc_[level] && !ipc_[level]->off) ipc = ipc_[level];
  if (g == 1 && !post) {  // the identity: nothing to move, the caller's stream is ordered already
    job.p->launch = [](detail::Pending& q) { q.finish = [] {}; };
    return job;
  }
  detail::DeviceRoute r;
  r.comm = comm.get();
  r.plan = device_plan_.get();
  r.staging_chunk_bytes = settings_.staging_chunk_bytes;
  r.staging_slots = settings_.staging_slots;
  r.user = user;
  r.post = post.get();  // kept alive by the launch below
  r.group = g;
  const int lv = static_cast<int>(level);
  const std::int64_t st = step_;
  // The data stage: after the group agreed (maybe later, from the set's wait()).
  const bool reciprocal = settings_.device_division == DeviceDivision::reciprocal;
  r.reciprocal = reciprocal;
  job.p->launch = [sp = &s, r, g, lv, st, blocking, reciprocal, w = worker_.get(), post, ipc,
                   two_shot = settings_.ipc_two_shot_bytes](detail::Pending& q) {
    detail::DeviceGuard on_device(sp->be, sp->device);
    detail::TimelineScope whole(blocking ? "device average" : "device start", lv, st, q.who.bytes, g);
    detail::DeviceRoute rq = r;
    rq.weight_factor = q.weight_factor;
    // With a post the kernel only packs (x * 1, exact): the host scales after keeping the inputs.
    auto pack = [sp, g = post ? 1 : g, reciprocal, wf = post ? -1.0 : q.weight_factor](detail::DeviceBucket& b,
                                                                                       void* out) {
      sp->be->scale_pack(b.dtype, b.storage, b.table, b.segs, b.size(), g, reciprocal, wf, sp->stream, out);
    };
    if (ipc) {  // blocking or not: complete() advances its handshake and stages
      detail::start_ipc(*sp, detail::IpcRoute{ipc, rq, w, two_shot}, q, pack);
      return;
    }
    for (detail::DeviceBucket* b : {&sp->f32, &sp->f64})
      if (b->size() > 0) pack(*b, b->storage);
    sp->be->record(sp->packed, sp->stream);
    if (!blocking) {
      detail::start_device(*sp, rq, q, w);
      return;
    }
    if (w) w->drain();  // what the worker queued runs first: collectives stay in order
    detail::average_device(*sp, rq);
    q.finish = [] {};
  };
  return job;
}

}  // namespace hma
