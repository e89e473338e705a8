#include "transport/post.hpp"

#include <cmath>
#include <cstdio>

#include "hma/error.hpp"
#include "support/log.hpp"
#include "transport/elements.hpp"

namespace hma::detail {

Post::Post(std::shared_ptr<OuterState> outer, std::shared_ptr<DivergenceLog> log, std::size_t level,
           std::int64_t step, bool speaker)
    : outer_(std::move(outer)), first_(outer_ != nullptr && !outer_->anchored), log_(std::move(log)),
      level_(level), step_(step), speaker_(speaker) {}

template <>
std::vector<float>& Post::keep<float>() { return keep_f_; }
template <>
std::vector<double>& Post::keep<double>() { return keep_d_; }

template <Element T>
void Post::before(Bucket<T>& b, std::size_t lo, std::size_t hi) {
  if (!log_) return;
  auto& k = keep<T>();
  k.resize(hi - lo);
  const T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    const T* x = user != nullptr ? user : data + at;
    std::copy(x, x + n, k.data() + (at - lo));
  });
}

template <Element T>
void Post::pass(T* x, const T* in, std::size_t at, std::size_t n, double& dev2, double& mean2) {
  if (in != nullptr) {
    // Four independent sums of each: one running sum is bound by the adder's latency (the
    // compiler may not reassociate it), four let it pipeline and vectorise.
    double s[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (std::size_t j = 0; j < 4; ++j) {
        const double a = static_cast<double>(x[i + j]), d = static_cast<double>(in[i + j]) - a;
        s[j] += d * d;
        q[j] += a * a;
      }
    for (; i < n; ++i) {
      const double a = static_cast<double>(x[i]), d = static_cast<double>(in[i]) - a;
      s[0] += d * d;
      q[0] += a * a;
    }
    dev2 += (s[0] + s[1]) + (s[2] + s[3]);
    mean2 += (q[0] + q[1]) + (q[2] + q[3]);
  }
  if (outer_ == nullptr) return;
  T* anc = nullptr;
  T* m = nullptr;
  if constexpr (std::same_as<T, float>) {
    anc = outer_->anchor_f.data() + at;
    m = outer_->m_f.data() + at;
  } else {
    anc = outer_->anchor_d.data() + at;
    m = outer_->m_d.data() + at;
  }
  if (first_) {
    std::copy(x, x + n, anc);
    std::fill(m, m + n, T(0));
    return;
  }
  const T lr = static_cast<T>(outer_->opt.lr);
  const T mu = static_cast<T>(outer_->opt.momentum);
  const bool nesterov = outer_->opt.nesterov;
  // x = anchor - lr d, written as a - (lr d - delta): with lr 1 and momentum 0 that is
  // a - (delta - delta) = a - (+0) = a, bit for bit (also for -0).
  for (std::size_t i = 0; i < n; ++i) {
    const T a = x[i], delta = anc[i] - a;
    const T mm = mu * m[i] + delta;
    const T d = nesterov ? delta + mu * mm : mm;
    const T nx = a - (lr * d - delta);
    m[i] = mm;
    anc[i] = nx;
    x[i] = nx;
  }
}

template <Element T>
void Post::after(Bucket<T>& b, std::size_t lo, std::size_t hi) {
  const T* kept = log_ ? keep<T>().data() : nullptr;
  T* data = b.storage.data();
  double dev2 = 0, mean2 = 0;
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    pass(user != nullptr ? user : data + at, kept ? kept + (at - lo) : nullptr, at, n, dev2, mean2);
  });
  dev2_ += dev2;
  mean2_ += mean2;
}

void Post::size_inputs(std::size_t nf, std::size_t nd) {
  if (!log_) return;
  keep_f_.resize(nf);
  keep_d_.resize(nd);
}

template <Element T>
void Post::before_packed(const T* x, std::size_t at, std::size_t n) {
  if (!log_) return;
  std::copy(x, x + n, keep<T>().data() + at);
}

template <Element T>
void Post::after_packed(T* x, std::size_t at, std::size_t n) {
  double dev2 = 0, mean2 = 0;
  pass(x, log_ ? keep<T>().data() + at : nullptr, at, n, dev2, mean2);
  dev2_ += dev2;
  mean2_ += mean2;
}

void Post::conclude(MPI_Comm comm) {
  if (log_ && comm != MPI_COMM_NULL) {
    check(MPI_Allreduce(&dev2_, &max_dev2_, 1, MPI_DOUBLE, MPI_MAX, comm),
          "MPI_Allreduce(divergence)");
    reduced_ = true;
  }
  record();
}

void Post::start_conclude(MPI_Comm comm, std::vector<MPI_Request>& reqs) {
  if (!log_) return;
  MPI_Request r = MPI_REQUEST_NULL;
  check(MPI_Iallreduce(&dev2_, &max_dev2_, 1, MPI_DOUBLE, MPI_MAX, comm, &r),
        "MPI_Iallreduce(divergence)");
  reqs.push_back(r);
  reduced_ = true;
}

void Post::record() {
  if (outer_ != nullptr) outer_->anchored = true;
  if (!log_) return;
  const double dev = std::sqrt(reduced_ ? max_dev2_ : dev2_), mean = std::sqrt(mean2_);
  Divergence d{level_, step_, dev == 0 ? 0.0 : dev / mean};  // x / 0 = inf
  {
    std::lock_guard<std::mutex> lock(log_->mu);
    log_->last = d;
  }
  if (speaker_ && log_enabled(LogLevel::info)) {
    char t[160];
    std::snprintf(t, sizeof t, "step %lld level %zu: divergence %.6g (max over ranks of ||x_i - mean|| / ||mean||)",
                  static_cast<long long>(step_), level_, d.value);
    log(LogLevel::info, t);
  }
}

template void Post::before(Bucket<float>&, std::size_t, std::size_t);
template void Post::before(Bucket<double>&, std::size_t, std::size_t);
template void Post::after(Bucket<float>&, std::size_t, std::size_t);
template void Post::after(Bucket<double>&, std::size_t, std::size_t);
template void Post::before_packed(const float*, std::size_t, std::size_t);
template void Post::before_packed(const double*, std::size_t, std::size_t);
template void Post::after_packed(float*, std::size_t, std::size_t);
template void Post::after_packed(double*, std::size_t, std::size_t);

}  // namespace hma::detail
