#!/usr/bin/env bash
# The device check: one script, about ten minutes on one H100/H200, from a fresh clone.
#
#     bash bench/gpu_check.sh             # on the GPU machine: builds, tests, measures, writes results
#     bash bench/gpu_check.sh --dry-run   # anywhere: prints what each section would run, writes nothing
#
# Works offline. It builds the C++ extension without build isolation (the machine's own setuptools and
# pybind11) into a virtual environment that sees the system's torch/triton/transformers/peft
# (build/gpu-venv, --system-site-packages). Optional wheels that are not on the machine (pytest,
# hypothesis, liger-kernel, trl, flash-attn, ...) are installed from $WHEELS (default bench/wheels) when
# that folder exists; each absent optional baseline is skipped by its benchmark with a line saying so.
#
# Sections, each time-boxed with `timeout` (seconds; the sum stays near ten minutes):
#   install 150   extension build + optional wheels
#   env      30   bench/results/gpu-env.json: card, driver, CUDA, Python and library versions, commit
#   tests   150   pytest -m cuda (every CUDA-only test)
#   attention 75  python -m bench.bench_varlen_attention
#   loss     75   python -m bench.bench_linear_cross_entropy (vs full logits, and Liger when installed)
#   train   180   python -m bench.bench_train on the Qwen2.5-1.5B shape
# Every section writes bench/results/gpu-<section>.md (the card's name, date, commit, command, exit
# status and its output); the benchmarks write bench/results/gpu-*.{jsonl,csv} (SOULCHAT_BENCH_PREFIX).
# bench/results/gpu-summary.md lists the sections and their status. Exit status 1 if a section failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run or nothing)"; exit 2 ;;
esac

RESULTS=bench/results
WHEELS=${WHEELS:-bench/wheels}
VENV=${GPU_VENV:-build/gpu-venv}
TRAIN_SHAPE=${TRAIN_SHAPE:-1.5b}
TRAIN_METHODS=${TRAIN_METHODS:-hf_flattening,soulchat}
export SOULCHAT_BENCH_PREFIX=gpu-
PY=${PYTHON:-python3}

gpu_name() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1
}

CARD=$(gpu_name)
SKIP=""
if [[ $DRY_RUN == 1 ]]; then
  SKIP="dry run"
elif [[ -z "$CARD" ]]; then
  SKIP="no NVIDIA GPU here (nvidia-smi finds none)"
fi
CARD=${CARD:-none}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
SECTIONS=()
STATUSES=()

# run_section NAME SECONDS COMMAND...: run COMMAND time-boxed; its output goes to the terminal and to
# bench/results/gpu-NAME.md. Skipped (with a line saying why) on a dry run or without a GPU.
run_section() {
  local name=$1 limit=$2
  shift 2
  if [[ -n "$SKIP" ]]; then
    echo "[$name] skipped: $SKIP; would run (time box ${limit}s): $*"
    return 0
  fi
  echo "[$name] $* (time box ${limit}s)"
  local log start status
  log=$(mktemp)
  start=$SECONDS
  # bash -c: COMMAND may be one of the (exported) functions below; timeout runs only programs.
  timeout --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  mkdir -p "$RESULTS"
  {
    echo "# gpu check: $name on $CARD"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT"
    echo "- command: \`$*\`"
    echo "- exit status: $status$([[ $status == 124 || $status == 137 ]] && echo " (stopped at the ${limit} s time box)")"
    echo "- wall time: $((SECONDS - start)) s"
    echo
    echo '```'
    cat "$log"
    echo '```'
  } >"$RESULTS/gpu-$name.md"
  rm -f "$log"
  SECTIONS+=("$name")
  STATUSES+=("$status")
  return 0
}

