// The C API (include/hma/hma.h) over the C++ one: opaque handles own the C++ objects; every
// entry point runs inside guard(), which turns each exception into an hma_status and keeps its
// message for hma_last_error(). Nothing throws across the C boundary.
#include "hma/hma.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "control/agree.hpp"
#include "control/settings.hpp"
#include "hma/hma.hpp"

struct hma_paramset_s {
  hma::ParamSet ps;
  std::vector<std::variant<hma::Array<float>, hma::Array<double>>> owned;  // zero-copy, by index
};
struct hma_device_paramset_s {
  hma::DeviceParamSet ps;
  explicit hma_device_paramset_s(int device) : ps(device) {}
};
struct hma_averager_s {
  hma::Averager avg;
};
struct hma_request_s {
  hma::Request req;
};

namespace {

thread_local std::string g_last_error;

template <class F>
hma_status guard(F&& fn) noexcept {
  try {
    fn();
    return HMA_OK;
  } catch (const hma::MismatchError& e) {
    g_last_error = e.what();
    return HMA_ERR_MISMATCH;
  } catch (const hma::Timeout& e) {
    g_last_error = e.what();
    return HMA_ERR_TIMEOUT;
  } catch (const hma::NonFiniteError& e) {
    g_last_error = e.what();
    return HMA_ERR_NONFINITE;
  } catch (const std::invalid_argument& e) {  // hma::InvalidArgument
    g_last_error = e.what();
    return HMA_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc&) {
    g_last_error = "hma: out of memory";
    return HMA_ERR;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return HMA_ERR;
  } catch (...) {
    g_last_error = "hma: unknown error";
    return HMA_ERR;
  }
}

template <class T>
T& need(T* p, const char* what) {
  if (p == nullptr) throw hma::InvalidArgument(std::string("hma: ") + what + " is NULL");
  return *p;
}

// The set (and request slot) of a collective call: a NULL one on this rank is refused in the
// call's agreement check, so every rank of the group gets the error at once (Averager::refuse).
// `level`: average()/start_average()'s level, nullopt for step()/start().
template <class S>
auto& set_of(hma_averager avg, S* ps, std::optional<std::size_t> level, const char* fn,
             hma_request* request = nullptr, bool wants_request = false) {
  auto& a = need(avg, "avg").avg;
  if (ps == nullptr) a.refuse(level, std::string(fn) + ": ps is NULL");
  if (wants_request && request == nullptr) a.refuse(level, std::string(fn) + ": request is NULL");
  if (wants_request) *request = nullptr;
  return ps->ps;
}

template <class E>
E choice(int v, int max, const char* what) {
  if (v < 0 || v > max)
    throw hma::InvalidArgument(std::string("hma: options.") + what + " must be HMA_DEFAULT or 0.." +
                               std::to_string(max) + ", got " + std::to_string(v));
  return static_cast<E>(v);
}

hma::AveragerOptions to_options(const hma_options* o) {
  hma::AveragerOptions r;
  if (o == nullptr) return r;
  if (!(o->timeout_s < 0)) r.timeout_s = o->timeout_s;  // NaN reaches the C++ check, which names it
  if (o->chunk_bytes >= 0) r.chunk_bytes = static_cast<std::size_t>(o->chunk_bytes);
  if (o->progress != HMA_DEFAULT) r.progress = choice<hma::Progress>(o->progress, 1, "progress");
  // The HMA_* choices are numbered in the order of the C++ enums (auto first).
  if (o->reduction != HMA_DEFAULT) r.reduction = choice<hma::Reduction>(o->reduction, 2, "reduction");
  if (o->algorithm != HMA_DEFAULT) r.algorithm = choice<hma::Algorithm>(o->algorithm, 2, "algorithm");
  if (o->nonfinite != HMA_DEFAULT) r.nonfinite = choice<hma::NonFinite>(o->nonfinite, 2, "nonfinite");
  if (o->check != HMA_DEFAULT) r.check_every_average = choice<int>(o->check, 1, "check") == 1;
  if (o->ranks_per_node != HMA_DEFAULT) {
    if (o->ranks_per_node < 0)
      throw hma::InvalidArgument("hma: options.ranks_per_node must be HMA_DEFAULT, 0 (detect) or positive, got " +
                                 std::to_string(o->ranks_per_node));
    r.hierarchy.ranks_per_node = o->ranks_per_node;
  }
  if (!(o->outer_lr > 0 || std::isnan(o->outer_lr)) &&
      (o->outer_momentum != 0 || o->outer_nesterov != 0 || o->outer_level != HMA_DEFAULT))
    throw hma::InvalidArgument("hma: options.outer_momentum, outer_nesterov or outer_level is set but "
                               "options.outer_lr is not > 0 (the outer optimizer is on only with an lr > 0)");
  if (o->outer_lr > 0 || std::isnan(o->outer_lr)) {  // NaN reaches the C++ check, which names it
    if (o->outer_level < HMA_DEFAULT)
      throw hma::InvalidArgument("hma: options.outer_level must be HMA_DEFAULT (the last level) or a level, got " +
                                 std::to_string(o->outer_level));
    r.outer = hma::OuterOptimizer{o->outer_lr, o->outer_momentum, choice<int>(o->outer_nesterov, 1, "outer_nesterov") == 1,
                                  o->outer_level == HMA_DEFAULT ? std::nullopt
                                                                : std::optional<std::size_t>(static_cast<std::size_t>(o->outer_level))};
  }
  if (o->divergence != HMA_DEFAULT) r.divergence = choice<int>(o->divergence, 1, "divergence") == 1;
  if (o->wire != nullptr) r.wire = hma::detail::parse_wire(o->wire, "options.wire");
  return r;
}

// The two-call text protocol of hma_describe() and hma_checkpoint().
// A NULL buffer with capacity 0 only asks for the size.
void put_text(const std::string& s, char* buf, std::size_t capacity, std::size_t* needed) {
  if (needed != nullptr) *needed = s.size() + 1;
  if (buf == nullptr && capacity == 0) return;
  if (buf == nullptr)
    throw hma::InvalidArgument("hma: buf is NULL with capacity " + std::to_string(capacity) +
                               " (pass capacity 0 to ask for the size only)");
  if (capacity > 0) {
    const std::size_t n = std::min(capacity - 1, s.size());
    std::memcpy(buf, s.data(), n);
    buf[n] = '\0';
  }
  if (capacity < s.size() + 1)
    throw hma::Error("hma: the text needs " + std::to_string(s.size() + 1) + " bytes, the buffer has " +
                     std::to_string(capacity));
}

template <class T>
void allocate(hma_paramset ps, std::size_t n, T** data, std::size_t* index) {
  auto& p = need(ps, "ps");
  hma::Array<T> a = p.ps.allocate<T>(n);
  p.owned.emplace_back(a);
  if (data != nullptr) *data = a.data();
  if (index != nullptr) *index = p.owned.size() - 1;
}

template <class T>
void array(hma_paramset ps, std::size_t index, T** data, std::size_t* n) {
  auto& p = need(ps, "ps");
  const auto* a = index < p.owned.size() ? std::get_if<hma::Array<T>>(&p.owned[index]) : nullptr;
  if (a == nullptr)
    throw hma::InvalidArgument("hma: zero-copy array " + std::to_string(index) + " is not a " +
                               (std::is_same_v<T, double> ? "double" : "float") + " array of this set (it has " +
                               std::to_string(p.owned.size()) + " zero-copy arrays)");
  if (data != nullptr) *data = a->data();
  if (n != nullptr) *n = a->size();
}

static_assert(sizeof(hma::bf16) == 2 && sizeof(hma::fp16) == 2 && std::is_standard_layout_v<hma::bf16>);

template <class T>
void add(hma_paramset ps, T* data, std::size_t n) {
  need(ps, "ps").ps.add(std::span<T>(data, n));
}

// A collective create: the arguments are checked on every rank together (on a duplicate of
// comm), so a bad argument on one rank is an error on every rank, never a rank that returns
// early while the others wait in the constructor's collectives.
void create(MPI_Comm comm, hma_averager* out, const std::function<void()>& check,
            const std::function<hma::Averager()>& make) {
  if (out != nullptr) *out = nullptr;
  hma::detail::agree_on_duplicate(comm, [&](MPI_Comm) {
    need(out, "out");
    check();
  });
  *out = new hma_averager_s{make()};
}

hma_request new_request(hma::Request r) { return new hma_request_s{std::move(r)}; }

}  // namespace

