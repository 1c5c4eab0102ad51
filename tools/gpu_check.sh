#!/usr/bin/env bash
# make gpu-check: run icd-lite end to end on a CUDA GPU, small, and time every part.
#
#   make venv TORCH_SPEC=torch     # once: a CUDA build of torch
#   bash tools/gpu_check.sh        # from the repository root (or: make gpu-check)
#
# Parts, in order (each timed; a table of the times is printed at the end, also on failure):
#   1. CPU vs GPU: pipe.generate and pipe.reconstruct with the same seeds on cpu and cuda; the
#      max |difference| of the images must stay under 1e-3 (TF32 off for the comparison; the
#      difference with torch's default TF32 convolutions is printed for information);
#   2. every notebook in notebooks/ through papermill, -p device cuda and small parameters (only
#      those the notebook declares); executed copies and figures under build/gpu-check/, so the
#      committed figures/ are never touched;
#   3. python -m icd_lite.bench world / inversion / editing at small n, --device cuda;
#   4. python -m icd_lite generate / invert / edit once each, --device cuda.
# Stops at the first failure (set -euo pipefail) and shows the end of that part's log.
#
# Environment: PY (default .venv/bin/python); GPU_CHECK_DEVICE (default cuda; "cpu" runs every
# part on the CPU instead, skipping the CUDA check - to test this script on a machine without a
# GPU); GPU_CHECK_OUT (default build/gpu-check); GPU_CHECK_PARTS (default "equality notebooks
# benches cli": a subset runs only those parts).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT="${GPU_CHECK_OUT:-build/gpu-check}"
PARTS="${GPU_CHECK_PARTS:-equality notebooks benches cli}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
export ICD_LITE_FIGURES="$OUT/figures"   # never the committed figures/
export GPU_CHECK_DEVICE="$DEVICE"

if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY; make the environment first: make venv TORCH_SPEC=torch" >&2
  exit 1
fi
if [ "$DEVICE" = cuda ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA" \
         "GPU. Run this on a CUDA machine with a CUDA build of torch (make venv" \
         "TORCH_SPEC=torch), or set GPU_CHECK_DEVICE=cpu to run the same parts on the CPU." >&2
    exit 1
  fi
  "$PY" -c 'import torch; print("gpu_check: torch", torch.__version__, "on",
            torch.cuda.get_device_name(0))'
else
  echo "gpu_check: GPU_CHECK_DEVICE=$DEVICE: every part runs on $DEVICE, the CUDA check is skipped"
fi

mkdir -p "$OUT/logs" "$OUT/notebooks" "$OUT/figures" "$OUT/cli" "$OUT/bench"
NAMES=()
SECONDS_TAKEN=()
STATUS=()

summary() {
  local code=$?
  echo
  echo "gpu_check on $DEVICE: seconds per part (logs in $OUT/logs/)"
  printf '  %-34s %9s  %s\n' part seconds status
  local total=0 i
  for i in "${!NAMES[@]}"; do
    printf '  %-34s %9s  %s\n' "${NAMES[$i]}" "${SECONDS_TAKEN[$i]}" "${STATUS[$i]}"
    total=$(awk -v a="$total" -v b="${SECONDS_TAKEN[$i]}" 'BEGIN { printf "%.1f", a + b }')
  done
  printf '  %-34s %9s\n' total "$total"
  if [ "$code" -ne 0 ]; then echo "gpu_check: FAILED (exit $code)"; else echo "gpu_check: OK"; fi
}
trap summary EXIT

# run NAME COMMAND...: run one part with its output in $OUT/logs/NAME.log, timed.
run() {
  local name=$1 log start end code=0
  log="$OUT/logs/$(printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_').log"
  shift
  echo "== $name"
  start=$(date +%s.%N)
  # In a background subshell, so that set -e stops a multi-command part at its first failure
  # (bash ignores set -e inside a function whose status is tested, as with `part || ...`).
  ( set -euo pipefail; "$@" ) >"$log" 2>&1 &
  wait $! || code=$?
  end=$(date +%s.%N)
  NAMES+=("$name")
  SECONDS_TAKEN+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')")
  if [ "$code" -ne 0 ]; then
    STATUS+=("FAILED")
    echo "   FAILED (exit $code); the end of $log:" >&2
    tail -n 40 "$log" | sed 's/^/   | /' >&2
    exit "$code"
  fi
  STATUS+=("ok")
  grep -v -e '%|' -e '^\s*$' "$log" | tail -n "${SHOW_LINES:-4}" | sed 's/^/   | /' || true
}

wants() { [[ " $PARTS " == *" $1 "* ]]; }

