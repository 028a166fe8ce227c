#!/usr/bin/env bash
# The prepared GPU check (issue 10): unattended, under 8 minutes on one GPU machine, one table.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # tiny sizes on CPU: proves the script before a GPU runs it
#
# Steps (each time-boxed with `timeout`; a failure or a hang is a FAIL row and the next step runs):
#   install        pip install -e '.[dev]' (offline-tolerant: falls back to --no-build-isolation --no-deps)
#   gpu tests      pytest -m gpu (the tests of the GPU-path fixes); FAIL unless every one ran and passed on CUDA
#                  (they skip without CUDA, so this step fails in a --cpu-dry-run)
#   bench_explain  benchmarks/bench_explain.py --device cuda: P-TAME vs forward vs Grad-CAM
#   ptame explain  --use-gpu on 2,000 JPEGs vs a plain GPU loop; images/s, GPU utilisation, decode cores
#   ptame serve    --use-gpu answering a burst of concurrent requests
#   dvc repro      a small configuration with train.use_gpu, train.amp, explain.use_gpu in a temp project
# The table goes to stdout and to $OUT/gpu_check.md when $OUT is set; step logs to $OUT/gpu_check_logs/.
# Environment: GPU_CHECK_BUDGET_S (default 460) caps the whole run; every step gets what is left.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (use --cpu-dry-run or nothing)" >&2; exit 2 ;;
esac

DRY_SCALE=$((DRY ? 5 : 1))   # a dry run on a small CPU machine is slower than the GPU run it rehearses
BUDGET="${GPU_CHECK_BUDGET_S:-$((460 * DRY_SCALE))}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK="$(mktemp -d -t ptame-gpu-check.XXXXXX)"
LOGDIR="${OUT:-$WORK}/gpu_check_logs"
mkdir -p "$LOGDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # this tree's ptame, whatever is installed
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
export RAY_USAGE_STATS_ENABLED=0 TQDM_DISABLE=1
unset RAY_ADDRESS
export PY="${PYTHON:-python3}" LOGDIR

if ((DRY)); then
  DEVICE=cpu; IMAGES=24; BATCH=8; CHUNK=8; REQUESTS=16; CLIENTS=4; TINY=--tiny
  BENCH_ARGS="--device cpu --batch-size 2 --size 96 --repeats 1 --rise-measured-n 8 --rise-images 1"
else
  DEVICE=cuda; IMAGES=2000; BATCH=64; CHUNK=128; REQUESTS=256; CLIENTS=32; TINY=
  BENCH_ARGS="--device cuda --batch-size 32 --repeats 10"
fi
export BENCH_ARGS

ROWS=()
record() {  # name status seconds detail
  ROWS+=("| $1 | $2 | $3 | ${4//|//} |")
}

# run_step NAME LIMIT_S CMD...: time-boxed by `timeout` (whole process group), clipped to the budget
run_step() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 20)); then
    record "$name" SKIP 0 "no time left of the ${BUDGET} s budget"
    return
  fi
  limit=$((limit * DRY_SCALE))
  ((limit > left)) && limit=$left
  local log="$LOGDIR/${name// /_}.log" t0 rc dt detail status
  t0=$(date +%s)
  echo "[$(date +%T)] $name (limit ${limit} s, log $log)" >&2
  # timeout signals its whole process group (Ray's local processes included); functions run in bash -c
  timeout -k 15 "$limit" bash -c '"$@"' _ "$@" >"$log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  detail="$(grep '^RESULT: ' "$log" | sed 's/^RESULT: //' | awk 'NR > 1 { printf "; " } { printf "%s", $0 }')"
  [[ -z "$detail" ]] && detail="$(grep -E '(passed|failed|skipped|error)' "$log" | tail -1)"
  if ((rc == 0)); then
    status=PASS
  elif ((rc == 124 || rc == 137)); then
    status="FAIL (timeout ${limit} s)"
  else
    status="FAIL (exit $rc)"
    [[ -z "$detail" ]] && detail="$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-300)"
  fi
  record "$name" "$status" "$dt" "$detail"
}

