// The host transports behind one interface: which way a host average's bytes move.
#include "transport/host.hpp"

#include <algorithm>
#include <functional>
#include <utility>

#include "support/timeline.hpp"
#include "transport/allreduce.hpp"
#include "transport/elements.hpp"
#include "transport/post.hpp"
#include "transport/ring.hpp"
#include "transport/two_level.hpp"
#include "transport/uses.hpp"
#include "transport/wire.hpp"

namespace hma::detail {

namespace {

// Blocking average of one bucket in pieces of route.chunk_bytes, each still in cache while it is
// scaled, reduced and unpacked: through hma's ring (in place in the owned region and the user
// arrays, scaling fused) or through divide + MPI_Allreduce, chosen per piece.
template <Element T>
void flat_blocking(Bucket<T>& b, const Route& route, std::vector<T>& scratch) {
  const std::size_t piece = piece_elems(route.chunk_bytes, sizeof(T), max_count());
  for (std::size_t lo = 0; lo < b.size(); lo += piece) {
    const std::size_t hi = std::min(lo + piece, b.size());
    const std::size_t bytes = (hi - lo) * sizeof(T);
    const bool ring = route.reduction == Reduction::ring ||
                      (route.reduction == Reduction::automatic &&
                       bytes / static_cast<std::size_t>(route.group) >= route.ring_min_block);
    if (route.post) route.post->before(b, lo, hi);
    if (!ring) {
      allreduce_piece(b, lo, hi, route);
    } else {
      count_use(Use::ring_piece);
      TimelineScope t("ring allreduce (scaling fused)", route.level, route.step, bytes, route.group);
      const Runs<T> runs = Runs<T>::of(b, lo, hi);
      if (route.weight >= 0) {
        // The ring folds one division by g into its additions (the same for every term); weights
        // differ per rank, so each rank scales its own terms first and the ring only adds.
        const Scaler<T> w(route.group, route.weight);
        runs.each(0, runs.N, [&](T* p, std::size_t n, std::size_t) { w.in_place(p, n); });
        ring_average(runs, route.comm, route.rank, route.group, Scaler<T>(1), scratch, route.layout_agreed);
      } else {
        ring_average(runs, route.comm, route.rank, route.group, Scaler<T>(route.group), scratch, route.layout_agreed);
      }
    }
    if (route.post) {
      TimelineScope t("after (outer optimizer, divergence)", route.level, route.step, bytes, route.group);
      route.post->after(b, lo, hi);  // the piece is still in cache
    }
  }
}

// A started average's results into the arrays: the transport's own finishing step where it has
// one (two-level, 16-bit wire), else the unpack of the packed arrays.
void land(const std::function<void()>& finish, Bucket<float>& f, Bucket<double>& d) {
  if (finish) {
    finish();
  } else {
    unpack_bucket(f);
    unpack_bucket(d);
  }
}

template <Element T>
void two_level_with_post(Bucket<T>& b, const Route& route) {
  if (route.post) route.post->before(b, 0, b.size());
  two_level_blocking(b, route);
  if (route.post) route.post->after(b, 0, b.size());
}

}  // namespace

void average_host(const HostBuckets& s, const Route& route, Scratch& scratch) {
  Bucket<float>& f = *s.f;
  Bucket<double>& d = *s.d;
  if (route.two != nullptr) {  // a 16-bit wire only across nodes (two_level.cpp)
    two_level_with_post(f, route);
    two_level_with_post(d, route);
  } else if (route.wire != Wire::exact) {
    wire_blocking(f, d, route);
  } else {
    flat_blocking(f, route, scratch.f);
    flat_blocking(d, route, scratch.d);
  }
  half_blocking(*s.b, *s.h, route);  // 16-bit buffers: always flat (transport/wire.cpp)
  if (route.post) route.post->conclude(route.comm);
}

void start_host(const HostBuckets& s, const Route& route, Pending& p) {
  Bucket<float>& f = *s.f;
  Bucket<double>& d = *s.d;
  if (Post* post = route.post) {
    post->before(f, 0, f.size());
    post->before(d, 0, d.size());
  }
  if (route.two != nullptr) {  // a 16-bit wire only across nodes (two_level.cpp)
    start_two_level(f, d, route, p);
  } else if (route.wire != Wire::exact) {
    start_wire(f, d, route, p);
  } else {
    start_allreduce(f, route, p.reqs);
    start_allreduce(d, route, p.reqs);
  }
  if (s.b->size() + s.h->size() > 0) {
    start_half(*s.b, *s.h, route, p);
    // Their results land in the buckets' storage: the packed arrays get them at completion.
    p.finish = [prev = std::move(p.finish), fp = &f, dp = &d, bp = s.b, hp = s.h] {
      land(prev, *fp, *dp);
      unpack_bucket(*bp);
      unpack_bucket(*hp);
    };
  }
  if (Post* post = route.post; post != nullptr && !post->measures()) {
    // The outer optimizer alone: its pass when the average completes, after the results reached
    // the arrays (no stage: later averages need not wait for this one to issue theirs).
    p.finish = [prev = std::move(p.finish), post, fp = &f, dp = &d] {
      land(prev, *fp, *dp);
      post->after(*fp, 0, fp->size());
      post->after(*dp, 0, dp->size());
      post->record();
    };
  } else if (Post* post = route.post) {
    // One more stage once the data is in: the results into the arrays (the transport's finish,
    // or the unpack), the pass after the average, then the divergence maximum, if measured.
    p.stages.push_back([&p, post, fp = &f, dp = &d, comm = route.comm](std::vector<MPI_Request>& reqs) {
      land(std::exchange(p.finish, nullptr), *fp, *dp);
      post->after(*fp, 0, fp->size());
      post->after(*dp, 0, dp->size());
      post->start_conclude(comm, reqs);
      p.finish = [post] { post->record(); };
    });
  }
}

void stage_fused_terms(const HostBuckets& s, int group, ControlCheck& c) {
  Bucket<float>& f = *s.f;
  Bucket<double>& d = *s.d;
  const ControlCheck::Payload out = c.stage_payload(f.size(), d.size());
  if (f.size() > 0) scale_out(f, 0, f.size(), Scaler<float>(group), out.f);
  if (d.size() > 0) scale_out(d, 0, d.size(), Scaler<double>(group), out.d);
}

void land_fused(const HostBuckets& s, const ControlCheck& done) {
  count_use(Use::fused);
  if (s.f->size() > 0) copy_back(*s.f, 0, s.f->size(), done.fused_f());
  if (s.d->size() > 0) copy_back(*s.d, 0, s.d->size(), done.fused_d());
}

std::function<void(const ControlCheck&)> fused_lander(const HostBuckets& s) {
  // Two pointers: held inside the std::function, no allocation.
  return [f = s.f, d = s.d](const ControlCheck& done) { land_fused(HostBuckets{f, d, nullptr, nullptr}, done); };
}

std::function<void(const ControlCheck&)> stage_fused(const HostBuckets& s, int group, ControlCheck& c) {
  stage_fused_terms(s, group, c);
  return fused_lander(s);
}

}  // namespace hma::detail
