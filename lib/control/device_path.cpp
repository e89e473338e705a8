#include "control/device_path.hpp"

#include <mpi.h>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>
#endif

#include <cmath>
#include <cstdlib>

#include "control/model.hpp"

#include "hma/error.hpp"

namespace hma::detail {

const char* nonblocking_name(DeviceNonblocking n) {
  switch (n) {
    case DeviceNonblocking::iallreduce:
      return "device pointers to MPI_Iallreduce";
    case DeviceNonblocking::thread_direct:
      return "device pointers to MPI_Allreduce on the progress thread";
    case DeviceNonblocking::staged_poll:
      return "staged through pinned host memory, MPI_Iallreduce per chunk";
    case DeviceNonblocking::staged_thread:
      return "staged through pinned host memory, MPI_Allreduce per chunk on the progress thread";
  }
  return "?";
}

DevicePlan choose_device_plan(const DevicePathInputs& in) {
  DevicePlan p;
  std::string aware_why;
  if (in.cuda_aware_override >= 0) {
    p.cuda_aware = in.cuda_aware_override == 1;
    aware_why = std::string("HMA_CUDA_AWARE=") + (p.cuda_aware ? "1" : "0") +
                " (your setting, or AveragerOptions::cuda_aware)";
  } else if (in.mpix_query >= 0) {
    p.cuda_aware = in.mpix_query == 1;
    aware_why = std::string("MPIX_Query_cuda_support() = ") + (p.cuda_aware ? "1" : "0") +
                (p.cuda_aware ? "" : ": this MPI is not CUDA-aware");
  } else if (in.mv2_use_cuda && in.library.find("MVAPICH") != std::string::npos) {
    p.cuda_aware = true;
    aware_why = "MVAPICH2 with MV2_USE_CUDA=1";
  } else {
    p.cuda_aware = false;
    aware_why = "this MPI offers no MPIX_Query_cuda_support(): assumed not CUDA-aware (set "
                "HMA_CUDA_AWARE=1 if it is)";
  }
  const bool mvapich = in.library.find("MVAPICH") != std::string::npos;
  if (in.requested == DevicePath::direct && !p.cuda_aware)
    throw InvalidArgument("hma: device path 'direct' (HMA_DEVICE_PATH=direct or "
                          "AveragerOptions::device_path) hands device pointers to MPI, but " +
                          aware_why + "; use 'staged' or 'auto', or set HMA_CUDA_AWARE=1 if "
                          "this MPI really is CUDA-aware");
  // Where device pointers pay: a CUDA-aware MPI is not a fast one. Open MPI's coll/cuda (4.1)
  // and coll/accelerator (5.0), and MPICH, copy device buffers to host memory and reduce there;
  // on an H200 Open MPI 4.1's direct path measured 4-5x slower than hma's staged pipeline at
  // 16-128 MiB (README "Device buffers"). So auto hands device pointers to MPI only where the
  // MPI reduces on the device (MVAPICH2-GDR), or where a calibration measured direct faster.
  std::string direct_why;
  if (in.requested == DevicePath::staged) {
    direct_why = "HMA_DEVICE_PATH=staged (your setting, or AveragerOptions::device_path)";
  } else if (!p.cuda_aware) {
    direct_why = aware_why;
  } else if (in.requested == DevicePath::direct) {
    p.direct_from = 0;
    direct_why = aware_why + "; HMA_DEVICE_PATH=direct (your setting, or AveragerOptions::device_path)";
  } else if (mvapich) {
    p.direct_from = 0;
    direct_why = aware_why + "; MVAPICH2 reduces device buffers on the device";
  } else if (in.calibrated_direct_from > 0) {
    p.direct_from = in.calibrated_direct_from >= 1e18 ? SIZE_MAX
                                                      : static_cast<std::size_t>(std::ceil(in.calibrated_direct_from));
    direct_why = aware_why + "; the calibration (HMA_MODEL device_direct_from_bytes) measured direct faster "
                 "than staged from " + format_bytes(p.direct_from);
  } else {
    direct_why = aware_why + "; but " + (in.library.find("Open MPI") != std::string::npos ? "Open MPI" : "this MPI") +
                 " reduces device buffers on the host (Open MPI 4.1's coll/cuda through pageable copies: "
                 "4-5x slower than staged on an H200), so auto stages (HMA_DEVICE_PATH=direct, or a "
                 "calibration from hma-bench-device --calibrate, hands it device pointers)";
  }
  std::string nb_why;
  if (p.direct_from == SIZE_MAX) {
    p.nonblocking = in.thread_progress ? DeviceNonblocking::staged_thread : DeviceNonblocking::staged_poll;
    nb_why = direct_why;
  } else if (in.thread_progress) {
    p.nonblocking = DeviceNonblocking::thread_direct;
    nb_why = direct_why + "; progress thread: the blocking MPI_Allreduce runs on it";
  } else if (in.requested == DevicePath::direct || mvapich) {
    p.nonblocking = DeviceNonblocking::iallreduce;
    nb_why = direct_why + (in.requested == DevicePath::direct
                               ? ": device pointers go to MPI_Iallreduce even where the MPI does not "
                                 "document it (Open MPI does not: ompi#9845)"
                               : "; MVAPICH2 accepts device buffers in non-blocking collectives");
  } else {
    p.nonblocking = DeviceNonblocking::staged_poll;
    nb_why = direct_why + "; but " + (in.library.empty() ? "this MPI" : "Open MPI and most MPIs") +
             " do not accept device buffers in non-blocking collectives (ompi#9845), so start() "
             "stages (HMA_PROGRESS=thread runs MPI_Allreduce on device pointers instead)";
  }
  const std::string from = p.direct_from == 0 ? "" : " from " + format_bytes(p.direct_from) + ", staged below";
  const std::string sized = p.nonblocking == DeviceNonblocking::thread_direct ? from : "";
  p.why = std::string("device buffers: step()/average(): ") +
          (p.direct_from != SIZE_MAX ? "device pointers to MPI_Allreduce" + from
                                     : std::string("staged through pinned host memory, MPI_Allreduce per chunk")) +
          "; start(): " + nonblocking_name(p.nonblocking) + sized + " (" + nb_why + ")";
  return p;
}

DevicePathInputs detect_device_inputs() {
  DevicePathInputs in;
#if defined(OMPI_HAVE_MPI_EXT_CUDA) && OMPI_HAVE_MPI_EXT_CUDA
  in.mpix_query = MPIX_Query_cuda_support() != 0 ? 1 : 0;
#elif defined(MPIX_GPU_SUPPORT_CUDA)
  int v = 0;
  if (MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &v) == MPI_SUCCESS) in.mpix_query = v != 0 ? 1 : 0;
#endif
  const char* mv2 = std::getenv("MV2_USE_CUDA");
  in.mv2_use_cuda = mv2 != nullptr && std::string(mv2) == "1";
  char lib[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int len = 0;
  if (MPI_Get_library_version(lib, &len) == MPI_SUCCESS) {
    std::string s(lib, static_cast<std::size_t>(len));
    in.library = s.substr(0, s.find('\n'));
  }
  return in;
}

}  // namespace hma::detail
