#!/usr/bin/env bash
# One-shot GPU check (DESIGN §6.4, §7): CUDA parity tests, then the GPU benchmark suite, then a short table.
#
#   bash bench/gpu_check.sh                  # results in $OUT when set, else bench_out/gpu-check
#   FULL=1 bash bench/gpu_check.sh           # the full grids (no 8-minute cap; ~15+ minutes)
#   GPU_CHECK_TOTAL=600 bash bench/gpu_check.sh   # another overall cap, in seconds
#   SKIP_PARITY=1 BENCH_EXTRA=--smoke bash bench/gpu_check.sh   # developer check of the script on a CPU
#
# Needs only the repository (PYTHONPATH=., no install step) and torch / triton / pytest / numpy on the
# machine; matplotlib and transformers are optional (plots / the HF rows then say why they are missing).
# Every phase runs under `timeout`, no phase failure stops the script, and every phase's limit is cut to
# what is left of the overall cap (default 430 s for the phases + 25 s for the report: under 8 minutes), so the whole run
# stays within it. The benchmark appends each row to results.csv as soon as it is measured, and each
# benchmark phase is its own process, so a crash or a timeout loses at most the case in flight.
#
# Leaves in $OUT (or bench_out/gpu-check): results.csv, results.md, *.png, metadata.json, logs/*.log,
# and hf_dropin.csv when the optional transformers drop-in phase had time to run.
set -u

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
DIR="${OUT:-bench_out/gpu-check}"
mkdir -p "$DIR/logs"
FULL="${FULL:-0}"
if [ "$FULL" = "1" ]; then
  TOTAL="${GPU_CHECK_TOTAL:-3000}"
  FULLFLAG="--full"
else
  TOTAL="${GPU_CHECK_TOTAL:-430}"
  FULLFLAG=""
fi
START=$(date +%s)
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }

# phase NAME LIMIT_SECONDS CMD...: run CMD under timeout (cut to the time left), log to logs/NAME.log.
phase() {
  local name="$1" limit="$2"
  shift 2
  local left=$(( TOTAL - $(elapsed) ))
  if [ "$left" -lt 15 ]; then
    echo "=== [$name] skipped: overall time cap (${TOTAL}s) reached"
    SUMMARY+=("$(printf '%-18s %-22s %5ss' "$name" "SKIPPED (time cap)" 0)")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$DIR/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  local what
  case "$rc" in
    0) what="ok" ;;
    124|137) what="TIMEOUT (rc=$rc)" ;;
    5) what="rc=5 (no tests collected)" ;;
    *) what="rc=$rc" ;;
  esac
  SUMMARY+=("$(printf '%-18s %-22s %5ss' "$name" "$what" "$dt")")
  return 0
}

# bench GROUPS LIMIT [extra args]: one benchmark process; its own budget leaves 25 s for start-up and report.
bench() {
  local groups="$1" limit="$2"
  shift 2
  local left=$(( TOTAL - $(elapsed) ))
  [ "$limit" -gt "$left" ] && limit="$left"
  local budget=$(( limit - 25 ))
  [ "$budget" -lt 5 ] && budget=5
  phase "bench-${groups//,/-}" "$limit" "$PY" -m bench.run --suite gpu --out "$DIR" --only "$groups" --append \
    --time-budget "$budget" --no-print $FULLFLAG ${BENCH_EXTRA:-} "$@"
}

echo "gpu_check: $(date -u) -> $DIR (overall cap ${TOTAL}s)"

# 0. environment ------------------------------------------------------------------------------------
phase env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -5;
  $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA DEVICE\")';
  $PY -c 'import triton; print(\"triton\", triton.__version__)'"

# 1. CUDA parity tests -------------------------------------------------------------------------------
# Kernel test files run whole on a GPU (their CUDA cases are skipif-guarded, not marked); tests marked
# @pytest.mark.cuda elsewhere run in the second call (exit code 5 there just means none exist).
KFILES=$(ls tests/test_kernels*.py tests/test_decode*.py tests/test_*sparse_kernel*.py tests/test_topk*.py \
  tests/test_block_sparse*.py 2>/dev/null | sort -u | tr '\n' ' ')
IGNORES=""
for f in $KFILES; do IGNORES="$IGNORES --ignore=$f"; done
if [ "${SKIP_PARITY:-0}" = "1" ]; then
  echo "=== [parity] skipped (SKIP_PARITY=1)"
  SUMMARY+=("$(printf '%-18s %-22s %5ss' parity "SKIPPED (SKIP_PARITY)" 0)")
elif [ -n "$KFILES" ]; then
  phase parity-kernels 150 "$PY" -m pytest -q -p no:cacheprovider --durations=5 $KFILES
else
  echo "=== [parity-kernels] no kernel test files found"
  SUMMARY+=("$(printf '%-18s %-22s %5ss' parity-kernels "none found" 0)")
fi
if [ "${SKIP_PARITY:-0}" != "1" ]; then
  phase parity-marked 40 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ $IGNORES
fi

# 2. benchmarks (priority order; each a separate process appending to the same results.csv) ----------
rm -f "$DIR/results.csv" "$DIR/metadata.json" "$DIR/results.md" "$DIR"/*.png
bench ceiling,dense 150 --case-timeout 90
bench decode 55 --case-timeout 45
bench memory,kv-cache 50 --case-timeout 40
bench sparse,topk 60 --case-timeout 40
bench module,generate 45 --case-timeout 30

# 3. optional: transformers drop-in decode throughput (bench/bench_hf.py), only with time to spare ----
if [ $(( TOTAL - $(elapsed) )) -ge 75 ] && [ -f bench/bench_hf.py ]; then
  phase hf-dropin 60 "$PY" -m bench.bench_hf --device cuda --quick --csv "$DIR/hf_dropin.csv"
fi

# 4. report --------------------------------------------------------------------------------------------
TOTAL=$(( TOTAL + 25 ))  # the report always gets its turn
phase report 25 "$PY" -m bench.run --report-only --fill-missing --short --out "$DIR"

echo
echo "=== gpu_check summary ($(elapsed)s total, cap ${TOTAL}s) ==="
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  outputs: $DIR/results.md, results.csv, $(cd "$DIR" && ls ./*.png 2>/dev/null | tr '\n' ' ')logs/"
if [ -f "$DIR/results.csv" ]; then
  "$PY" - "$DIR/results.csv" <<'EOF'
import csv, collections, sys
rows = list(csv.DictReader(open(sys.argv[1])))
c = collections.Counter(r["status"] for r in rows)
print("  rows:", len(rows), dict(c))
bad = [r for r in rows if r["status"] in ("error", "mismatch")]
for r in bad[:15]:
    print(f"  {r['status'].upper()}: [{r['group']}] {r['case']} | {r['provider']} | {r['mode']} | {r['note'][:150]}")
if len(bad) > 15:
    print(f"  ... {len(bad) - 15} more error/mismatch rows in results.csv")
EOF
fi
exit 0
