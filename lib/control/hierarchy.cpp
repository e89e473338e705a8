#include "hma/hierarchy.hpp"

#include <cstdlib>
#include <string>

#include "control/agree.hpp"
#include "support/mpi_library.hpp"
#include "support/env.hpp"
#include "support/keep.hpp"
#include "hma/error.hpp"

namespace hma {

Hierarchy::Hierarchy(MPI_Comm parent, std::span<const int> group_sizes, HierarchyOptions options) {
  detail::require_mpi("Hierarchy");
  if (parent == MPI_COMM_NULL) return;
  world_ = Comm::attach(parent).dup();
  world_rank_ = world_.rank();
  world_size_ = world_.size();
  // Agreed before anything splits by it (ranks that disagree would call different splits).
  const int rpn = detail::agreed_ranks_per_node(world_.get(), options.ranks_per_node);

  level_sizes_.assign(group_sizes.begin(), group_sizes.end());
  std::vector<int> distinct;
  for (std::size_t i = 0; i < level_sizes_.size(); ++i) {
    const int g = level_sizes_[i];
    if (g < 1 || g > world_size_ || world_size_ % g != 0)
      throw InvalidArgument("hma: level " + std::to_string(i) + ": group size " + std::to_string(g) +
                            " must be positive and divide the world size " +
                            std::to_string(world_size_));
    if (g == world_size_) {
      level_slot_.push_back(-1);
      continue;
    }
    int slot = -1;
    for (std::size_t j = 0; j < distinct.size(); ++j)
      if (distinct[j] == g) slot = static_cast<int>(j);
    if (slot < 0) {
      slot = static_cast<int>(distinct.size());
      distinct.push_back(g);
      owned_levels_.push_back(world_.split(world_rank_ / g, world_rank_));
    }
    level_slot_.push_back(slot);
  }

  // Emulated nodes are blocks of MPI_COMM_WORLD ranks (where processes are placed), so a
  // sub-communicator sees the same nodes as the world does.
  int me = 0;
  check(MPI_Comm_rank(MPI_COMM_WORLD, &me), "MPI_Comm_rank(MPI_COMM_WORLD)");
  if (rpn > 0) {
    emulated_ = true;
    node_ = world_.split(me / rpn, world_rank_);
  } else {
    node_ = world_.split_shared();
  }
  const int local_rank = node_.rank();
  inter_node_ = world_.split(local_rank, world_rank_);
  // Nodes are numbered by the inter-node rank of their local rank 0, which we learn as the
  // position of this node among the nodes: rank of the node leader within the leaders' comm.
  node_index_ = detail::bcast_int(node_.get(), local_rank == 0 ? inter_node_.rank() : 0, 0);
  num_nodes_ = detail::min_max_sum(world_.get(), local_rank == 0 ? 1 : 0).sum;
  const auto nodes = detail::min_max_sum(world_.get(), node_.size());
  ranks_per_node_ = nodes.min == nodes.max ? nodes.min : 0;

  // Nodes in contiguous rank blocks? (node-local rank r sits at world rank first + r)
  const int first = world_rank_ - local_rank;
  const auto firsts = detail::min_max_sum(node_.get(), first);
  const bool contiguous = firsts.min == firsts.max && ranks_per_node_ > 0 && first % ranks_per_node_ == 0;
  contiguous_nodes_ = detail::min_max_sum(world_.get(), contiguous ? 1 : 0).min == 1;

  // The control plane: one duplicate per distinct level communicator, and who is in each group.
  control_.push_back(world_.dup());
  for (const Comm& c : owned_levels_) control_.push_back(c.dup());
  std::vector<int> mine(static_cast<std::size_t>(world_size_));
  MPI_Group wg = MPI_GROUP_NULL, g = MPI_GROUP_NULL;
  check(MPI_Comm_group(MPI_COMM_WORLD, &wg), "MPI_Comm_group");
  for (std::size_t i = 0; i < level_slot_.size(); ++i) {
    const Comm& lv = level(i);
    const int n = lv.size();
    std::vector<int> out(static_cast<std::size_t>(n));
    for (int k = 0; k < n; ++k) mine[static_cast<std::size_t>(k)] = k;
    check(MPI_Comm_group(lv.get(), &g), "MPI_Comm_group");
    check(MPI_Group_translate_ranks(g, n, mine.data(), wg, out.data()), "MPI_Group_translate_ranks");
    MPI_Group_free(&g);
    world_ranks_.push_back(std::move(out));
  }
  MPI_Group_free(&wg);

  // Two-level communicators for every level whose groups are made of several whole nodes.
  two_level_.resize(level_slot_.size());
  for (std::size_t i = 0; i < level_slot_.size(); ++i) {
    const int g = level_sizes_[i], L = ranks_per_node_;
    if (!contiguous_nodes_ || L < 1 || g <= L || g % L != 0) continue;
    const Comm& lv = level(i);
    const int r = lv.rank();
    TwoLevel t;
    t.intra = lv.split(r / L, r);  // this node's ranks within the group
    t.inter = lv.split(r % L, r);  // one rank per node: equal node-local rank
    two_level_[i] = std::make_unique<TwoLevel>(std::move(t));
  }
}

const Hierarchy::TwoLevel* Hierarchy::two_level(std::size_t i) const {
  (void)level(i);  // range check
  return two_level_[i].get();
}

const Comm& Hierarchy::level(std::size_t i) const {
  if (i >= level_slot_.size())
    throw InvalidArgument("hma: level " + std::to_string(i) + " out of range: the hierarchy has " +
                          std::to_string(level_slot_.size()) + " levels");
  const int slot = level_slot_[i];
  return slot < 0 ? world_ : owned_levels_[static_cast<std::size_t>(slot)];
}

int Hierarchy::level_group_size(std::size_t i) const { return level(i).size(); }

const Comm& Hierarchy::control(std::size_t i) const {
  (void)level(i);  // range check
  return control_[static_cast<std::size_t>(level_slot_[i] + 1)];
}

const std::vector<int>& Hierarchy::world_ranks(std::size_t i) const {
  (void)level(i);  // range check
  return world_ranks_[i];
}

void Hierarchy::abandon() noexcept {
  world_.release();
  for (Comm& c : owned_levels_) c.release();
  for (Comm& c : control_) c.release();
  node_.release();
  inter_node_.release();
  // A leaked average's route points at these: they stay, with their communicators.
  for (auto& t : two_level_) detail::keep_alive_forever(std::move(t));
}

std::string Hierarchy::describe() const {
  if (!member()) return "hma hierarchy: this rank is not a member\n";
  std::string s = "hma hierarchy: " + std::to_string(world_size_) + " ranks on " +
                  std::to_string(num_nodes_) + (emulated_ ? " emulated" : "") + " node(s)";
  s += ranks_per_node_ ? " of " + std::to_string(ranks_per_node_) + " ranks" +
                            (contiguous_nodes_ ? "\n" : ", not in contiguous rank blocks\n")
                      : " of unequal sizes\n";
  for (std::size_t i = 0; i < level_sizes_.size(); ++i) {
    const int g = level_sizes_[i];
    s += "  level " + std::to_string(i) + ": " + std::to_string(world_size_ / g) + " group(s) of " +
         std::to_string(g) + " contiguous ranks";
    if (g == world_size_) s += " (world)";
    else if (ranks_per_node_ && g == ranks_per_node_) s += " (one per node)";
    else if (ranks_per_node_ && g < ranks_per_node_) s += " (within a node)";
    else if (i < two_level_.size() && two_level_[i]) s += " (spans " + std::to_string(g / ranks_per_node_) + " whole nodes)";
    else s += " (spans nodes)";
    s += "\n";
  }
  return s;
}

}  // namespace hma
