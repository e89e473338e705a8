// Kernels for the GPU tests and the device benchmark (test/gpu/gpu_kernels.cu, CUDA builds only).
#pragma once

#include <cstddef>
#include <cstdint>

#include "hma/device.hpp"

namespace hma_gpu {

/// p[i] = 24 * ((r * 7 + i * 3 + t * 5) % 17 - 8) (test_device.cpp's value()), on `s`, after
/// spinning for about `spin_us` microseconds: a slow producer, to catch missing stream order.
void fill_values(float* p, std::size_t n, std::size_t first, int r, std::int64_t t, hma::Stream s,
                 unsigned spin_us = 0);
void fill_values(double* p, std::size_t n, std::size_t first, int r, std::int64_t t, hma::Stream s,
                 unsigned spin_us = 0);
/// dst[i] = src[i] on `s` (a consumer on the caller's stream).
void copy(float* dst, const float* src, std::size_t n, hma::Stream s);
void copy(double* dst, const double* src, std::size_t n, hma::Stream s);

}  // namespace hma_gpu
