#include "support/mpi_library.hpp"

#include <mpi.h>

#include <vector>

#include "hma/error.hpp"
#include "hma/version.hpp"

#define HMA_STR2(x) #x
#define HMA_STR(x) HMA_STR2(x)

namespace hma {

const char* mpi_built() noexcept {
  // Recorded at build time: the mpi.h hma was compiled against.
#if defined(OPEN_MPI)
  return "Open MPI " HMA_STR(OMPI_MAJOR_VERSION) "." HMA_STR(OMPI_MINOR_VERSION) "." HMA_STR(OMPI_RELEASE_VERSION);
#elif defined(MPICH_VERSION)
  return "MPICH " MPICH_VERSION;
#else
  return "MPI " HMA_STR(MPI_VERSION) "." HMA_STR(MPI_SUBVERSION);
#endif
}

std::string mpi_library() {
  // The buffer is larger than any MPI's MPI_MAX_LIBRARY_VERSION_STRING (Open MPI 256, MPICH
  // 8192): the library that answers may be another than the mpi.h compiled against.
  std::vector<char> buf(1 << 15, '\0');
  int len = 0;
  if (MPI_Get_library_version(buf.data(), &len) != MPI_SUCCESS) return "unknown";
  std::string s(buf.data());
  const auto eol = s.find('\n');
  if (eol != std::string::npos) s.resize(eol);
  while (!s.empty() && (s.back() == ' ' || s.back() == ',' || s.back() == '\r')) s.pop_back();
  return s;
}

namespace detail {

std::string mpi_family(const std::string& text) {
  if (text.find("Open MPI") != std::string::npos) return "Open MPI";
  for (const char* m : {"MPICH", "MVAPICH", "Intel(R) MPI"})
    if (text.find(m) != std::string::npos) return "MPICH";
  return "";
}

void require_same_mpi(const char* who) {
  static const std::string running = mpi_library();
  static const std::string built_family = mpi_family(mpi_built());
  static const std::string running_family = mpi_family(running);
  if (built_family.empty() || running_family.empty() || built_family == running_family) return;
  throw Error(std::string("hma: ") + who + ": hma was built with " + mpi_built() +
              ", but the MPI library loaded in this process is " + running +
              ": build hma with the MPI of your program (meson -Dmpi=openmpi or -Dmpi=mpich), or "
              "link and launch your program (and mpi4py) with hma's MPI; communicators of one MPI "
              "are meaningless to the other");
}

void require_mpi(const char* who) {
  require_same_mpi(who);  // first: with another MPI loaded, nothing below means anything
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (!init)
    throw Error(std::string("hma: ") + who +
                ": MPI is not initialised; call MPI_Init (or MPI_Init_thread) first: hma never "
                "initialises MPI itself");
  if (fin) throw Error(std::string("hma: ") + who + ": MPI is already finalised");
}

}  // namespace detail
}  // namespace hma
