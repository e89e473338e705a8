// The averager orchestrates one average: schedule -> prepare the set's average (header, vote,
// data launch) -> control check on the level's control communicator -> data through a
// transport (lib/transport/) -> a pending average or a finished one.
#include "hma/averager.hpp"

#include <cmath>

#include "control/agree.hpp"
#include "control/model.hpp"
#include "hma/error.hpp"
#include "averager/request.hpp"
#include "support/mpi_static.hpp"
#include "support/log.hpp"
#include "support/timeline.hpp"
#include "support/worker.hpp"
#include "transport/elements.hpp"
#include "transport/host.hpp"
#include "transport/post.hpp"

namespace hma {

void Averager::require_usable(const char* who) const {
  if (detail::mpi_finalizing())
    throw Error(std::string("hma: ") + who + " at step " + std::to_string(step_) +
                ": MPI is already finalised; every use of an averager must come before MPI_Finalize");
}

std::optional<std::size_t> Averager::level_now() const noexcept { return schedule_.level_at(step_); }

void Averager::set_weight(double weight) {
  if (!(weight >= 0 && weight < detail::kWeightLimit))
    throw InvalidArgument("hma: set_weight: the weight must be finite, >= 0 and < 2^31, got " +
                          std::to_string(weight));
  if (!settings_.check)
    throw InvalidArgument("hma: set_weight: weighted averaging needs the agreement check, which "
                          "carries the weights (HMA_CHECK=0 or check_every_average = false turned "
                          "it off)");
  weight_ = static_cast<detail::Weight>(std::llround(weight * detail::kWeightUnit));
}

double Averager::weight() const noexcept { return static_cast<double>(weight_) / detail::kWeightUnit; }

void Averager::set_step(std::int64_t step) {
  if (step < 0 || step > kMaxStep)
    throw InvalidArgument("hma: set_step: step must be between 0 and 2^62 (" + std::to_string(kMaxStep) +
                          "), got " + std::to_string(step));
  step_ = step;
}

void Averager::drop_finished() {
  std::erase_if(inflight_, [](const std::weak_ptr<detail::Pending>& w) {
    const auto p = w.lock();
    return p == nullptr || p->done;
  });
}

std::shared_ptr<detail::Pending> Averager::new_pending(std::size_t level, std::size_t bytes,
                                                       std::shared_ptr<detail::Pending> started) {
  drop_finished();  // before a record is recycled: a fresh one is not done, and listed only when it starts
  // The outer optimizer remembers its level's last average by a weak pointer (settle_outer): a
  // record it may still point to is never recycled.
  std::shared_ptr<detail::Pending> p = std::move(started);
  if (p != nullptr) {
    // the lean path's record: fresh but for its check
  } else if (!outer_ && detail::recycle(spare_)) {
    p = spare_;
  } else {
    p = std::make_shared<detail::Pending>();
    spare_ = p;
  }
  inflight_.push_back(p);
  detail::track(p);
  p->who.level = level;
  p->who.step = step_;
  p->who.bytes = bytes;
  p->who.world_ranks = hierarchy_.world_ranks(level);  // into the recycled capacity
  p->timeout_s = settings_.timeout_s;
  p->averager = id();
  p->stall_warn_s = settings_.stall_warn_s;
  p->nonfinite = settings_.nonfinite;
  p->weight = weight_;
  p->t_start = detail::Timeline::get() != nullptr ? detail::Timeline::now_us() : 0.0;
  return p;
}

void Averager::settle_issue() {
  // Only the last lazily issuing average can have collectives left to issue (every start
  // settles the ones before it); for the others this is a no-op.
  for (auto& w : inflight_)
    if (auto p = w.lock()) detail::finish_issuing(*p);
}

bool Averager::scheduled(bool blocking, Request* out, const Prepare& prepare, ParamSet* lean_set) {
  require_usable(blocking ? "step()" : "start()");
  if (step_ >= kMaxStep)  // the counter never overflows; ranks at the same step all stop here
    throw InvalidArgument("hma: " + std::string(blocking ? "step()" : "start()") + ": the step counter is at hma's limit of 2^62 (" +
                          std::to_string(kMaxStep) + "); set_step() a smaller step to go on");
  const auto lvl = level_now();
  if (!member() || !lvl) {
    ++step_;
    return false;
  }
  settle_issue();  // a Timeout here concerns an earlier average: this step is not taken
  settle_outer(*lvl);
  bool did = false;
  try {
    if (const auto taken = lean_set ? lean(*lean_set, *lvl, true) : std::nullopt) did = *taken;
    else did = issue(prepared(prepare, *lvl, blocking, true), *lvl, blocking, out);
  } catch (const Timeout&) {
    ++step_;  // this average is pending on its set (params.wait() resumes it): the step is taken
    throw;
  }
  ++step_;
  return did;
}

bool Averager::at_level(std::size_t level, bool blocking, Request* out, const Prepare& prepare,
                        ParamSet* lean_set) {
  require_usable(blocking ? "average()" : "start_average()");
  if (!member()) return false;
  if (level >= hierarchy_.num_levels())
    refuse(level, "level " + std::to_string(level) + " out of range: this averager has levels 0 to " +
                      std::to_string(hierarchy_.num_levels() - 1));
  settle_issue();
  settle_outer(level);
  if (const auto taken = lean_set ? lean(*lean_set, level, false) : std::nullopt) return *taken;
  return issue(prepared(prepare, level, blocking, false), level, blocking, out);
}

detail::Prepared Averager::Prepare::operator()(std::size_t level, bool blocking, bool scheduled) const {
  return fn_(obj_, level, blocking, scheduled);
}

detail::Prepared Averager::prepared(const Prepare& prepare, std::size_t level, bool blocking, bool scheduled) {
  try {
    return prepare(level, blocking, scheduled);
  } catch (const InvalidArgument& e) {
    // A set this rank cannot average (its kind, its device, its stream): the group hears of it.
    std::string_view why = e.what();
    if (why.starts_with("hma: ")) why.remove_prefix(5);
    refuse(scheduled ? std::nullopt : std::optional<std::size_t>(level), std::string(why));
  }
}

void Averager::refuse(std::optional<std::size_t> level, const std::string& reason) {
  require_usable(level ? "average()" : "step()");
  const std::string local = "hma: step " + std::to_string(step_) + ": " + reason;
  // An out-of-range level is checked with the world level's group (the last level).
  const std::optional<std::size_t> lvl =
      level ? std::min(*level, hierarchy_.num_levels() - 1) : level_now();
  // No average at this step, or no check to carry the verdict: nobody waits for this rank.
  if (!member() || !lvl || (!settings_.check && settings_.nonfinite == NonFinite::ignore))
    throw InvalidArgument(local);
  settle_issue();
  settle_outer(*lvl);
  const auto p = new_pending(*lvl, 0);
  p->launch = [](detail::Pending& q) { q.finish = [] {}; };  // never runs: the check fails
  detail::Header h;
  h.v[detail::Header::step] = static_cast<std::uint64_t>(step_);
  h.v[detail::Header::call] = level ? 1 : 0;
  h.v[detail::Header::level] = *lvl;
  p->control.start(hierarchy_.control(*lvl).get(), h, false, p->weight, reason);
  try {
    detail::complete(*p, true);
  } catch (const Timeout&) {
    detail::keep_forever(p);  // MPI still owns its check's buffers
    throw;
  }
  throw InvalidArgument(local);  // not reached: the check names this rank
}

bool Averager::issue(detail::Prepared job, std::size_t level, bool blocking, Request* out) {
  detail::Pending& p = *job.p;
  p.call = static_cast<std::int64_t>(job.header.v[detail::Header::call]);
  // (already started by the lean path when it handed this average over)
  if (!p.control.started() && (settings_.check || settings_.nonfinite != NonFinite::ignore))
    p.control.start(hierarchy_.control(level).get(), job.header, job.nonfinite_here, p.weight);
  try {
    if (blocking) {
      detail::complete(p, true);
      return !p.skipped;
    }
    // start() returns once the group agreed and the data is on its way (a progress thread has
    // its job; polled collectives are issued and tested once).
    detail::launch_data(p);
    if (!worker_) (void)detail::complete(p, false);
  } catch (const Timeout&) {
    job.attach(job.p);  // still pending: the set's wait() resumes it
    throw;
  } catch (...) {
    // Something may be in flight (an MPI error after part of the data was issued): the set
    // keeps the average, so its destructor leaks what MPI may still use instead of freeing it.
    if (!p.done) job.attach(job.p);
    throw;
  }
  job.attach(job.p);
  *out = Request(std::move(job.p), level);
  return true;
}

namespace {
template <Storable T>
bool all_finite(detail::Bucket<T>& b) {
  bool ok = true;
  detail::for_segments(b, 0, b.size(), [&](std::size_t at, T* user, std::size_t n) {
    const T* x = user != nullptr ? user : b.storage.data() + at;
    if constexpr (std::same_as<T, bf16>) {
      for (std::size_t i = 0; i < n; ++i) ok &= (x[i].bits & 0x7f80u) != 0x7f80u;  // exponent all ones
    } else if constexpr (std::same_as<T, fp16>) {
      for (std::size_t i = 0; i < n; ++i) ok &= (x[i].bits & 0x7c00u) != 0x7c00u;
    } else {
      for (std::size_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
    }
  });
  return ok;
}
}  // namespace

detail::Header Averager::host_header(ParamSet& params, std::size_t level, bool scheduled) const {
  const auto& f = params.bucket<float>();
  const auto& d = params.bucket<double>();
  detail::Header h;
  h.v = {static_cast<std::uint64_t>(step_), scheduled ? 0u : 1u, level, 0, params.layout_fingerprint(),
         params.arrays(), f.owned, f.user_elems, d.owned, d.user_elems};
  return h;
}

detail::Route Averager::host_route(const ParamSet& params, std::size_t level, detail::Post* post) const {
  const Comm& comm = hierarchy_.level(level);
  detail::Route r;
  r.comm = comm.get();
  r.group = comm.size();
  r.rank = comm.rank();
  r.chunk_bytes = settings_.chunk_bytes;
  r.reduction = settings_.reduction;
  // auto: hma's ring was measured faster only over shared memory; across real nodes (TCP on
  // the emulated cluster: 1.4-2x slower) Open MPI's own network-aware allreduce wins.
  if (r.reduction == Reduction::automatic && !within_shared_memory(level)) r.reduction = Reduction::mpi;
  r.ring_min_block = settings_.ring_min_block_bytes;
  r.layout_agreed = settings_.check || settings_.nonfinite != NonFinite::ignore;  // issue() checks then
  r.wire = settings_.wire[level];
  // 16-bit arrays always travel flat: only the f32/f64 bytes decide two-level.
  r.two = use_two_level(level, params.bytes() - 2 * params.count16()) ? hierarchy_.two_level(level) : nullptr;
  r.per_node = hierarchy_.ranks_per_node();
  if (r.two != nullptr)
    r.split_min_piece = detail::split_min_piece(settings_.model, {r.group / r.per_node, r.per_node});
  r.level = static_cast<int>(level);
  r.step = step_;
  r.post = post;
  return r;
}

detail::Prepared Averager::prepare_host(ParamSet& params, std::size_t level, bool blocking,
                                        bool scheduled, std::shared_ptr<detail::Pending> started) {
  if (params.in_flight())
    throw Error("hma: step " + std::to_string(step_) +
                ": this ParamSet already has an average in flight; wait() on its Request first");
  params.drop_finished();  // its last average's record may then serve this one
  const Comm& comm = hierarchy_.level(level);
  detail::Prepared job;
  job.p = new_pending(level, params.bytes(), std::move(started));
  job.p->params = &params;
  auto& f = params.bucket<float>();
  auto& d = params.bucket<double>();
  const detail::HostBuckets buckets{&f, &d, &params.bucket<bf16>(), &params.bucket<fp16>()};
  job.header = host_header(params, level, scheduled);
  job.nonfinite_here = settings_.nonfinite != NonFinite::ignore &&
                       (!all_finite(f) || !all_finite(d) || !all_finite(*buckets.b) || !all_finite(*buckets.h));
  job.attach = [&params](std::shared_ptr<detail::Pending> q) { params.set_pending(std::move(q)); };
  std::shared_ptr<detail::Post> post = make_post(job.p, params.layout_fingerprint(), f.size(), d.size());
  if (post && params.count16() > 0)
    job.p->refusal = "hma: step " + std::to_string(step_) + ": level " + std::to_string(level) +
                     ": the outer optimizer and the divergence metric work on f32 and f64 arrays; "
                     "this set has bf16/fp16 arrays (" + params.describe() + "); nothing was averaged";
  if (comm.size() == 1) {  // averaging over one rank is the identity
    job.p->launch = [post, fp = &f, dp = &d](detail::Pending& q) {
      if (post) {
        post->before(*fp, 0, fp->size());
        post->before(*dp, 0, dp->size());
        post->after(*fp, 0, fp->size());
        post->after(*dp, 0, dp->size());
        post->conclude(MPI_COMM_NULL);
      }
      q.finish = [] {};
    };
    return job;
  }
  const detail::Route r = host_route(params, level, post.get());  // post: kept alive by the launch below
  if (detail::log_enabled(detail::LogLevel::debug))
    detail::log(detail::LogLevel::debug,
                "rank " + std::to_string(hierarchy_.world_rank()) + " step " +
                    std::to_string(step_) + ": level " + std::to_string(level) + " (group of " +
                    std::to_string(r.group) + "), " + std::to_string(params.bytes()) + " bytes" +
                    (r.two ? ", two-level" : ""));
  // Small enough to ride in the agreement check: the flat exact average (the same terms and one
  // order of additions per element; HMA_REDUCTION=mpi keeps the MPI library's own order).
  if (params.count16() == 0 && params.bytes() > 0 && params.bytes() <= small_[level].fused &&
      !job.p->control.started())  // (started: the lean path staged the payload and set land_fused)
    job.p->land_fused = detail::stage_fused(buckets, r.group, job.p->control);
  // The buckets and the scratch live on the heap: the data stage may run later (after a
  // timeout, from the set's wait()) or on the worker thread while the ParamSet moves.
  detail::Worker* w = worker_.get();
  if (blocking) {
    job.p->launch = [buckets, r, sc = scratch_.get(), w, post](detail::Pending& q) {
      if (w) w->drain();  // what the worker queued runs first: collectives stay in order
      detail::TimelineScope t("average", r.level, r.step, q.who.bytes, r.group);
      detail::average_host(buckets, r.weighted(q.weight_factor), *sc);
      q.finish = [] {};  // in place already
    };
  } else if (w) {
    job.p->launch = [buckets, r, sc = scratch_.get(), w, post](detail::Pending& q) {
      q.threaded = true;
      q.result = w->submit([buckets, r = r.weighted(q.weight_factor), sc, post] {
        if (detail::mpi_finalized()) throw Error("hma: a queued average did not run: MPI is already finalised");
        detail::average_host(buckets, r, *sc);
      });
    };
  } else {
    job.p->launch = [buckets, r, post](detail::Pending& q) {
      detail::TimelineScope t("start", r.level, r.step, q.who.bytes, r.group);
      detail::start_host(buckets, r.weighted(q.weight_factor), q);
    };
  }
  return job;
}

std::size_t Averager::outer_group() const {
  if (!outer_ || !member()) return 0;
  const int g = schedule_.levels()[outer_->opt.level].group_size;
  return static_cast<std::size_t>(hierarchy_.world_rank() / g);
}

void Averager::settle_outer(std::size_t level) {
  if (!outer_ || level != outer_->opt.level) return;
  if (auto q = outer_->last.lock(); q && !q->done) detail::complete(*q, true);
}

std::shared_ptr<detail::Post> Averager::make_post(const std::shared_ptr<detail::Pending>& pp,
                                                  std::uint64_t layout, std::size_t nf, std::size_t nd) {
  detail::Pending& p = *pp;
  std::shared_ptr<detail::OuterState> outer;
  if (outer_ && p.who.level == outer_->opt.level) {
    if (!outer_->anchored) {
      outer_->fingerprint = layout;
      outer_->anchor_f.assign(nf, 0.0f);
      outer_->m_f.assign(nf, 0.0f);
      outer_->anchor_d.assign(nd, 0.0);
      outer_->m_d.assign(nd, 0.0);
    }
    if (outer_->fingerprint != layout || outer_->anchor_f.size() != nf || outer_->anchor_d.size() != nd) {
      p.refusal = "hma: step " + std::to_string(p.who.step) + ": the outer optimizer at level " +
                  std::to_string(p.who.level) + " holds the state of another set (" +
                  std::to_string(outer_->anchor_f.size()) + " f32 and " +
                  std::to_string(outer_->anchor_d.size()) + " f64 elements); this set has " +
                  std::to_string(nf) + " f32 and " + std::to_string(nd) + " f64 elements" +
                  (outer_->anchor_f.size() == nf && outer_->anchor_d.size() == nd
                       ? " in another layout of arrays (a host ParamSet and a DeviceParamSet never share one)"
                       : "") +
                  ": use one averager per set with an outer optimizer; nothing was averaged";
      return nullptr;
    }
    outer = outer_;
    outer_->last = pp;
  }
  if (outer == nullptr && !divergence_) return nullptr;
  const bool speaker = !p.who.world_ranks.empty() && p.who.world_ranks.front() == hierarchy_.world_rank();
  return std::make_shared<detail::Post>(outer, divergence_, p.who.level, p.who.step, speaker);
}

std::optional<Divergence> Averager::last_divergence() const {
  if (!divergence_) return std::nullopt;
  std::lock_guard<std::mutex> lock(divergence_->mu);
  return divergence_->last;
}

bool Averager::step(ParamSet& params) {
  return scheduled(true, nullptr, [&](std::size_t l, bool b, bool s) { return prepare_host(params, l, b, s); },
                   &params);
}

Request Averager::start(ParamSet& params) {
  Request r;
  scheduled(false, &r, [&](std::size_t l, bool b, bool s) { return prepare_host(params, l, b, s); });
  return r;
}

void Averager::average(ParamSet& params, std::size_t level) {
  at_level(level, true, nullptr, [&](std::size_t l, bool b, bool s) { return prepare_host(params, l, b, s); },
           &params);
}

Request Averager::start_average(ParamSet& params, std::size_t level) {
  Request r;
  at_level(level, false, &r, [&](std::size_t l, bool b, bool s) { return prepare_host(params, l, b, s); });
  return r;
}

bool Averager::within_shared_memory(std::size_t level) const {
  return hierarchy_.emulated_nodes() || within_one_node(level);
}

bool Averager::within_one_node(std::size_t level) const {
  if (hierarchy_.num_nodes() <= 1) return true;  // (real or emulated nodes)
  const int rpn = hierarchy_.ranks_per_node();
  const int g = schedule_.levels()[level].group_size;
  return hierarchy_.contiguous_nodes() && rpn > 0 && g <= rpn && rpn % g == 0;
}

bool Averager::use_two_level(std::size_t level, std::size_t bytes) const {
  if (hierarchy_.two_level(level) == nullptr) return false;
  switch (settings_.algorithm) {
    case Algorithm::flat:
      return false;
    case Algorithm::two_level:
      return true;
    case Algorithm::automatic:
      break;
  }
  // Emulated nodes share one machine's memory: splitting the reduction buys nothing there.
  return !hierarchy_.emulated_nodes() && bytes >= two_level_from(level);
}

std::size_t Averager::two_level_from(std::size_t level) const {
  const int L = hierarchy_.ranks_per_node();
  if (L <= 0) return SIZE_MAX;
  const detail::Shape shape{schedule_.levels()[level].group_size / L, L};
  // The smallest power of two from which two-level stays predicted faster up to 1 GiB.
  std::size_t from = SIZE_MAX;
  for (std::size_t b = std::size_t{1} << 30; b >= 1024; b /= 2) {
    const double x = static_cast<double>(b);
    if (detail::predict_two_level_us(settings_.model, shape, x, settings_.chunk_bytes) <
        detail::predict_flat_us(settings_.model, shape, x))
      from = b;
    else
      break;
  }
  return from == 1024 ? 0 : from;
}

}  // namespace hma
