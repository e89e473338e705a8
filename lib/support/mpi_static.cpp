#include "support/mpi_static.hpp"

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

int mpi_world_rank() noexcept {
  int init = 0;
  MPI_Initialized(&init);
  if (!init || mpi_finalized()) return -1;
  int r = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

}  // namespace hma::detail
