// hma/version.hpp: the version of these headers (the macros) and of the library (hma::version()).
// meson.build refuses to configure when HMA_VERSION_STRING differs from the project's version.
#pragma once

#define HMA_VERSION_MAJOR 0
#define HMA_VERSION_MINOR 2
#define HMA_VERSION_PATCH 0
#define HMA_VERSION_STRING "0.2.0"

namespace hma {
/// The version of the hma library linked in, e.g. "0.2.0" (compare with HMA_VERSION_STRING to
/// catch headers and library from different installs). Same as hma_version() in the C API.
const char* version() noexcept;
}  // namespace hma
