#!/usr/bin/env bash
# Every C++, C and Fortran code block of README.md is compiled against this build and run at 2
# ranks: complete programs as they are; a C++ fragment (no main) inside a main of its own, with
# its #includes hoisted and stubs for the names it leaves to the reader (n, m, iters,
# train_step). ```python blocks run at 2 ranks with `python3 -m mpi4py` against this build's
# Python package (HMA_PYTHON, HMA_PYTHONPATH from meson; a FAIL when the build has none).
# ```cuda and ```sh blocks are not compiled here.
# Usage: check_readme.sh BUILD_DIR SOURCE_DIR MPI_IMPL MPIRUN MPIRUN_FLAGS...
set -euo pipefail
build=$(cd "$1" && pwd) src=$(cd "$2" && pwd) impl=$3 mpirun=$4
shift 4
flags=("$@")
work=$(mktemp -d /tmp/hma-readme.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$src/README.md" "$work" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"^```(cpp|c|fortran|python)\n(.*?)^```", text, re.S | re.M)
ext = {"cpp": "cpp", "c": "c", "fortran": "f90", "python": "py"}
prelude = """#include <cstddef>
#include <span>
#include <vector>
static std::size_t n = 16, m = 8;
static int iters = 4;
static void train_step(std::span<float>, std::vector<double>&) {}
"""
for k, (lang, body) in enumerate(blocks):
    if lang == "cpp" and "int main(" not in body:
        inc = [l for l in body.splitlines() if l.startswith("#include")]
        rest = [l for l in body.splitlines() if not l.startswith("#include")]
        body = "\n".join(inc) + "\n" + prelude + "int main(int argc, char** argv) {\n" + "\n".join(rest) + "\n}\n"
    open(f"{sys.argv[2]}/block{k}.{ext[lang]}", "w").write(body)
print(f"README.md: {len(blocks)} blocks:", ", ".join(l for l, _ in blocks))
PY
pc=$([ "$impl" = mpich ] && echo mpich || echo ompi-c)
mpi_flags=$(pkg-config --cflags --libs "$pc")
inc=(-I"$src/include" -DOMPI_SKIP_MPICXX=1 -DMPICH_SKIP_MPICXX=1)
lib=(-L"$build" -lhma -Wl,-rpath,"$build")
n=0
for f in "$work"/block*; do
  exe=${f%.*}
  case "$f" in
    *.cpp) c++ -std=c++20 "${inc[@]}" "$f" "${lib[@]}" $mpi_flags -o "$exe" ;;
    *.c) cc "${inc[@]}" "$f" "${lib[@]}" $mpi_flags -o "$exe" ;;
    *.f90)
      fc=$(command -v "mpif90.$impl" || true)
      mod=$(dirname "$(find "$build" -name hma.mod -not -path '*.p/*' | head -1)")
      if [ -z "$fc" ] || [ "$mod" = . ]; then
        echo "FAIL: a Fortran block, but no mpif90.$impl or hma.mod in this build"; exit 1
      fi
      "$fc" -I"$mod" "$f" -L"$mod" -lhma_fortran -Wl,-rpath,"$mod" "${lib[@]}" -o "$exe" ;;
    *.py)
      if [ -z "${HMA_PYTHON:-}" ]; then echo "FAIL: a Python block, but this build has no Python package"; exit 1; fi
      # Debian's mpi4py is Open MPI's: with an MPICH build the block cannot run (hma names both
      # MPIs instead; python_mpi_mismatch checks that message).
      theirs=$("$HMA_PYTHON" -c 'import mpi4py; mpi4py.rc.initialize = False
from mpi4py import MPI; print(MPI.Get_library_version().replace(chr(0), "").splitlines()[0])')
      case "$theirs" in *"Open MPI"*) fam=openmpi ;; *MPICH*) fam=mpich ;; *) fam=other ;; esac
      if [ "$fam" != "$impl" ]; then
        echo "not run: $(basename "$f") (mpi4py uses $fam, this build $impl)"
        continue
      fi
      PYTHONPATH=$HMA_PYTHONPATH HMA_LOG=off timeout 120 "$mpirun" "${flags[@]}" -np 2 "$HMA_PYTHON" -m mpi4py "$f"
      echo "ok: $(basename "$f") ran at 2 ranks"
      n=$((n + 1))
      continue ;;
  esac
  HMA_LOG=off timeout 60 "$mpirun" "${flags[@]}" -np 2 "$exe"
  echo "ok: $(basename "$f") compiled and ran at 2 ranks"
  n=$((n + 1))
done
[ "$n" -ge 4 ] || { echo "FAIL: expected at least 4 code blocks, found $n"; exit 1; }
