#!/usr/bin/env bash
# A pkg-config consumer of an installed hma: the heat example in C++, C and Fortran, compiled with
# the plain compilers and `pkg-config hma` (which brings the MPI hma was built with).
#   PKG_CONFIG_PATH=<prefix>/lib/<triplet>/pkgconfig examples/pkgconfig/build.sh OUTDIR
# The C++ API needs -std=c++20 (`pkg-config --variable=cxx_std hma` says so); C and Fortran need
# no flag. Fortran: the module is in <includedir>/hma, the library is libhma_fortran, and MPI's
# Fortran bindings come from the MPI's own wrapper (mpif90.openmpi / mpif90.mpich).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-.}
pc=(pkg-config)
std=$("${pc[@]}" --variable=cxx_std hma)
c++ -std="$std" "$here/cpp/heat.cpp" $("${pc[@]}" --cflags --libs hma) -o "$out/heat_cpp"
cc "$here/c/heat.c" $("${pc[@]}" --cflags --libs hma) -lm -o "$out/heat_c"
echo "built $out/heat_cpp $out/heat_c"
mpi=$("${pc[@]}" --variable=mpi hma)
fc=$(command -v "mpif90.$mpi" || true)
incdir=$("${pc[@]}" --variable=includedir hma)
libdir=$("${pc[@]}" --variable=libdir hma)
if [ -n "$fc" ] && [ -f "$incdir/hma/hma.mod" ]; then
  "$fc" "$here/fortran/heat.f90" -I"$incdir/hma" -L"$libdir" -lhma_fortran -lhma -o "$out/heat_fortran"
  echo "built $out/heat_fortran"
fi
