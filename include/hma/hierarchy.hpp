// hma/hierarchy.hpp: the communicators of every averaging level, built once.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "hma/comm.hpp"

namespace hma {

struct HierarchyOptions {
  /// Ranks per node. 0 (default): the environment variable HMA_RANKS_PER_NODE if set, else
  /// the ranks that share memory (MPI_COMM_TYPE_SHARED). A value r > 0 groups MPI_COMM_WORLD
  /// ranks [k*r, (k+1)*r) into emulated node k; it must divide the MPI_COMM_WORLD size.
  int ranks_per_node = 0;
};

/// Owns the communicators of a hierarchy over `parent` (which it duplicates, so hma's traffic
/// never mixes with the caller's):
/// - world: all ranks of `parent`;
/// - one communicator per level: the contiguous block [k*g, (k+1)*g) holding this rank, built
///   with MPI_Comm_split (levels with equal group sizes share one; g == world size reuses world);
/// - node: the ranks on this rank's node (MPI_Comm_split_type(SHARED) or emulated, see options);
/// - inter_node: the ranks with the same node-local rank, one per node.
/// - control(i): a duplicate of level(i) that carries only hma's agreement checks (control plane),
///   so a check can never pair with a data collective of another rank.
/// Ranks per node is agreed across ranks (hma::MismatchError on every rank) before any split
/// depends on it. Every communicator is freed exactly once, when the Hierarchy dies. Construction is collective
/// over `parent`; it throws hma::InvalidArgument for a group size that does not divide the world
/// or a bad ranks-per-node. A null `parent` gives an empty hierarchy (this rank is not a member).
class Hierarchy {
 public:
  Hierarchy(MPI_Comm parent, std::span<const int> group_sizes, HierarchyOptions options = {});
  Hierarchy(Hierarchy&&) noexcept = default;
  Hierarchy& operator=(Hierarchy&&) noexcept = default;

  [[nodiscard]] bool member() const noexcept { return !world_.is_null(); }
  [[nodiscard]] const Comm& world() const noexcept { return world_; }
  [[nodiscard]] std::size_t num_levels() const noexcept { return level_slot_.size(); }
  /// The communicator of level `i` that holds this rank. Throws hma::InvalidArgument if out of range.
  [[nodiscard]] const Comm& level(std::size_t i) const;
  [[nodiscard]] int level_group_size(std::size_t i) const;
  /// The control communicator of level `i` (same ranks as level(i), another context).
  [[nodiscard]] const Comm& control(std::size_t i) const;
  /// MPI_COMM_WORLD ranks of this rank's group at level `i`, in group rank order.
  [[nodiscard]] const std::vector<int>& world_ranks(std::size_t i) const;
  /// Forgets every communicator without freeing it, and leaks the two-level routes that hold
  /// some: for when collectives may still be in flight on them (an average that timed out),
  /// where freeing would let MPI, or a leaked worker thread, touch freed state.
  void abandon() noexcept;
  [[nodiscard]] const Comm& node() const noexcept { return node_; }
  [[nodiscard]] const Comm& inter_node() const noexcept { return inter_node_; }
  [[nodiscard]] int world_rank() const noexcept { return world_rank_; }
  [[nodiscard]] int world_size() const noexcept { return world_size_; }
  [[nodiscard]] int node_index() const noexcept { return node_index_; }
  [[nodiscard]] int num_nodes() const noexcept { return num_nodes_; }
  /// Ranks per node when every node has the same count, else 0.
  [[nodiscard]] int ranks_per_node() const noexcept { return ranks_per_node_; }
  /// True when the nodes were emulated (HMA_RANKS_PER_NODE or options), not detected.
  [[nodiscard]] bool emulated_nodes() const noexcept { return emulated_; }
  /// True when every node holds a contiguous block of world ranks of equal size (torch-style
  /// groups then consist of whole nodes).
  [[nodiscard]] bool contiguous_nodes() const noexcept { return contiguous_nodes_; }
  /// For a level whose groups are made of several whole nodes: `intra`, this node's ranks of
  /// the group; `inter`, the group's ranks with this rank's node-local rank (one per node).
  struct TwoLevel {
    Comm intra, inter;
  };
  /// The two-level communicators of level `i`, or nullptr when its groups are not made of
  /// several whole nodes (then only the flat algorithm applies).
  [[nodiscard]] const TwoLevel* two_level(std::size_t i) const;
  /// Multi-line description of the nodes and levels, for logs.
  [[nodiscard]] std::string describe() const;

 private:
  Comm world_;
  std::vector<Comm> owned_levels_;   // one per distinct sub-world group size
  std::vector<int> level_sizes_;     // per level
  std::vector<int> level_slot_;      // per level: -1 = world, else index into owned_levels_
  std::vector<Comm> control_;        // per distinct level communicator: [0] world, [1 + slot]
  std::vector<std::vector<int>> world_ranks_;  // per level
  Comm node_, inter_node_;
  int world_rank_ = -1, world_size_ = 0, node_index_ = -1, num_nodes_ = 0, ranks_per_node_ = 0;
  bool emulated_ = false, contiguous_nodes_ = false;
  std::vector<std::unique_ptr<TwoLevel>> two_level_;  // per level, null when not applicable
};

}  // namespace hma
