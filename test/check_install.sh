#!/usr/bin/env bash
# Install and consume, as a user would: `meson install` into a temporary root, then build the
# heat example (C++, C, Fortran) with pkg-config (examples/pkgconfig/build.sh), with CMake
# find_package (examples/cmake) and as a meson subproject (examples/subproject, hma's source
# linked at subprojects/hma), and run each at np 4, checking its answer. The subproject must build
# no hma tests. Prints each consumer command and its output.
# Also: hma-fortran.pc and an rpath-only Fortran program; with CMake, no MPI C++ bindings on a
# C++-only project's link line, and a project that found the other MPI first is stopped with
# both named.
# Usage: check_install.sh BUILD_DIR SOURCE_DIR MPI_IMPL MPIRUN MPIRUN_FLAGS...
set -euo pipefail
build=$(cd "$1" && pwd) src=$(cd "$2" && pwd) impl=$3 mpirun=$4
shift 4
flags=("$@")
work=$(mktemp -d /tmp/hma-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
say() { printf '\n$ %s\n' "$*"; }

say meson install -C BUILD --destdir DEST
meson install -C "$build" --no-rebuild --destdir "$work/dest" >"$work/install.log" 2>&1 ||
  { cat "$work/install.log"; exit 1; }
prefix=$(meson introspect --buildoptions "$build" | python3 -c \
  'import json,sys; o={x["name"]:x["value"] for x in json.load(sys.stdin)}; print(o["prefix"]+"\t"+o["libdir"]+"\t"+o["includedir"])')
IFS=$'\t' read -r pfx libdir incdir <<<"$prefix"
root=$work/dest$pfx
lib=$root/$libdir
for f in "$incdir/hma/hma.hpp" "$incdir/hma/hma.h" "$libdir/pkgconfig/hma.pc" "share/cmake/hma/hmaConfig.cmake" \
         "share/cmake/hma/hmaConfigVersion.cmake"; do
  [ -f "$root/$f" ] || { echo "FAIL: $f was not installed"; exit 1; }
done
echo "installed under $root: headers, libhma, hma.pc, the CMake package$([ -f "$root/$incdir/hma/hma.mod" ] && echo ", hma.mod")"
# The files say prefix=$pfx; a user installs there. Here the root stands in for it.
sed -i "s|^prefix=.*|prefix=$root|" "$lib/pkgconfig/hma.pc"
grep -E '^(Requires|Cflags|Libs):' "$lib/pkgconfig/hma.pc"
fortran=0
if [ -f "$root/$incdir/hma/hma.mod" ]; then
  fortran=1
  [ -f "$lib/pkgconfig/hma-fortran.pc" ] || { echo "FAIL: hma.mod without hma-fortran.pc"; exit 1; }
  sed -i "s|^prefix=.*|prefix=$root|" "$lib/pkgconfig/hma-fortran.pc"
  grep -E '^(Requires|Cflags|Libs):' "$lib/pkgconfig/hma-fortran.pc"
fi

run() {  # run NAME EXE: at np 4 on 2 emulated nodes; the example checks its own answer
  say HMA_RANKS_PER_NODE=2 mpirun -np 4 "$1"
  HMA_LOG=off HMA_RANKS_PER_NODE=2 LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    timeout 120 "$mpirun" "${flags[@]}" -np 4 "$2" | tee "$work/run.txt"
  grep -q ": ok" "$work/run.txt" || { echo "FAIL: $1 did not say ok"; exit 1; }
}

# pkg-config
mkdir -p "$work/pc"
say PKG_CONFIG_PATH=PREFIX/$libdir/pkgconfig examples/pkgconfig/build.sh
PKG_CONFIG_PATH="$lib/pkgconfig" "$src/examples/pkgconfig/build.sh" "$work/pc"
for x in "$work"/pc/heat_*; do run "pkg-config $(basename "$x")" "$x"; done
if [ $fortran = 1 ]; then
  [ -x "$work/pc/heat_fortran" ] || { echo "FAIL: no Fortran program built with pkg-config hma-fortran"; exit 1; }
  # An rpath-only Fortran program: no LD_LIBRARY_PATH; libhma_fortran finds libhma by its RUNPATH.
  readelf -d "$lib/libhma_fortran.so" | grep -q 'RUNPATH.*\$ORIGIN' ||
    { echo "FAIL: the installed libhma_fortran.so has no RUNPATH \$ORIGIN"; readelf -d "$lib/libhma_fortran.so"; exit 1; }
  say gfortran heat.f90 '$(pkg-config --cflags --libs hma-fortran)' -Wl,-rpath,PREFIX/$libdir
  PKG_CONFIG_PATH="$lib/pkgconfig" gfortran "$src/examples/fortran/heat.f90" \
    $(PKG_CONFIG_PATH="$lib/pkgconfig" pkg-config --cflags --libs hma-fortran) -Wl,-rpath,"$lib" -o "$work/heat_rpath"
  say "HMA_RANKS_PER_NODE=2 mpirun -np 4 heat_rpath (no LD_LIBRARY_PATH)"
  env -u LD_LIBRARY_PATH HMA_LOG=off HMA_RANKS_PER_NODE=2 timeout 120 "$mpirun" "${flags[@]}" -np 4 "$work/heat_rpath" | tee "$work/run.txt"
  grep -q ": ok" "$work/run.txt" || { echo "FAIL: the rpath-only Fortran program did not say ok"; exit 1; }
fi

# CMake find_package
if command -v cmake >/dev/null; then
  say cmake -G Ninja -S examples/cmake -B B -DCMAKE_PREFIX_PATH=PREFIX "&&" cmake --build B
  cmake -G Ninja -S "$src/examples/cmake" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$root" >"$work/cmake.log" 2>&1 &&
    cmake --build "$work/cmake" >>"$work/cmake.log" 2>&1 || { cat "$work/cmake.log"; exit 1; }
  ls "$work/cmake" | grep '^heat_'
  for x in "$work"/cmake/heat_*; do run "cmake $(basename "$x")" "$x"; done
  # A project with C++ only (FindMPI must not be asked for a language it has not enabled).
  mkdir -p "$work/cxxonly"
  cp "$src/examples/cpp/heat.cpp" "$work/cxxonly/"
  printf '%s\n' 'cmake_minimum_required(VERSION 3.18)' 'project(cxx_only LANGUAGES CXX)' \
    'find_package(hma 0.2 REQUIRED)' 'add_executable(heat_cpp_only heat.cpp)' \
    'target_link_libraries(heat_cpp_only PRIVATE hma::hma)' >"$work/cxxonly/CMakeLists.txt"
  say cmake "(a C++-only project)"
  cmake -G Ninja -S "$work/cxxonly" -B "$work/cxxonly/b" -DCMAKE_PREFIX_PATH="$root" >"$work/cmake2.log" 2>&1 &&
    cmake --build "$work/cxxonly/b" >>"$work/cmake2.log" 2>&1 || { cat "$work/cmake2.log"; exit 1; }
  run "cmake C++-only heat_cpp_only" "$work/cxxonly/b/heat_cpp_only"
  # hma needs MPI's C library only: never the MPI C++ bindings (libmpi_cxx), not even in a
  # C++-only project (where FindMPI's MPI::MPI_CXX carries them).
  if grep -q 'mpi_cxx\|mpichcxx' "$work/cxxonly/b/build.ninja"; then
    echo "FAIL: the MPI C++ bindings are on the link line:"; grep -o '[^ ]*\(mpi_cxx\|mpichcxx\)[^ ]*' "$work/cxxonly/b/build.ninja" | sort -u
    exit 1
  fi
  echo "no MPI C++ bindings on the link line"
  # A project that found another MPI first: find_package(hma) stops, naming both MPIs.
  case "$impl" in openmpi) other=mpich want='MPICH' ours='Open MPI' ;; *) other=openmpi want='Open MPI' ours='MPICH' ;; esac
  if command -v "mpicc.$other" >/dev/null && command -v "mpicxx.$other" >/dev/null; then
    mkdir -p "$work/conflict"
    cp "$src/examples/cpp/heat.cpp" "$work/conflict/"
    printf '%s\n' 'cmake_minimum_required(VERSION 3.18)' 'project(conflict LANGUAGES C CXX)' \
      'find_package(MPI REQUIRED)' 'find_package(hma 0.2 REQUIRED)' 'add_executable(heat heat.cpp)' \
      'target_link_libraries(heat PRIVATE hma::hma)' >"$work/conflict/CMakeLists.txt"
    say cmake "(a project that found $want first: -DMPI_C_COMPILER=mpicc.$other)"
    if cmake -G Ninja -S "$work/conflict" -B "$work/conflict/b" -DCMAKE_PREFIX_PATH="$root" \
         -DMPI_C_COMPILER="$(command -v "mpicc.$other")" -DMPI_CXX_COMPILER="$(command -v "mpicxx.$other")" \
         >"$work/cmake3.log" 2>&1; then
      cat "$work/cmake3.log"; echo "FAIL: find_package(hma) accepted a project that found $want"; exit 1
    fi
    grep -A8 'CMake Error' "$work/cmake3.log"
    tr -s ' \n' ' ' <"$work/cmake3.log" | grep -q "hma was built with $ours.*this project found $want" ||
      { echo "FAIL: the error does not name both MPIs"; exit 1; }
  else
    echo "(not checked: the other MPI's wrappers, mpicc.$other, are not installed)"
  fi
