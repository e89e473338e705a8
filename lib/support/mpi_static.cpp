#include "support/mpi_static.hpp"

#include <atomic>
#include <mutex>

#include "hma/error.hpp"

namespace hma::detail {

namespace {
struct Owned {
  MPI_Op op;
  MPI_Datatype type;
};
int release(MPI_Comm, int, void* attr, void*) {
  auto* o = static_cast<Owned*>(attr);
  if (o->op != MPI_OP_NULL) MPI_Op_free(&o->op);
  if (o->type != MPI_DATATYPE_NULL) MPI_Type_free(&o->type);
  delete o;
  return MPI_SUCCESS;
}
}  // namespace

void free_at_finalize(MPI_Op op, MPI_Datatype type) {
  int key = MPI_KEYVAL_INVALID;
  check(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, &release, &key, nullptr),
        "MPI_Comm_create_keyval(free at finalize)");
  check(MPI_Comm_set_attr(MPI_COMM_SELF, key, new Owned{op, type}), "MPI_Comm_set_attr(free at finalize)");
}

bool mpi_finalized() noexcept {
  int fin = 0;
  MPI_Finalized(&fin);
  return fin != 0;
}

namespace {
// MPI_Finalize deletes MPI_COMM_SELF's attributes before anything else: a watch attribute there
// says it began, without asking MPI on every average.
std::atomic<bool> g_finalizing{false};
std::atomic<bool> g_watching{false};
int mark_finalizing(MPI_Comm, int, void*, void*) {
  g_finalizing.store(true, std::memory_order_release);
  return MPI_SUCCESS;
}
}  // namespace

bool mpi_finalizing() noexcept {
  if (g_watching.load(std::memory_order_acquire)) return g_finalizing.load(std::memory_order_acquire);
  if (mpi_finalized()) return true;
  int init = 0;
  MPI_Initialized(&init);
  if (init) {
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    int key = MPI_KEYVAL_INVALID;
    if (!g_watching.load(std::memory_order_relaxed) &&
        MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, &mark_finalizing, &key, nullptr) == MPI_SUCCESS &&
        MPI_Comm_set_attr(MPI_COMM_SELF, key, nullptr) == MPI_SUCCESS)
      g_watching.store(true, std::memory_order_release);
  }
  return false;
}

int mpi_world_rank() noexcept {
  int init = 0;
  MPI_Initialized(&init);
  if (!init || mpi_finalized()) return -1;
  int r = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

}  // namespace hma::detail
