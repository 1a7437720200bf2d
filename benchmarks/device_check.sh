#!/usr/bin/env bash
# The device check (issue 13 item 9): kernel parity, the dispatch microbenchmark and the PERFT-R train step at
# OLMoE-1B-7B / Mixtral-8x7B shapes on one GPU, within a total time budget. benchmarks/device_check.py is the
# Python side and documents each part; results land in $OUT (or --out DIR) as <part>.json plus summary.md.
#
#   benchmarks/device_check.sh [--smoke] [--out DIR] [--budget SECONDS] [-- extra device_check.py options]
#   benchmarks/device_check.sh --fetch-wheels     # here, with pip and an index: fallback wheels into .whl/
#
# It runs the project from this tree (PYTHONPATH=.) on the Python packages installed there (on the GPU machine:
# jax 0.11 with the CUDA 13 plugin, flax, optax, orbax, chex, transformers; no datasets, tensorboardX or
# tokamax, which nothing on this path imports). If the installed versions cannot import the benchmark path
# (e.g. an orbax without the private module perft_jax/checkpoint/base.py reads) and .whl/ holds the pinned
# pure-Python wheels (--fetch-wheels; carry .whl), they are installed to /tmp/perft-site and tried instead.
# Each part is its own process under `timeout`; the caps add up to at most --budget (480 s by default).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE="" OUTDIR="${OUT:-/tmp/device_check_out}" BUDGET=480 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE="--smoke"; shift ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --fetch-wheels)
      # Pure-Python (py3-none-any) wheels of the project's pins for the packages the benchmark path imports
      # whose installed version might not fit; --no-deps: the device has their dependencies.
      exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python  # a development checkout; the device copy has no .venv
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"  # Mixtral's 47 GB base + a step
START=$SECONDS
# part:cap seconds (full run; --smoke: tiny shapes, the same caps are ample on a CPU)
PARTS=(env:40 parity:60 dispatch:70 olmoe:170 mixtral:120)
RESERVE=20  # for the summary
declare -A STATUS

run_part() {  # name cap
  local left=$((BUDGET - RESERVE - (SECONDS - START))) cap=$2
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 5 ]; then STATUS[$1]="skipped (budget)"; return 1; fi
  echo "=== $1 (timeout ${cap}s, $((SECONDS - START))s elapsed)"
  local t0=$SECONDS
  timeout -k 5 "$cap" "$PY" -m benchmarks.device_check --part "$1" --out "$OUTDIR" $SMOKE "${EXTRA[@]}" \
    2>&1 | tee "$OUTDIR/$1.log"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS[$1]="ok" ;;
    124|137) STATUS[$1]="TIMED OUT after ${cap}s (rows finished before are kept)" ;;
    *) STATUS[$1]="failed rc=$rc" ;;
  esac
  STATUS[$1]="${STATUS[$1]}, $((SECONDS - t0))s"
  return $rc
}

for entry in "${PARTS[@]}"; do
  name=${entry%%:*} cap=${entry##*:}
  if ! run_part "$name" "$cap" && [ "$name" = env ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      echo "=== the installed packages cannot import the benchmark path; trying the wheels in .whl/"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/perft-site \
        .whl/*.whl && export PYTHONPATH="$PWD:/tmp/perft-site${PYTHONPATH#"$PWD"}"
      run_part env 40 || { echo "env still fails: see $OUTDIR/env.log"; break; }
    else
      echo "env failed and no .whl/ fallback: see $OUTDIR/env.log"; break
    fi
  fi
done

echo "=== summary ($((SECONDS - START))s elapsed)"
timeout -k 5 $RESERVE "$PY" -m benchmarks.device_check --part summary --out "$OUTDIR" 2>&1 | tee "$OUTDIR/summary.log"
echo
for entry in "${PARTS[@]}"; do
  name=${entry%%:*}
  echo "$name: ${STATUS[$name]:-not run}"
done | tee "$OUTDIR/status.txt"
echo "total $((SECONDS - START))s of a ${BUDGET}s budget; results in $OUTDIR"
