// hma built without CUDA: there is no CUDA backend (see device_backend.hpp, device_info()).
#include "device/device_backend.hpp"

namespace hma::detail {

DeviceBackend* cuda_backend() { return nullptr; }

}  // namespace hma::detail