else
  echo "FAIL: cmake is not installed (tools/bootstrap installs it)"; exit 1
fi

# meson subproject: hma builds its library only
mkdir -p "$work/sub/examples/subproject/subprojects"
cp -r "$src/examples/cpp" "$src/examples/c" "$work/sub/examples/"
cp "$src/examples/subproject/meson.build" "$work/sub/examples/subproject/"
ln -s "$src" "$work/sub/examples/subproject/subprojects/hma"
say meson setup B -Dhma:mpi=$impl "&&" ninja -C B "(in examples/subproject, hma at subprojects/hma)"
(cd "$work/sub/examples/subproject" && meson setup "$work/subbuild" -Dhma:mpi="$impl" -Dhma:cuda=disabled \
   >"$work/sub.log" 2>&1 && ninja -C "$work/subbuild" >>"$work/sub.log" 2>&1) || { cat "$work/sub.log"; exit 1; }
tests=$(meson introspect --tests "$work/subbuild" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
echo "tests the consumer's build lists: $tests (hma adds none)"
[ "$tests" -eq 0 ] || { echo "FAIL: hma as a subproject registered tests"; exit 1; }
for x in heat_cpp heat_c; do run "subproject $x" "$work/subbuild/$x"; done
echo
echo "ok: installed and consumed with pkg-config, CMake and as a meson subproject"