install_step() {
  PIP_DEFAULT_TIMEOUT=10 "$PY" -m pip install -q --retries 0 -e '.[dev]' \
    || { echo "falling back to an offline install (no build isolation, dependencies as installed)";
         "$PY" -m pip install -q --no-build-isolation --no-deps -e . ; }
  "$PY" -c "import ptame, torch; print('RESULT: ptame', ptame.__version__, 'from', ptame.__file__, '| torch', torch.__version__, '| CUDA', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
}

gpu_tests() {  # passes only if every `gpu` test ran and passed on CUDA: all of them skipped is a failure
  local xml="$LOGDIR/gpu_tests.xml" rc
  rm -f "$xml"
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --timeout 240 --junitxml "$xml" tests
  rc=$?
  gpu_tests_ran "$xml" && return $rc
}

gpu_tests_ran() {  # XML: pytest's JUnit report; says how many gpu tests ran, fails unless all of them ran on CUDA
  "$PY" - "$1" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

import torch

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(f"RESULT: no pytest report ({e}): the gpu tests did not run")
    sys.exit(1)
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped, failures, errors = (int(suite.get(k, 0)) for k in ("tests", "skipped", "failures", "errors"))
passed = tests - skipped - failures - errors
cuda = torch.cuda.is_available()
print(f"RESULT: {passed} of {tests} gpu tests passed, {skipped} skipped, {failures + errors} failed"
      + ("" if cuda else "; no CUDA device here, so none of them ran on a GPU"))
sys.exit(0 if cuda and tests > 0 and passed == tests else 1)
PYEOF
}

bench_step() {
  local out rc
  # shellcheck disable=SC2086 # BENCH_ARGS is a word list
  out="$("$PY" benchmarks/bench_explain.py $BENCH_ARGS)"
  rc=$?
  echo "$out"
  # its ratio rows, for our table
  grep -E '^\| (explain /|Grad-CAM /)' <<<"$out" | sed 's/^| /RESULT: /; s/ *|$//; s/ *| */ /g'
  return $rc
}
export -f install_step gpu_tests gpu_tests_ran bench_step

if ((DRY)) && [[ "${GPU_CHECK_INSTALL:-0}" != 1 ]]; then
  # a dry run must not repoint the machine's editable install at this tree (GPU_CHECK_INSTALL=1 forces it)
  run_step install 60 "$PY" -c "import ptame; print('RESULT: dry run: pip install skipped; ptame', ptame.__version__, 'from', ptame.__file__)"
else
  run_step install 120 install_step
fi
run_step "gpu tests" 180 gpu_tests
run_step bench_explain 60 bench_step
run_step "ptame explain" 170 "$PY" benchmarks/gpu_check.py explain --workdir "$WORK/explain" --device "$DEVICE" \
  --images "$IMAGES" --batch-size "$BATCH" --chunk-size "$CHUNK"
run_step "ptame serve" 90 "$PY" benchmarks/gpu_check.py serve --workdir "$WORK/serve" --device "$DEVICE" \
  --requests "$REQUESTS" --clients "$CLIENTS"
run_step "dvc repro" 240 "$PY" benchmarks/gpu_check.py repro --workdir "$WORK/repro" --device "$DEVICE" $TINY

TOTAL=$(($(date +%s) - START))
{
  echo "## ptame GPU check ($(if ((DRY)); then echo "CPU dry run"; else echo "GPU"; fi), $(date -u +%FT%TZ))"
  echo
  echo "machine: $(nproc) CPUs; $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 || echo 'no nvidia-smi'); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| step | result | s | details |"
  echo "| --- | --- | ---: | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "total ${TOTAL} s (budget ${BUDGET} s); logs in $LOGDIR"
} >"$WORK/gpu_check.md"
cat "$WORK/gpu_check.md"
if [[ -n "${OUT:-}" ]]; then
  cp "$WORK/gpu_check.md" "$OUT/gpu_check.md"
fi
FAILED=$(printf '%s\n' "${ROWS[@]}" | grep -c '| FAIL' || true)
for log in "$LOGDIR"/*.log; do
  if printf '%s\n' "${ROWS[@]}" | grep -q "^| $(basename "$log" .log | tr _ ' ') | FAIL"; then
    echo; echo "---- last lines of $log"; tail -25 "$log"
  fi
done
exit $((FAILED > 0))
