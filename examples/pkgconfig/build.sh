#!/usr/bin/env bash
# A pkg-config consumer of an installed hma: the heat example in C++, C and Fortran, compiled with
# the plain compilers and `pkg-config hma` (which brings the MPI hma was built with).
#   PKG_CONFIG_PATH=<prefix>/lib/<triplet>/pkgconfig examples/pkgconfig/build.sh OUTDIR
# The C++ API needs -std=c++20 (`pkg-config --variable=cxx_std hma` says so); C and Fortran need
# no flag. Fortran: `pkg-config hma-fortran` (installed where the Fortran module was built).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-.}
pc=(pkg-config)
std=$("${pc[@]}" --variable=cxx_std hma)
c++ -std="$std" "$here/cpp/heat.cpp" $("${pc[@]}" --cflags --libs hma) -o "$out/heat_cpp"
cc "$here/c/heat.c" $("${pc[@]}" --cflags --libs hma) -lm -o "$out/heat_c"
echo "built $out/heat_cpp $out/heat_c"
# Fortran: `pkg-config hma-fortran` brings hma.mod's folder, -lhma_fortran, hma and the MPI's
# Fortran bindings (mpi_f08); any gfortran will do (on Debian with MPICH the wrapper is
# mpif90.mpich: plain mpif90 is Open MPI's, whose mpi_f08 does not match MPICH's).
if "${pc[@]}" --exists hma-fortran && command -v gfortran >/dev/null; then
  gfortran "$here/fortran/heat.f90" $("${pc[@]}" --cflags --libs hma-fortran) -o "$out/heat_fortran"
  echo "built $out/heat_fortran"
fi