# -- 1. the same seed on the CPU and on the device ----------------------------------------------
equality() {
  "$PY" - <<'EOF'
import os

import torch

from icd_lite import load_components, load_pipeline
from icd_lite.world.scenes import make_dataset

device = os.environ["GPU_CHECK_DEVICE"]
prompts = ["a small red circle on a gray background",
           "a large blue square on a white background",
           "a small yellow triangle on a striped green background",
           "a large purple diamond on a black background"]
images, captions, _ = make_dataset(4, seed=21)
pipes = {name: load_pipeline("G", load_components("toy", device=name))
         for name in ("cpu", device)}


def outputs(pipe):
    return {"generate (w 8, tau 0.8)": pipe.generate(prompts, w=8.0, tau=0.8, seed=1).images,
            "reconstruct (w 1)": pipe.reconstruct(images, captions, seed=2).images,
            "reconstruct (w 8, tau 0.8)": pipe.reconstruct(images, captions, w=8.0, tau=0.8,
                                                           seed=2).images}


def differences():
    on_cpu, on_device = outputs(pipes["cpu"]), outputs(pipes[device])
    return {k: (on_cpu[k] - on_device[k].cpu()).abs().max().item() for k in on_cpu}


tolerance, failed = 1e-3, []
defaults = differences()  # torch's defaults: cuDNN may convolve in TF32 on recent GPUs
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
for name, difference in differences().items():
    print(f"max |cpu - {device}| {name:<28} {difference:.2e} (tolerance {tolerance:g}; "
          f"with default TF32 settings {defaults[name]:.2e})")
    if not difference <= tolerance:
        failed.append(name)
if failed:
    raise SystemExit(f"CPU and {device} differ beyond {tolerance:g} in: {', '.join(failed)}")
EOF
}

# -- 2. the notebooks, small --------------------------------------------------------------------
# The small value of every parameter a notebook may declare; each notebook gets only the names
# its parameters cell declares (python -m icd_lite.notebook_params list).
notebook_params() {
  "$PY" - "$1" "$2" <<'EOF'
import json
import sys

from icd_lite.notebook_params import declared_parameters

SMALL = {"device": sys.argv[2], "n_points": 500, "fit_steps": 100, "distill_steps": 40,
         "distill_batch": 64, "n_eval": 16, "guidance_scales": [1.0, 8.0], "train_steps": 2,
         "n_images": 16, "n_table1": 8, "n_timing": 1, "per_type": 1, "nti_per_type": 1,
         "w_sweep": [2.0, 8.0], "teacher_w_sweep": [2.0]}
declared = declared_parameters(sys.argv[1])
print(json.dumps({name: value for name, value in SMALL.items() if name in declared}))
EOF
}

notebook() {
  local nb=$1 params="$OUT/notebooks/$(basename "$1" .ipynb).params.json"
  notebook_params "$nb" "$DEVICE" >"$params"
  echo "parameters: $(cat "$params")"
  "$PY" -m papermill --kernel python3 --cwd notebooks --log-level WARNING -f "$params" \
    "$nb" "$OUT/notebooks/$(basename "$nb")"
}

# -- 4. the command line ------------------------------------------------------------------------
cli() {
  local prompt="a large green square on a white background" dir="$OUT/cli"
  "$PY" -m icd_lite generate --prompt "$prompt" --out "$dir/generated.png" --device "$DEVICE"
  "$PY" -m icd_lite invert --image "$dir/generated.png" --prompt "$prompt" \
    --out "$dir/noise.safetensors" --reconstruction "$dir/reconstruction.png" --device "$DEVICE"
  "$PY" -m icd_lite edit --image "$dir/generated.png" --source "$prompt" \
    --target "${prompt/green/purple}" --blend square --out "$dir/edited.png" --device "$DEVICE"
}

if wants equality; then SHOW_LINES=6 run "cpu-vs-$DEVICE" equality; fi
if wants notebooks; then
  for nb in notebooks/[0-9][0-9]_*.ipynb; do
    run "notebook $(basename "$nb" .ipynb)" notebook "$nb"
  done
fi
if wants benches; then
  BENCH=("$PY" -m icd_lite.bench --device "$DEVICE" --out-dir "$OUT/bench")
  run "bench world (n 16)" "${BENCH[@]}" world --n 16
  run "bench inversion (n 8)" "${BENCH[@]}" inversion --n 8 --timing 1
  run "bench editing (1 per type)" "${BENCH[@]}" editing --n 1 --timing 1 --nti-per-type 1
fi
if wants cli; then SHOW_LINES=3 run "cli generate/invert/edit" cli; fi
