#include "control/settings.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <functional>
#include <string>

#include "control/agree.hpp"
#include "control/model.hpp"
#include "hma/error.hpp"
#include "support/env.hpp"
#include "support/log.hpp"

namespace hma::detail {

namespace {

std::size_t env_bytes(const char* name, std::size_t fallback, int lo = 0) {
  return static_cast<std::size_t>(
      env_int(name, static_cast<int>(fallback), lo, std::numeric_limits<int>::max()));
}

// HMA_TIMEOUT_S / AveragerOptions::timeout_s: seconds, "inf"; 0 and inf mean no limit.
double resolve_timeout(const std::optional<double>& option) {
  if (option) {
    if (!(*option >= 0))
      throw InvalidArgument("hma: AveragerOptions::timeout_s must be >= 0 seconds (0 or infinity: "
                            "no limit), got " + std::to_string(*option));
    return *option;
  }
  const std::string v = env_str("HMA_TIMEOUT_S", "");
  if (v.empty()) return AveragerOptions::kDefaultTimeoutS;
  char* end = nullptr;
  const double t = std::strtod(v.c_str(), &end);
  if (end == v.c_str() || *end != '\0' || !(t >= 0))
    throw InvalidArgument("hma: environment variable HMA_TIMEOUT_S='" + v +
                          "' must be a non-negative number of seconds or inf (0 or inf: no "
                          "limit; default 1800)");
  return t;
}

// HMA_STALL_WARN_S / AveragerOptions::stall_warn_s: seconds, 0 off.
double resolve_stall_warn(const std::optional<double>& option) {
  if (option) {
    if (!(*option >= 0) || *option == std::numeric_limits<double>::infinity())
      throw InvalidArgument("hma: AveragerOptions::stall_warn_s must be a finite number of seconds >= 0 "
                            "(0: no warning), got " + std::to_string(*option));
    return *option;
  }
  const std::string v = env_str("HMA_STALL_WARN_S", "");
  if (v.empty()) return AveragerOptions::kDefaultStallWarnS;
  char* end = nullptr;
  const double t = std::strtod(v.c_str(), &end);
  if (end == v.c_str() || *end != '\0' || !(t >= 0) || t == std::numeric_limits<double>::infinity())
    throw InvalidArgument("hma: environment variable HMA_STALL_WARN_S='" + v +
                          "' must be a finite number of seconds >= 0 (0: no warning; default 60)");
  return t;
}

}  // namespace

std::vector<Wire> parse_wire(const std::string& v, const std::string& what) {
  std::vector<Wire> out;
  std::size_t at = 0;
  while (at <= v.size()) {
    const std::size_t comma = std::min(v.find(',', at), v.size());
    const std::string tok = v.substr(at, comma - at);
    if (tok == "exact") out.push_back(Wire::exact);
    else if (tok == "bf16") out.push_back(Wire::bf16);
    else if (tok == "fp16") out.push_back(Wire::fp16);
    else
      throw InvalidArgument("hma: " + what + "='" + v + "': '" + tok +
                            "' is not exact, bf16 or fp16 (one per level, or one for all)");
    at = comma + 1;
  }
  return out;
}

namespace {

// "lr=0.7,momentum=0.9,nesterov,level=1" (HMA_OUTER); errors quote the token.
OuterOptimizer parse_outer(const std::string& v) {
  OuterOptimizer o;
  std::size_t at = 0;
  while (at <= v.size()) {
    const std::size_t comma = std::min(v.find(',', at), v.size());
    const std::string tok = v.substr(at, comma - at), key = tok.substr(0, tok.find('='));
    const std::string val = tok.find('=') == std::string::npos ? "" : tok.substr(tok.find('=') + 1);
    auto bad = [&](const std::string& why) {
      throw InvalidArgument("hma: environment variable HMA_OUTER='" + v + "': token '" + tok +
                            "': " + why + " (write e.g. lr=0.7,momentum=0.9,nesterov[,level=1])");
    };
    char* end = nullptr;
    const double x = val.empty() ? 0 : std::strtod(val.c_str(), &end);
    const bool number = !val.empty() && end != nullptr && *end == '\0';
    if (key == "lr" || key == "momentum") {
      if (!number) bad("expected " + key + "=<number>");
      (key == "lr" ? o.lr : o.momentum) = x;
    } else if (key == "level") {
      if (!number || x < 0 || x != std::floor(x)) bad("expected level=<level index>");
      o.level = static_cast<std::size_t>(x);
    } else if (tok == "nesterov") {
      o.nesterov = true;
    } else {
      bad("unknown; the keys are lr, momentum, nesterov and level");
    }
    at = comma + 1;
  }
  return o;
}

OuterSettings resolve_outer(const std::optional<OuterOptimizer>& option) {
  OuterSettings s;
  std::optional<OuterOptimizer> o = option;
  const std::string env = env_str("HMA_OUTER", "");
  if (!o && !env.empty()) o = parse_outer(env);
  if (!o) return s;
  const std::string from = option ? "AveragerOptions::outer" : "HMA_OUTER";
  if (!(o->lr > 0) || !std::isfinite(o->lr))
    throw InvalidArgument("hma: " + from + ": lr must be finite and > 0, got " + std::to_string(o->lr));
  if (!(o->momentum >= 0 && o->momentum < 1))
    throw InvalidArgument("hma: " + from + ": momentum must be in [0, 1), got " + std::to_string(o->momentum));
  if (o->nesterov && o->momentum == 0)
    throw InvalidArgument("hma: " + from + ": nesterov needs a momentum > 0 (as torch.optim.SGD)");
  s.enabled = true;
  s.lr = o->lr;
  s.momentum = o->momentum;
  s.nesterov = o->nesterov;
  s.level = o->level.value_or(SIZE_MAX);
  return s;
}

std::vector<Wire> resolve_wire(const std::optional<std::vector<Wire>>& option) {
  if (option) return *option;
  const std::string v = env_str("HMA_WIRE", "");
  if (v.empty()) return {};
  return parse_wire(v, "environment variable HMA_WIRE");
}

}  // namespace

Settings resolve_settings(const AveragerOptions& o) {
  Settings s;
  s.check = o.check_every_average.value_or(env_bool("HMA_CHECK", true));
  s.chunk_bytes = o.chunk_bytes.value_or(env_bytes("HMA_CHUNK_BYTES", AveragerOptions::kDefaultChunkBytes));
  s.reduction = o.reduction ? *o.reduction
                            : env_choice("HMA_REDUCTION", Reduction::automatic,
                                         {{"auto", Reduction::automatic},
                                          {"mpi", Reduction::mpi},
                                          {"ring", Reduction::ring}});
  s.ring_min_block_bytes =
      env_bytes("HMA_RING_MIN_BLOCK_BYTES", AveragerOptions::kDefaultRingMinBlockBytes);
  s.timeout_s = resolve_timeout(o.timeout_s);
  s.stall_warn_s = resolve_stall_warn(o.stall_warn_s);
  if (const char* m = std::getenv("HMA_MODEL"); m != nullptr && *m != 0) {
    s.model = read_link_model(m);
    s.model_source = m;
  }
  s.nonfinite = o.nonfinite ? *o.nonfinite
                            : env_choice("HMA_NONFINITE", NonFinite::ignore,
                                         {{"off", NonFinite::ignore},
                                          {"throw", NonFinite::error},
                                          {"skip", NonFinite::skip}});
  s.algorithm = o.algorithm ? *o.algorithm
                            : env_choice("HMA_ALGORITHM", Algorithm::automatic,
                                         {{"auto", Algorithm::automatic},
                                          {"flat", Algorithm::flat},
                                          {"two_level", Algorithm::two_level}});
  s.progress = o.progress ? *o.progress
                          : env_choice("HMA_PROGRESS", Progress::poll,
                                       {{"poll", Progress::poll}, {"thread", Progress::thread}});
  if (s.progress == Progress::thread) {
    int provided = MPI_THREAD_SINGLE;
    check(MPI_Query_thread(&provided), "MPI_Query_thread");
    if (provided < MPI_THREAD_MULTIPLE)
      throw InvalidArgument(
          "hma: progress thread (HMA_PROGRESS=thread or AveragerOptions::progress) needs MPI "
          "initialised with MPI_Init_thread(MPI_THREAD_MULTIPLE); this MPI provides level " +
          std::to_string(provided));
  }
  s.staging_chunk_bytes = o.staging_chunk_bytes.value_or(
      env_bytes("HMA_STAGING_CHUNK_BYTES", AveragerOptions::kDefaultStagingChunkBytes));
  s.staging_slots = o.staging_slots.value_or(static_cast<std::size_t>(
      env_int("HMA_STAGING_SLOTS", static_cast<int>(AveragerOptions::kDefaultStagingSlots), 1, 64)));
  if (s.staging_slots < 1 || s.staging_slots > 64)
    throw InvalidArgument("hma: AveragerOptions::staging_slots must be in [1, 64], got " +
                          std::to_string(s.staging_slots));
  s.ranks_per_node = ranks_per_node_setting(o.hierarchy.ranks_per_node);
  s.device_division = o.device_division ? *o.device_division
                                        : env_choice("HMA_DEVICE_DIVISION", DeviceDivision::divide,
                                                     {{"divide", DeviceDivision::divide},
                                                      {"reciprocal", DeviceDivision::reciprocal}});
  s.outer = resolve_outer(o.outer);
  s.divergence = o.divergence.value_or(env_bool("HMA_DIVERGENCE", false));
  s.device_ipc = o.device_ipc.value_or(env_bool("HMA_DEVICE_IPC", true));
  s.check_shm = env_bool("HMA_CHECK_SHM", true);
  if (!env_str("HMA_IPC_TWO_SHOT_BYTES", "").empty())
    s.ipc_two_shot_bytes = env_bytes("HMA_IPC_TWO_SHOT_BYTES", 0);
  s.wire = resolve_wire(o.wire);
  (void)log_level();  // validates HMA_LOG on every rank
  return s;
}

DevicePlan resolve_device_plan(const AveragerOptions& o, const Settings& s) {
  DevicePathInputs in = detect_device_inputs();
  in.requested = o.device_path ? *o.device_path
                               : env_choice("HMA_DEVICE_PATH", DevicePath::automatic,
                                            {{"auto", DevicePath::automatic},
                                             {"staged", DevicePath::staged},
                                             {"direct", DevicePath::direct}});
  if (o.cuda_aware) in.cuda_aware_override = *o.cuda_aware ? 1 : 0;
  else if (!env_str("HMA_CUDA_AWARE", "").empty())
    in.cuda_aware_override = env_bool("HMA_CUDA_AWARE", false) ? 1 : 0;
  in.thread_progress = s.progress == Progress::thread;
  in.calibrated_direct_from = s.model.device_direct_from_bytes;
  return choose_device_plan(in);
}

namespace {
std::uint64_t bits(double x) {
  std::uint64_t b = 0;
  std::memcpy(&b, &x, sizeof x);
  return b;
}
}  // namespace

std::string outer_text(const OuterSettings& o) {
  char t[96];
  std::snprintf(t, sizeof t, "lr %.17g momentum %.17g%s", o.lr, o.momentum, o.nesterov ? " nesterov" : "");
  return std::string(t) + (o.level == SIZE_MAX ? " at the last level" : " at level " + std::to_string(o.level));
}

std::string wire_text(const std::vector<Wire>& w) {
  if (w.empty()) return "exact";
  std::string t;
  for (Wire x : w) t += std::string(t.empty() ? "" : ",") + (x == Wire::exact ? "exact" : x == Wire::bf16 ? "bf16" : "fp16");
  return t;
}

void check_settings(MPI_Comm comm, const Settings& s, const DevicePlan& plan) {
  std::uint64_t timeout_bits = 0;
  // Every "no limit" (0, -0, inf, > 1e9 s: see deadline_after) compares as 0.
  const double t = !(s.timeout_s > 0) || s.timeout_s > 1e9 ? 0.0 : s.timeout_s;
  std::memcpy(&timeout_bits, &t, sizeof t);
  const std::uint64_t v[] = {s.chunk_bytes,
                             static_cast<std::uint64_t>(s.reduction),
                             s.ring_min_block_bytes,
                             static_cast<std::uint64_t>(s.algorithm),
                             static_cast<std::uint64_t>(s.progress),
                             static_cast<std::uint64_t>(s.nonfinite),
                             s.check ? 1u : 0u,
                             timeout_bits,
                             static_cast<std::uint64_t>(s.ranks_per_node),
                             static_cast<std::uint64_t>(s.device_division),
                             static_cast<std::uint64_t>(plan.direct_from),
                             static_cast<std::uint64_t>(plan.nonblocking),
                             s.staging_chunk_bytes,
                             bits(s.model.inter_alpha_us),
                             bits(s.model.inter_bytes_per_s),
                             bits(s.model.inter_duplex),
                             bits(s.model.intra_alpha_us),
                             bits(s.model.intra_bytes_per_s),
                             bits(s.model.flat_bytes_per_s),
                             bits(s.model.device_direct_from_bytes),
                             s.outer.enabled ? 1u : 0u,
                             bits(s.outer.lr),
                             bits(s.outer.momentum),
                             s.outer.nesterov ? 1u : 0u,
                             s.outer.level,
                             s.divergence ? 1u : 0u,
                             s.device_ipc ? 1u : 0u,
                             s.ipc_two_shot_bytes,
                             s.check_shm ? 1u : 0u,
                             std::hash<std::string>{}(wire_text(s.wire))};
  check_same(comm, v, "the averaging settings (HMA_* variables or AveragerOptions)", [&] {
    char secs[40];
    std::snprintf(secs, sizeof secs, "%.17g", t);
    return "chunk bytes " + std::to_string(s.chunk_bytes) + ", reduction " +
           std::to_string(static_cast<int>(s.reduction)) + ", ring min block " +
           std::to_string(s.ring_min_block_bytes) + ", algorithm " +
           std::to_string(static_cast<int>(s.algorithm)) + ", progress " +
           (s.progress == Progress::thread ? "thread" : "poll") + ", non-finite " +
           std::to_string(static_cast<int>(s.nonfinite)) + ", check " + (s.check ? "on" : "off") +
           ", timeout " + secs + " s, ranks per node " + std::to_string(s.ranks_per_node) + ", " +
           plan.why + ", staging chunk bytes " + std::to_string(s.staging_chunk_bytes) +
           ", device division " + (s.device_division == DeviceDivision::divide ? "divide" : "reciprocal") +
           ", cost model " + s.model_source + " (" + format_link_model(s.model) + ")" +
           ", outer " + (s.outer.enabled ? outer_text(s.outer) : "none") + ", divergence " +
           (s.divergence ? "on" : "off") + ", node transport " + (s.device_ipc ? "on" : "off") + (s.ipc_two_shot_bytes == SIZE_MAX ? std::string(" (one-shot)")
                                      : " (two-shot from " + std::to_string(s.ipc_two_shot_bytes) + " bytes)") +
           ", wire " + wire_text(s.wire) + ", check through shared memory " + (s.check_shm ? "on" : "off");
  });
}

}  // namespace hma::detail