# --- install: a virtual environment over the system packages, the extension, optional wheels --------
install() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv --system-site-packages "$VENV" || {
      echo "install: cannot create $VENV (python3 -m venv); set PYTHON to a Python with venv"
      return 2
    }
  fi
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "install: optional wheels from $WHEELS: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
    "$VENV/bin/python" -m pip install --no-index --no-deps "$WHEELS"/*.whl || return 1
  else
    echo "install: no $WHEELS/*.whl; optional packages not on this machine stay absent"
  fi
  "$VENV/bin/python" -m pip install --no-index --no-deps --no-build-isolation -e . || return 1
  "$VENV/bin/python" - <<'EOF'
import importlib.util, torch, soulchat._packer  # noqa: F401  (the extension imports)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}")
for name in ("pytest", "hypothesis", "liger_kernel", "trl", "flash_attn", "peft"):
    print(f"  {name}: {'installed' if importlib.util.find_spec(name) else 'absent'}")
EOF
}

# --- env: bench/results/gpu-env.json ---------------------------------------------------------------
record_env() {
  "$VENV/bin/python" - <<'EOF'
import json, subprocess
from bench.common import RESULTS_DIR, environment

env = environment()
query = "name,driver_version,memory.total,compute_cap"
smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                     capture_output=True, text=True, check=True).stdout.strip().splitlines()
env["nvidia_smi"] = [dict(zip(query.split(","), (f.strip() for f in line.split(",")))) for line in smi]
path = RESULTS_DIR / "gpu-env.json"
path.write_text(json.dumps(env, indent=2) + "\n")
print(json.dumps(env, indent=2))
print(f"wrote {path}")
EOF
}

# --- tests: every CUDA-only test (modules whose test-only imports are absent are reported, not fatal) -
cuda_tests() {
  if ! "$VENV/bin/python" -c "import pytest" 2>/dev/null; then
    echo "tests: pytest is not installed here; bring its wheels (pip download pytest hypothesis -d bench/wheels"
    echo "       on a machine with network) and run again"
    return 2
  fi
  "$VENV/bin/python" -m pytest -m cuda -q -rs --continue-on-collection-errors tests
}

# --- train: bench_train in a scratch folder, its files copied as gpu-train.* ------------------------
bench_train() {
  local out
  out=$(mktemp -d)
  "$VENV/bin/python" -m bench.bench_train --device cuda --model-shape "$TRAIN_SHAPE" --data synth \
    --steps 10 --warmup-steps 2 --methods "$TRAIN_METHODS" --out "$out"
  local status=$?
  for f in "$out"/gpu-train.jsonl "$out"/gpu-train.csv; do [[ -f $f ]] && cp "$f" "$RESULTS/"; done
  [[ -f "$out/train.png" ]] && cp "$out/train.png" "$RESULTS/gpu-train.png"
  rm -rf "$out"
  return $status
}

export RESULTS WHEELS VENV PY TRAIN_SHAPE TRAIN_METHODS
export -f install record_env cuda_tests bench_train

echo "gpu check on: $CARD (commit $COMMIT)"
run_section install 150 install
if [[ -z "$SKIP" && ${STATUSES[0]} != 0 ]]; then
  SKIP="the install section failed (see $RESULTS/gpu-install.md)"
fi
run_section env 30 record_env
run_section tests 150 cuda_tests
run_section attention 75 "$VENV/bin/python" -m bench.bench_varlen_attention
run_section loss 75 "$VENV/bin/python" -m bench.bench_linear_cross_entropy
run_section train 180 bench_train

if [[ ${#SECTIONS[@]} == 0 ]]; then
  echo "gpu check: every section skipped ($SKIP); nothing written"
  exit 0
fi
failed=0
{
  echo "# gpu check on $CARD"
  echo
  echo "commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| section | exit status |"
  echo "|---|---|"
  for i in "${!SECTIONS[@]}"; do
    echo "| ${SECTIONS[$i]} | ${STATUSES[$i]} |"
    [[ ${STATUSES[$i]} == 0 ]] || failed=1
  done
} >"$RESULTS/gpu-summary.md"
cat "$RESULTS/gpu-summary.md"
exit $failed
