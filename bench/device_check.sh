#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine with no package registry (docs/device_check.md).
#
#   bench/device_check.sh [--dry-run] [--only PART,...] [--budget SECONDS] [--limit PART=SECONDS,...] [--list]
#
# Uses ${PYTHON:-python3} and the torch and triton already installed; installs nothing from a registry.
# pytorch-metric-learning (the PML columns) comes from the wheels in ${PML_WHEELS:-bench/wheels}/, which
# the caller brings; fetch them on a machine with a registry with
#     pip download pytorch-metric-learning==2.9.0 --no-deps -d bench/wheels
# They are installed with --no-index --no-deps into build/pml-site/, put on PYTHONPATH. Without them the
# PML columns are left out, with a note.
#
# Parts, most important first (a run stopped early keeps the first ones): pml build env tests parity goal
# sync sanitize timings roofline. Each has a timeout, a failure in one does not stop the next, and no part
# starts past the budget (default 480 s from the start). Every log, table and CSV goes to
# ${DEVICE_CHECK_DIR:-bench/results/device}/ (emptied first); with $OUT set, that folder is packed after each
# part into $OUT/device_check.tar.gz, with SUMMARY.md, status.tsv and the goal and timing tables beside it.
# The one-screen summary (SUMMARY.md) is printed at the end. Exit status 1 if a part failed, timed out or
# was skipped.
#
# --dry-run: every part on this CPU (Triton interpreter, the CUDA kernels through their CPU emulation in
# tests/cuda_emu, tiny sizes, PML from the environment, the sanitizer commands printed), no build.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
DRY=0
ONLY=""
BUDGET=${BUDGET:-480}
LIST=0
LIMITS=""
usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --limit) LIMITS=${2:?--limit needs PART=SECONDS}; shift ;;
    --limit=*) LIMITS=${1#*=} ;;
    --list) LIST=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "device_check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

WHEELS=${PML_WHEELS:-$ROOT/bench/wheels}
CORES=$(nproc 2>/dev/null || echo 2)

# part -> expected seconds on the H200 machine (docs/device_check.md says how each was estimated) and timeout
PARTS=(pml build env tests parity goal sync sanitize timings roofline)
declare -A EXPECT=([pml]=3 [build]=100 [env]=5 [tests]=90 [parity]=50 [goal]=60 [sync]=15 [sanitize]=60 [timings]=80 [roofline]=5)
declare -A LIMIT=([pml]=30 [build]=200 [env]=30 [tests]=150 [parity]=120 [goal]=100 [sync]=60 [sanitize]=100 [timings]=120 [roofline]=30)

