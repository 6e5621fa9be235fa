#!/usr/bin/env bash
# The GPU checks in one run, within 10 minutes, ending with one summary.
#
# Needs: a CUDA GPU visible to a Python that has a CUDA build of torch and this package
# installed (`pip install -e '.[dev]'`). That Python is `$GPU_PY` if set, else `.venv/bin/python`
# if it exists, else `python3`. For the vLLM parts also: vLLM (CUDA build) next to
# `$SPO_VLLM_PYTHON`, `.venv-vllm/bin/python` or that same Python (as
# `spo_agents.serving.vllm_server.default_python` finds it), and for the NCCL weight sync `trl`
# and `vllm` next to the learner's Python. Parts whose requirements are missing are reported
# as skipped with the reason.
#
# What it runs, each under its own time limit (seconds, the sum is under 10 minutes):
#   1. gpu tests          `pytest -m "gpu and not vllm"` (tests/test_gpu.py)             200 s
#   2. learner benchmark  bench/learner_gpu.py, a smaller batch than its default           120 s
#   3. length-tail rollout bench/rollout_throughput.py --engine vllm, sigma 1.0            130 s
#   4. NCCL weight sync   pytest -m gpu tests/vllm_server/test_nccl_gpu.py                140 s
#
# Usage: bash bench/gpu_check.sh        (from the repository root or anywhere)
# Exit status: 0 every part that ran passed, 1 a part failed or ran out of time, 2 no CUDA GPU
# or no such Python (nothing was run). Logs of each part go to $GPU_CHECK_LOGS (default: a new temporary folder).
set -u

cd "$(dirname "$0")/.." || exit 1
if [ -n "${GPU_PY:-}" ]; then
    PY=$GPU_PY
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: the Python \`$PY\` does not exist; set GPU_PY to a Python with CUDA torch. Nothing was run." >&2
    exit 2
fi
probe=$("$PY" - <<'EOF' 2>&1
try:
    import torch
except Exception as e:
    print(f"torch does not import ({e})")
    raise SystemExit(1)
if not torch.cuda.is_available():
    build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
    print(f"torch {torch.__version__} ({build}) sees no CUDA device")
    raise SystemExit(1)
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
)
if [ $? -ne 0 ]; then
    echo "gpu_check: no CUDA GPU: ${probe##*$'\n'} (Python: $PY). Nothing was run." >&2
    echo "gpu_check: run it on a machine with a CUDA GPU, with GPU_PY set to a Python that has CUDA torch" \
        "and this package installed (pip install -e '.[dev]')." >&2
    exit 2
fi

LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t spo-gpu-check-XXXXXX)}
mkdir -p "$LOGS"
echo "gpu_check: $probe; Python $PY; logs in $LOGS"
START=$SECONDS
declare -a SUMMARY=()
FAILED=0

# run NAME LIMIT_S CMD...: the command under `timeout`, its output in $LOGS/NAME.log
run() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS status
    echo "gpu_check: [$name] $* (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        status=passed
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="out of time (${limit} s)"
        FAILED=1
    else
        status="failed (exit $rc)"
        FAILED=1
    fi
    local line
    line=$(grep -E "passed|failed|skipped|error" "$LOGS/$name.log" | tail -n 1)
    SUMMARY+=("$name: $status in $((SECONDS - t0)) s${line:+ | $line}")
}

skip() {
    SUMMARY+=("$1: skipped ($2)")
}

run gpu-tests 200 "$PY" -m pytest -q -m "gpu and not vllm" -p no:cacheprovider tests/test_gpu.py
run learner-bench 120 "$PY" bench/learner_gpu.py --batch 32 --prompt 512 --response 1024 --json "$LOGS/learner_gpu.json"
if [ -f "$LOGS/learner_gpu.json" ]; then
    SUMMARY+=("  learner figures: $(tr -d '\n' <"$LOGS/learner_gpu.json" | head -c 600)")
fi

VLLM_PY=$("$PY" -c "from spo_agents.serving.vllm_server import default_python; print(default_python())" 2>/dev/null)
if [ -n "$VLLM_PY" ] && "$VLLM_PY" -c "import vllm" >/dev/null 2>&1; then
    run rollout-length-tail 130 "$PY" bench/rollout_throughput.py --engine vllm --sigmas 1.0 --steps 2 \
        --json "$LOGS/rollout.json"
    if "$PY" -c "import trl, vllm" >/dev/null 2>&1; then
        run nccl-sync 140 "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/vllm_server/test_nccl_gpu.py
    else
        skip nccl-sync "trl and vllm are not both importable from $PY"
    fi
else
    skip rollout-length-tail "no vLLM next to ${VLLM_PY:-$PY} (set SPO_VLLM_PYTHON)"
    skip nccl-sync "no vLLM next to ${VLLM_PY:-$PY}"
fi

echo
echo "gpu_check summary ($probe; $((SECONDS - START)) s; logs in $LOGS):"
for line in "${SUMMARY[@]}"; do
    echo "  $line"
done
exit $FAILED
