#!/usr/bin/env bash
# One prepared GPU check: every method on MNIST in bf16, sampling speed against 100-step flow matching,
# DDP through the CLI, the metric suite on 10k samples, Inception FID where possible. ~8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--data DIR] [--out DIR] [--steps N] [--cpu]
#
# --wheels DIR  install the packages the GPU image lacks (POT, jsonargparse and its signature extras) from
#               this folder of wheels, offline (`make gpu-wheels` downloads them where PyPI is reachable)
# --data DIR    folder holding mnist/raw (default: $ONESTEP_DATA, else ../shared/datasets)
# --out DIR     where gpu_check.json / gpu_check.md and each part's files go (default: results/gpu_check)
# --steps N     training steps per method (default 300; 4 with --cpu)
# --cpu         smoke check on the CPU: the same parts, tiny sizes, fp32, DDP on one process
#
# It expects torch, lightning and torchmetrics to be installed (the CUDA image has them) and installs
# onestep itself with --no-deps; nothing is downloaded. Every part runs in its own process with its own
# time limit, so one failing part is recorded and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="" DATA="${ONESTEP_DATA:-}" OUT="results/gpu_check" STEPS="" CPU=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --cpu) CPU="--cpu"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument $1; see --help" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
if [[ -z "$DATA" ]]; then DATA="$(pwd)/../shared/datasets"; fi
if [[ ! -d "$DATA/mnist/raw" ]]; then
  echo "gpu_check.sh: error: --data $DATA: no mnist/raw folder there; copy ../shared/datasets/mnist beside the repo or pass --data" >&2
  exit 2
fi

if [[ -n "$WHEELS" ]]; then
  SITE="${TMPDIR:-/tmp}/onestep_gpu_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# onestep from this checkout, without touching the installed torch/lightning
if ! "$PY" -c "import onestep, pathlib, sys; sys.exit(pathlib.Path(onestep.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" 2>/dev/null \
   || ! command -v onestep >/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi

export ONESTEP_DATA="$DATA" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "$OUT" ${STEPS:+--steps "$STEPS"} $CPU
