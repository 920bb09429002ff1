#!/usr/bin/env bash
# One entry point for a fresh machine: set up, build, then run the tests or the benchmark report.
#   ./run.sh test  [pytest args...]     build + the full test suite
#   ./run.sh bench [bench args...]      build + the benchmark report (default: --quick)
#   ./run.sh setup                      build only
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

setup() {
  local constraints
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' RETURN
  printf '%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" > "$constraints"
  "$PYTHON" -m pip install --quiet -c "$constraints" "$TORCH_PIN" "$TORCHVISION_PIN"
  "$PYTHON" -m pip install --quiet -c "$constraints" "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake numpy \
    triton pytest hypothesis torch_geometric networkx scipy diffusers timm transformers matplotlib tqdm
  "$PYTHON" - "$TORCH_PIN" "$TORCHVISION_PIN" <<'PY'
import sys, torch, torchvision
want = {"torch": sys.argv[1].split("==")[1], "torchvision": sys.argv[2].split("==")[1]}
have = {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}
if have != want:
    sys.exit(f"run.sh: pip left {have}, expected {want}")
PY
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps \
    -Cbuild-dir=build/editable -Ceditable.rebuild=false -e .
  "$PYTHON" -m pykernels info
}

command=${1:-test}
shift || true
case "$command" in
  setup) setup ;;
  test) export PYKERNELS_CUDA_EMULATE=${PYKERNELS_CUDA_EMULATE:-1}; setup; exec "$PYTHON" -m pytest "$@" ;;
  bench) setup; if [ $# -eq 0 ]; then set -- --quick; fi; exec "$PYTHON" -m pykernels bench "$@" ;;
  *) echo "usage: ./run.sh test|bench|setup [args...]" >&2; exit 2 ;;
esac
