// hma/version.hpp
#pragma once

#define HMA_VERSION_MAJOR 0
#define HMA_VERSION_MINOR 1
#define HMA_VERSION_PATCH 0
#define HMA_VERSION_STRING "0.1.0"
