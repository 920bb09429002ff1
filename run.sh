#!/usr/bin/env bash
# One entry point for a fresh machine: set up, build, then run the tests or the benchmark report.
#   ./run.sh test  [pytest args...]     build + the full test suite
#   ./run.sh bench [bench args...]      build + the benchmark report (default: --quick)
#   ./run.sh setup                      build only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {
  # torch first and pinned: an unpinned or isolated install can pull a different (multi-GB CUDA) build,
  # and the extension must be compiled against the torch it will run with.
  if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
  "$PYTHON" -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake numpy \
    triton pytest hypothesis torch_geometric networkx scipy diffusers matplotlib tqdm
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps \
    -Cbuild-dir=build/editable -Ceditable.rebuild=false -e .
  "$PYTHON" -m pykernels info
}

command=${1:-test}
shift || true
case "$command" in
  setup) setup ;;
  test) setup; exec "$PYTHON" -m pytest "$@" ;;
  bench) setup; if [ $# -eq 0 ]; then set -- --quick; fi; exec "$PYTHON" -m pykernels bench "$@" ;;
  *) echo "usage: ./run.sh test|bench|setup [args...]" >&2; exit 2 ;;
esac
