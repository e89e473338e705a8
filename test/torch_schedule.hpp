// torch.distributed.algorithms.model_averaging's rules, transcribed independently of
// hma::Schedule (which is the code under test): the expected level of every step in the tests.
// Driven the way torch drives them: one average_parameters() call per step, `step` incremented
// after each call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace hma_test {

// PeriodicModelAverager.average_parameters():
//   if self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0:
//       utils.average_parameters_or_parameter_groups(params, self.process_group)
//   self.step += 1
struct TorchPeriodic {
  std::int64_t period, warmup, step = 0;
  std::optional<std::size_t> average_parameters() {
    std::optional<std::size_t> used;
    if (step >= warmup && (step - warmup) % period == 0) used = 0;
    step += 1;
    return used;
  }
};

// HierarchicalModelAverager.average_parameters():
//   if self.step >= self.warmup_steps:
//       group = self._find_process_group()   # for period in reversed(self._periods):
//       if group is not None:                #     if self.step % period == 0: return its group
//           utils.average_parameters_or_parameter_groups(params, group)
//   self.step += 1
struct TorchHierarchical {
  std::vector<std::int64_t> periods;
  std::int64_t warmup, step = 0;
  std::optional<std::size_t> average_parameters() {
    std::optional<std::size_t> used;
    if (step >= warmup)
      for (std::size_t i = periods.size(); i-- > 0;)
        if (step % periods[i] == 0) {
          used = i;
          break;
        }
    step += 1;
    return used;
  }
};

// torch's post-local SGD: PostLocalSGDState(start_localSGD_iter=S) with post_localSGD_hook
// allreduces the gradients over the world at every iteration before S ("world" here: the last
// level), and PostLocalSGDOptimizer calls the averager (warmup_steps = S) at every step; from
// S on only the averager communicates. `world` is the averager's last level.
template <class Averager>
struct TorchPostLocal {
  std::int64_t start_localSGD_iter;
  Averager averager;
  std::size_t world;
  std::int64_t iter = 0;
  std::optional<std::size_t> step() {
    std::optional<std::size_t> used = averager.average_parameters();
    if (iter < start_localSGD_iter) used = world;  // the hook's global allreduce
    iter += 1;
    return used;
  }
};

/// The levels torch averages at over steps 0..steps-1 (periodic: one period).
inline std::vector<std::optional<std::size_t>> torch_levels(bool periodic, const std::vector<std::int64_t>& periods,
                                                           std::int64_t warmup, std::int64_t steps) {
  std::vector<std::optional<std::size_t>> out;
  TorchPeriodic p{periods.empty() ? 1 : periods[0], warmup};
  TorchHierarchical h{periods, warmup};
  for (std::int64_t t = 0; t < steps; ++t) out.push_back(periodic ? p.average_parameters() : h.average_parameters());
  return out;
}

}  // namespace hma_test
