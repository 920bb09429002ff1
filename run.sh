#!/usr/bin/env bash
# One entry point for a fresh machine: set up, build, then run the tests or the benchmark report.
#   ./run.sh test  [pytest args...]     build + the full test suite
#   ./run.sh bench [bench args...]      build + the benchmark report (default: --quick)
#   ./run.sh setup                      build only
#   ./run.sh sanitize [pytest args...]  the C++ engines (and the CUDA engine's emulation, unless
#                                       PYKERNELS_CUDA_EMULATE=0) built with ASan + UBSan in build/sanitize, and
#                                       their tests run under them (args replace the default selection below)
# Python: $PYTHON if set, else the active virtual environment, else ./.venv (created on first use).
# PYKERNELS_CUDA=auto|on|off picks whether the CUDA engine is built (see README). `test` also builds the CUDA
# engine's emulation (PYKERNELS_CUDA_EMULATE=1, unless set to 0), whose tests run the CUDA kernels on the CPU.
# The build folder build/editable is reused, so a second run recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")"

# The pair the package is built and tested with. Every install below is constrained to it, so no
# dependency's resolver can swap in another torch (the extension must run with the torch it was built against).
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"

if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
  else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PYTHON=.venv/bin/python
  fi
fi

deps() {
  local constraints
  constraints=$(mktemp)
  # A RETURN trap stays set after the function returns; it clears itself, or it would fire again (with
  # $constraints out of scope) when the caller returns.
  trap 'rm -f "$constraints"; trap - RETURN' RETURN
  printf '%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" > "$constraints"
  "$PYTHON" -m pip install --quiet -c "$constraints" "$TORCH_PIN" "$TORCHVISION_PIN"
  "$PYTHON" -m pip install --quiet -c "$constraints" "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake numpy \
    triton pytest hypothesis psutil torch_geometric networkx scipy diffusers hidiffusion timm transformers matplotlib \
    tqdm
  "$PYTHON" - "$TORCH_PIN" "$TORCHVISION_PIN" <<'PY'
import sys, torch, torchvision
want = {"torch": sys.argv[1].split("==")[1], "torchvision": sys.argv[2].split("==")[1]}
have = {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}
if have != want:
    sys.exit(f"run.sh: pip left {have}, expected {want}")
PY
}

setup() {
  deps
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps \
    -Cbuild-dir=build/editable -Ceditable.rebuild=false -e .
  "$PYTHON" -m pykernels info
}

# The C++ engine's tests under AddressSanitizer and UndefinedBehaviorSanitizer. The build never touches the
# editable install's: it goes to build/sanitize and is staged with the package's Python files in
# build/sanitize/stage, which a site-less interpreter (-S: no editable-install finder) imports first.
# Default selection: every test of the C++ engine and of the emulated CUDA engine; the Triton interpreter's
# tests are left out (no C++ runs in them, and they are the slow part of the suite).
# PYKERNELS_SANITIZE_EMULATED=sweep keeps, of the emulated engine's tests, only the launch sweep (every kernel
# instantiation once; CI's choice: about 2 minutes under the sanitizers, where all of them take about 17).
SANITIZE_DEFAULT_TESTS=(tests/test_attention.py tests/test_attention_nn.py tests/test_flow.py tests/test_max_flow.py
  tests/test_window.py tests/test_window_nn.py tests/test_neighborhood.py tests/test_graph_ops.py tests/test_graph_nn.py
  tests/test_sanitize.py tests/test_launch_sweep.py -k "not triton" -q)
sanitize() {
  local dir=build/sanitize scripts stage f runtime site
  scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  "$scripts/cmake" -S . -B "$dir" -G Ninja -DCMAKE_MAKE_PROGRAM="$scripts/ninja" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPython_EXECUTABLE="$("$PYTHON" -c 'import sys; print(sys.executable)')" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
    -DPYKERNELS_CUDA=off -DPYKERNELS_CUDA_EMULATE="$PYKERNELS_CUDA_EMULATE" -DPYKERNELS_SANITIZE=address,undefined
  "$scripts/cmake" --build "$dir"
  stage=$dir/stage
  rm -rf "$stage"
  "$scripts/cmake" --install "$dir" --prefix "$stage"
  for f in pykernels/*; do
    case $f in *.so|*/__pycache__) ;; *) ln -s "$PWD/$f" "$stage/$f" ;; esac
  done
  # A script, not -m: its folder (the stage), not the working directory (the source tree), is sys.path[0].
  printf 'import sys\n\nimport pytest\n\nsys.exit(pytest.main())\n' > "$stage/run_pytest.py"
  # ASan must be the first library loaded; libstdc++ with it, or ASan cannot find the __cxa_throw it intercepts
  # (Python itself does not link libstdc++). Both are the ones the module was linked against.
  runtime=$(ldd "$stage"/pykernels/_C*.so | awk '/libasan|libstdc\+\+/ {printf "%s ", $3}')
  site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib") + ":" + sysconfig.get_path("platlib"))')
  if [ $# -eq 0 ]; then
    set -- "${SANITIZE_DEFAULT_TESTS[@]}"
    if [ "${PYKERNELS_SANITIZE_EMULATED:-all}" = sweep ]; then set -- "$@" -m "not cuda_emulated or launch_sweep"; fi
  fi
  # detect_leaks=0: CPython and torch keep allocations until exit by design.
  LD_PRELOAD="$runtime" PYKERNELS_SANITIZED=1 \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    PYTHONPATH="$stage:$site" \
    "$PYTHON" -S "$stage/run_pytest.py" "$@"
}

command=${1:-test}
shift || true
case "$command" in
  setup) setup ;;
  test) export PYKERNELS_CUDA_EMULATE=${PYKERNELS_CUDA_EMULATE:-1}; setup; exec "$PYTHON" -m pytest "$@" ;;
  sanitize) export PYKERNELS_CUDA_EMULATE=${PYKERNELS_CUDA_EMULATE:-1}; deps; sanitize "$@" ;;
  bench) setup; if [ $# -eq 0 ]; then set -- --quick; fi; exec "$PYTHON" -m pykernels bench "$@" ;;
  *) echo "usage: ./run.sh test|bench|setup|sanitize [args...]" >&2; exit 2 ;;
esac