const char* hma::version() noexcept { return HMA_VERSION_STRING; }

extern "C" {

void hma_options_init(hma_options* o) {
  if (o == nullptr) return;
  o->timeout_s = -1;
  o->chunk_bytes = -1;
  o->progress = o->reduction = o->algorithm = o->nonfinite = o->check = o->ranks_per_node = HMA_DEFAULT;
  o->outer_lr = -1;
  o->outer_momentum = 0;
  o->outer_nesterov = 0;
  o->outer_level = o->divergence = HMA_DEFAULT;
  o->wire = NULL;
}

const char* hma_version(void) { return hma::version(); }
const char* hma_last_error(void) { return g_last_error.c_str(); }

hma_status hma_paramset_create(hma_paramset* out) {
  return guard([&] {
    need(out, "out") = nullptr;
    *out = new hma_paramset_s;
  });
}
hma_status hma_paramset_free(hma_paramset* ps) {
  return guard([&] {
    if (ps == nullptr || *ps == nullptr) return;
    hma_paramset p = std::exchange(*ps, nullptr);
    delete p;
  });
}
hma_status hma_paramset_add_float(hma_paramset ps, float* data, size_t n) { return guard([&] { add(ps, data, n); }); }
hma_status hma_paramset_add_double(hma_paramset ps, double* data, size_t n) { return guard([&] { add(ps, data, n); }); }
hma_status hma_paramset_allocate_float(hma_paramset ps, size_t n, float** data, size_t* index) {
  return guard([&] { allocate(ps, n, data, index); });
}
hma_status hma_paramset_add_bf16(hma_paramset ps, uint16_t* data, size_t n) {
  // hma::bf16 is one uint16_t (standard layout): the caller's bit patterns are its elements.
  return guard([&] { add(ps, reinterpret_cast<hma::bf16*>(data), n); });
}
hma_status hma_paramset_add_fp16(hma_paramset ps, uint16_t* data, size_t n) {
  return guard([&] { add(ps, reinterpret_cast<hma::fp16*>(data), n); });
}
hma_status hma_paramset_allocate_double(hma_paramset ps, size_t n, double** data, size_t* index) {
  return guard([&] { allocate(ps, n, data, index); });
}
hma_status hma_paramset_array_float(hma_paramset ps, size_t index, float** data, size_t* n) {
  return guard([&] { array(ps, index, data, n); });
}
hma_status hma_paramset_array_double(hma_paramset ps, size_t index, double** data, size_t* n) {
  return guard([&] { array(ps, index, data, n); });
}
hma_status hma_paramset_wait(hma_paramset ps) { return guard([&] { need(ps, "ps").ps.wait(); }); }

hma_status hma_device_paramset_create(int device, hma_device_paramset* out) {
  return guard([&] {
    need(out, "out") = nullptr;
    *out = new hma_device_paramset_s(device);
  });
}
hma_status hma_device_paramset_free(hma_device_paramset* ps) {
  return guard([&] {
    if (ps == nullptr || *ps == nullptr) return;
    delete std::exchange(*ps, nullptr);
  });
}
hma_status hma_device_paramset_add_float(hma_device_paramset ps, float* device_data, size_t n) {
  return guard([&] { need(ps, "ps").ps.add(device_data, n); });
}
hma_status hma_device_paramset_add_double(hma_device_paramset ps, double* device_data, size_t n) {
  return guard([&] { need(ps, "ps").ps.add(device_data, n); });
}

hma_status hma_averager_create_periodic(MPI_Comm comm, int64_t period, int64_t warmup, const hma_options* options,
                                        hma_averager* out) {
  return guard([&] {
    hma::AveragerOptions o;
    create(comm, out, [&] { o = to_options(options); },
           [&] { return hma::Averager(hma::PeriodicAverager(comm, period, warmup, o)); });
  });
}
hma_status hma_averager_create(MPI_Comm comm, const char* schedule, int64_t warmup, const hma_options* options,
                               hma_averager* out) {
  return guard([&] {
    hma::AveragerOptions o;
    create(comm, out,
           [&] {
             o = to_options(options);
             (void)need(schedule, "schedule");
           },
           [&] { return hma::Averager(hma::HierarchicalAverager(comm, std::string_view(schedule), warmup, o)); });
  });
}
hma_status hma_averager_create_periodic_f(MPI_Fint comm, int64_t period, int64_t warmup, const hma_options* options,
                                          hma_averager* out) {
  return hma_averager_create_periodic(MPI_Comm_f2c(comm), period, warmup, options, out);
}
hma_status hma_averager_create_f(MPI_Fint comm, const char* schedule, int64_t warmup, const hma_options* options,
                                 hma_averager* out) {
  return hma_averager_create(MPI_Comm_f2c(comm), schedule, warmup, options, out);
}
hma_status hma_averager_free(hma_averager* avg) {
  return guard([&] {
    if (avg == nullptr || *avg == nullptr) return;
    delete std::exchange(*avg, nullptr);
  });
}

hma_status hma_step(hma_averager avg, hma_paramset ps, int* averaged) {
  return guard([&] {
    auto& set = set_of(avg, ps, std::nullopt, "hma_step");
    const bool did = avg->avg.step(set);
    if (averaged != nullptr) *averaged = did ? 1 : 0;
  });
}
hma_status hma_step_device(hma_averager avg, hma_device_paramset ps, void* stream, int* averaged) {
  return guard([&] {
    auto& set = set_of(avg, ps, std::nullopt, "hma_step_device");
    const bool did = avg->avg.step(set, static_cast<hma::Stream>(stream));
    if (averaged != nullptr) *averaged = did ? 1 : 0;
  });
}
hma_status hma_start(hma_averager avg, hma_paramset ps, hma_request* request) {
  return guard([&] {
    auto& set = set_of(avg, ps, std::nullopt, "hma_start", request, true);
    *request = new_request(avg->avg.start(set));
  });
}
hma_status hma_start_device(hma_averager avg, hma_device_paramset ps, void* stream, hma_request* request) {
  return guard([&] {
    auto& set = set_of(avg, ps, std::nullopt, "hma_start_device", request, true);
    *request = new_request(avg->avg.start(set, static_cast<hma::Stream>(stream)));
  });
}
hma_status hma_average(hma_averager avg, hma_paramset ps, size_t level) {
  return guard([&] {
    auto& set = set_of(avg, ps, level, "hma_average");
    avg->avg.average(set, level);
  });
}
hma_status hma_start_average(hma_averager avg, hma_paramset ps, size_t level, hma_request* request) {
  return guard([&] {
    auto& set = set_of(avg, ps, level, "hma_start_average", request, true);
    *request = new_request(avg->avg.start_average(set, level));
  });
}

hma_status hma_request_wait(hma_request request) { return guard([&] { need(request, "request").req.wait(); }); }
hma_status hma_request_test(hma_request request, int* done) {
  return guard([&] {
    const bool d = need(request, "request").req.test();
    if (done != nullptr) *done = d ? 1 : 0;
  });
}
hma_status hma_request_level(hma_request request, int* level) {
  return guard([&] {
    const auto l = need(request, "request").req.level();
    need(level, "level") = l ? static_cast<int>(*l) : -1;
  });
}
hma_status hma_request_free(hma_request* request) {
  return guard([&] {
    if (request == nullptr || *request == nullptr) return;
    delete std::exchange(*request, nullptr);  // ~Request: waits if in flight (at most one timeout)
  });
}

hma_status hma_set_weight(hma_averager avg, double weight) {
  return guard([&] { need(avg, "avg").avg.set_weight(weight); });
}
hma_status hma_weight(hma_averager avg, double* weight) {
  return guard([&] { need(weight, "weight") = need(avg, "avg").avg.weight(); });
}
hma_status hma_last_divergence(hma_averager avg, double* value, int* level, int64_t* step) {
  return guard([&] {
    const auto d = need(avg, "avg").avg.last_divergence();
    if (value != nullptr) *value = d ? d->value : 0.0;
    if (level != nullptr) *level = d ? static_cast<int>(d->level) : -1;
    if (step != nullptr) *step = d ? d->step : -1;
  });
}

hma_status hma_step_count(hma_averager avg, int64_t* step) {
  return guard([&] { need(step, "step") = need(avg, "avg").avg.step_count(); });
}
hma_status hma_set_step(hma_averager avg, int64_t step) { return guard([&] { need(avg, "avg").avg.set_step(step); }); }
hma_status hma_level_now(hma_averager avg, int* level) {
  return guard([&] {
    const auto l = need(avg, "avg").avg.level_now();
    need(level, "level") = l ? static_cast<int>(*l) : -1;
  });
}
hma_status hma_describe(hma_averager avg, char* buf, size_t capacity, size_t* needed) {
  return guard([&] { put_text(need(avg, "avg").avg.describe(), buf, capacity, needed); });
}
hma_status hma_checkpoint(hma_averager avg, char* buf, size_t capacity, size_t* needed) {
  return guard([&] { put_text(need(avg, "avg").avg.checkpoint(), buf, capacity, needed); });
}
hma_status hma_restore(hma_averager avg, const char* checkpoint) {
  // A NULL text still joins the collective restore, which then fails on every rank.
  return guard([&] { need(avg, "avg").avg.restore(checkpoint != nullptr ? checkpoint : "(NULL checkpoint)"); });
}
hma_status hma_save_checkpoint(hma_averager avg, const char* path) {
  return guard([&] { need(avg, "avg").avg.save_checkpoint(&need(path, "path")); });
}
hma_status hma_load_checkpoint(hma_averager avg, const char* path) {
  return guard([&] { need(avg, "avg").avg.load_checkpoint(path != nullptr ? path : ""); });
}

}  // extern "C"
