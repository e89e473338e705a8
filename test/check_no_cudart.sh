#!/usr/bin/env bash
# One libhma with or without CUDA: a libhma built with the CUDA backend carries CUDA's runtime
# inside (libcudart_static.a) instead of needing libcudart.so at load time, so it loads on a
# machine without the CUDA toolkit (device_info() then says why device buffers are unavailable).
# Fails if the dynamic section NEEDs libcudart, or if libhma exports the runtime's symbols
# (cudaMalloc & co. would interpose on a program's own CUDA runtime, torch's or CuPy's).
# SKIP (77) in a build without CUDA, saying so.
# Usage: check_no_cudart.sh LIBHMA_SO HAVE_CUDA(true|false)
set -uo pipefail
lib=$1 have_cuda=$2
if [ "$have_cuda" != true ]; then
  echo "SKIP: built without CUDA (-Dcuda=disabled or no nvcc): libhma has no CUDA runtime to check"
  exit 77
fi
command -v readelf >/dev/null || { echo "FAIL: readelf (binutils) not found"; exit 1; }
needed=$(readelf -d "$lib" | grep NEEDED)
echo "$needed"
if grep -qi cudart <<<"$needed"; then
  echo "FAIL: $lib NEEDs the shared CUDA runtime: it will not load where the CUDA toolkit is absent"
  exit 1
fi
exported=$(nm -D --defined-only "$lib" | awk '{print $NF}' | grep -E '^(cuda|__cuda)' | head -5)
if [ -n "$exported" ]; then
  echo "FAIL: $lib exports the CUDA runtime's symbols (they would interpose on the program's own):"
  echo "$exported"
  exit 1
fi
# It must still be a CUDA build: the runtime is inside (its entry points, as local symbols).
symbols=$(nm "$lib" 2>/dev/null)
if ! grep -q ' [tT] cudaMalloc$' <<<"$symbols"; then
  echo "FAIL: $lib holds no CUDA runtime although built with CUDA"
  exit 1
fi
echo "ok: $lib needs no libcudart.so and exports none of the CUDA runtime's symbols"