for kv in ${LIMITS//,/ }; do
  [ -n "${LIMIT[${kv%%=*}]:-}" ] || { echo "device_check: --limit: unknown part in '$kv'" >&2; exit 2; }
  LIMIT[${kv%%=*}]=${kv#*=}
done
if [ "$LIST" = 1 ]; then
  printf '%-9s %10s %9s\n' part expected_s limit_s
  for p in "${PARTS[@]}"; do printf '%-9s %10s %9s\n' "$p" "${EXPECT[$p]}" "${LIMIT[$p]}"; done
  exit 0
fi
if [ -n "$ONLY" ]; then
  for p in ${ONLY//,/ }; do
    [ -n "${EXPECT[$p]:-}" ] || { echo "device_check: unknown part '$p' (parts: ${PARTS[*]})" >&2; exit 2; }
  done
fi

# every log, table and CSV goes to RES; with $OUT set (the GPU machine's tool brings back at most 8 files
# from it), RES is packed after each part into $OUT/device_check.tar.gz, beside copies of the summary,
# status.tsv and the goal and timing tables
RES=${DEVICE_CHECK_DIR:-$ROOT/bench/results/device}
if [ -e "$RES/status.tsv" ] || [ "$RES" = "$ROOT/bench/results/device" ]; then
  rm -rf "$RES"  # an earlier run's results
elif [ -n "$(ls -A "$RES" 2>/dev/null)" ]; then
  echo "device_check: $RES is not empty and holds no earlier results: choose another DEVICE_CHECK_DIR" >&2
  exit 2
fi
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
OUT=${OUT:-}
[ -n "$OUT" ] && mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
# the package from this tree whichever way it was built (pip -e, build_ext --inplace, or not at all:
# then the reference and Triton backends still run); the PML wheels of an earlier run
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$ROOT/build/pml-site" ] && export PYTHONPATH="$ROOT/build/pml-site:$PYTHONPATH"
: >"$RES/status.tsv"
FAILED=0
say() { echo "device_check: $*"; }
selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
record() { # part state seconds rc
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${EXPECT[$1]}" "${LIMIT[$1]}" "$4" >>"$RES/status.tsv"
  say "$1: $2 (${3} s, expected ${EXPECT[$1]} s)"
  case $2 in ok | "not selected") ;; *) FAILED=1 ;; esac  # a part skipped for the budget is not ok either
  [ "$2" = "not selected" ] || publish
}

# ---------------------------------------------------------------- pml: the wheels the caller brought
part_pml() {
  local site=$ROOT/build/pml-site
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [ "$DRY" = 1 ]; then
    echo "dry run: would install ${wheels[*]:-nothing} with: $PY -m pip install --no-index --no-deps --target $site"
  elif [ ${#wheels[@]} -gt 0 ]; then
    rm -rf "$site"
    limited "$PY" -m pip install --no-index --no-deps --target "$site" "${wheels[@]}" || return 1
    export PYTHONPATH="$site:$PYTHONPATH"
  fi
  if "$PY" -c "import pytorch_metric_learning as p; print('pytorch-metric-learning', p.__version__, 'from', p.__file__)"; then
    return 0
  fi
  echo "NOTE: pytorch-metric-learning not importable: the PML columns are left out. Bring the wheels:"
  echo "      pip download pytorch-metric-learning==2.9.0 --no-deps -d bench/wheels   (on a machine with a registry)"
  return 0
}

# ---------------------------------------------------------------- build: the extension with its CUDA kernels
part_build() {
  local cuda_env=(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$CORES") warm_args=(warm --out "$RES")
  # meanwhile the Triton kernels of the parity cases compile (they need no C++ extension): warm.log
  [ "$DRY" = 1 ] && warm_args+=(--dry-run)
  limited "$PY" bench/gpu_check.py "${warm_args[@]}" >"$RES/warm.log" 2>&1 &
  local warm_pid=$!
  part_build_extension "${cuda_env[@]}"
  local rc=$?
  wait "$warm_pid"
  echo "warm-up of the Triton kernels during the build: exit $? (warm.log)"
  return $rc
}

part_build_extension() {
  local cuda_env=("$@")
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run: ${cuda_env[*]} $PY -m pip install --no-build-isolation --no-deps -e ."
    echo "         (then, if that fails: the same with setup.py build_ext --inplace; then USE_CUDA=0)"
  elif limited env "${cuda_env[@]}" "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    :
  elif echo "== pip install -e failed: setup.py build_ext --inplace" &&
    limited env "${cuda_env[@]}" "$PY" setup.py build_ext --inplace; then
    BUILD_NOTE="built with setup.py build_ext --inplace (pip install -e failed: see build.log)"
  else
    echo "== the CUDA build failed: CPU + Triton only (USE_CUDA=0)"
    limited env USE_CUDA=0 MAX_JOBS="$CORES" "$PY" setup.py build_ext --inplace || return 1
    BUILD_NOTE="CUDA kernels NOT built (see build.log): the cuda backend rows will say not available"
  fi
  "$PY" -c "import rll_kernels, torch; dev = 'cuda' if torch.cuda.is_available() else 'cpu'; \
print('rll_kernels imports; backends on', dev, rll_kernels.available_backends(dev))"
}

part_limit() { # the part's timeout, cut to what is left of the budget; 0 when under 15 s are left
  local left=$((DEADLINE - $(date +%s))) limit=${LIMIT[$1]}
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$left" -lt 15 ] && limit=0
  echo "$limit"
}
limited() { timeout -k 10 "$PART_LIMIT" "$@"; }

publish() { # the results folder into $OUT, at most 8 files (the run's own limit on what comes back)
  [ -n "$OUT" ] || return 0
  tar czf "$OUT/.device_check.tar.gz" -C "$RES" . && mv "$OUT/.device_check.tar.gz" "$OUT/device_check.tar.gz"
  for f in SUMMARY.md status.tsv goal.md goal.csv timings.md timings.csv; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/$f"
  done
}

run_shell_part() { # part function: output to RES/part.log; every command in it runs under the part's limit
  local part=$1 t0 rc
  t0=$(date +%s)
  BUILD_NOTE=""
  PART_LIMIT=$(part_limit "$part")
  if [ "$PART_LIMIT" = 0 ]; then
    record "$part" "skipped (budget)" 0 0
    return
  fi
  # not in a subshell: the exports of PYTHONPATH must reach the later parts
  "$2" >"$RES/$part.log" 2>&1
  rc=$?
  [ -n "$BUILD_NOTE" ] && { echo "NOTE: $BUILD_NOTE" >>"$RES/$part.log"; rc=1; }
  printf '{"part": "%s", "passed": 0, "failed": %d, "lines": [%s], "seconds": %d}\n' "$part" "$((rc != 0))" \
    "$(tail -n 3 "$RES/$part.log" | sed 's/\\/\\\\/g; s/"/\\"/g; s/^/"/; s/$/"/' | paste -sd, -)" \
    "$(($(date +%s) - t0))" >"$RES/$part.summary.json"
  if [ $rc = 0 ]; then record "$part" ok $(($(date +%s) - t0)) $rc; else record "$part" FAIL $(($(date +%s) - t0)) $rc; fi
}

run_python_part() {
  local part=$1 t0 rc limit state
  t0=$(date +%s)
  limit=$(part_limit "$part")
  if [ "$limit" = 0 ]; then
    record "$part" "skipped (budget)" 0 0
    return
  fi
  local args=("$part" --out "$RES" --deadline $((t0 + limit - 10)))
  [ "$DRY" = 1 ] && args+=(--dry-run)
  timeout -k 10 "$limit" "$PY" bench/gpu_check.py "${args[@]}" >"$RES/$part.log" 2>&1
  rc=$?
  case $rc in 0) state=ok ;; 1) state=FAIL ;; 124 | 137) state="TIMEOUT (${limit} s)" ;; *) state="ERROR (exit $rc)" ;; esac
  record "$part" "$state" $(($(date +%s) - t0)) $rc
}

say "python $PY, results $RES${OUT:+ (packed into $OUT)}, $CORES cores, budget $BUDGET s$([ "$DRY" = 1 ] && echo ', DRY RUN on the CPU')"
NOGPU=0
if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  NOGPU=1
  say "no CUDA device visible to $PY (or no torch): only pml, env and roofline run; --dry-run is the CPU stand-in"
fi
for part in "${PARTS[@]}"; do
  if ! selected "$part"; then
    record "$part" "not selected" 0 0
  elif [ "$NOGPU" = 1 ] && [[ " pml env roofline " != *" $part "* ]]; then
    record "$part" "skipped (no GPU)" 0 0
  elif [ "$part" = pml ] || [ "$part" = build ]; then
    run_shell_part "$part" "part_$part"
  else
    run_python_part "$part"
  fi
done
"$PY" bench/gpu_check.py summary --out "$RES" $([ "$DRY" = 1 ] && echo --dry-run) ||
  { echo "(the summary failed; status.tsv:)"; cat "$RES/status.tsv"; }
publish
say "total $(($(date +%s) - START)) s; logs, tables and CSV in $RES${OUT:+, packed into $OUT/device_check.tar.gz}"
exit $FAILED
