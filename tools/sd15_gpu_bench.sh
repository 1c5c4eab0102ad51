#!/usr/bin/env bash
# The SD1.5 speed and memory bench of issue 20 on a CUDA GPU, at full size on random weights.
#
#   bash tools/sd15_gpu_bench.sh        # from the repository root, CUDA build of torch
#   make sd15-bench                     # the same
#
# Parts (SD15_BENCH_PARTS, default "fabricate eager adapters compile"):
#   fabricate  python -m icd_lite.sd15.fabricate $OUT/model --size full (SD1.5's architecture,
#              float16 files, ~4.5 GB; skipped when $OUT/model/model_index.json exists);
#   eager      python -m icd_lite.bench sd15: iCD (8 NFE) vs DDIM50 / NPI / NTI + P2P, the floor,
#              peak memory; fused students (the default);
#   adapters   the same with the LoRAs as peft adapters, iCD only;
#   compile    torch.compile(mode="reduce-overhead"), iCD only (the first runs compile).
# Reports and JSON under $OUT (SD15_BENCH_OUT, default build/sd15-bench). SD15_BENCH_RUNS: runs
# per median (default 5); SD15_BENCH_DEVICE (default cuda). Real weights instead: SD15_BENCH_ARGS="--base DIR --teacher DIR
# --loras DIR" (then the fabricate part is not needed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
OUT="${SD15_BENCH_OUT:-build/sd15-bench}"
PARTS="${SD15_BENCH_PARTS:-fabricate eager adapters compile}"
RUNS="${SD15_BENCH_RUNS:-5}"
DEVICE="${SD15_BENCH_DEVICE:-cuda}"  # "cpu" with a tiny --model: to try this script without a GPU
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
mkdir -p "$OUT"
MODEL_ARGS="${SD15_BENCH_ARGS:---model $OUT/model}"

part() { [[ " $PARTS " == *" $1 "* ]]; }

if part fabricate && [ ! -f "$OUT/model/model_index.json" ]; then
  if [ -x /usr/bin/time ]; then  # GNU time also reports the peak memory; not every image has it
    /usr/bin/time -f "fabricate: %e s, %M KB" "$PY" -m icd_lite.sd15.fabricate "$OUT/model" --size full
  else
    time "$PY" -m icd_lite.sd15.fabricate "$OUT/model" --size full
  fi
fi
if part eager; then
  "$PY" -m icd_lite.bench sd15 $MODEL_ARGS --device "$DEVICE" --runs "$RUNS" \
    --out "$OUT/eager.json" | tee "$OUT/eager.txt"
fi
if part adapters; then
  "$PY" -m icd_lite.bench sd15 $MODEL_ARGS --device "$DEVICE" --runs "$RUNS" --adapters \
    --skip-baselines --out "$OUT/adapters.json" | tee "$OUT/adapters.txt"
fi
if part compile; then
  "$PY" -m icd_lite.bench sd15 $MODEL_ARGS --device "$DEVICE" --runs "$RUNS" --warmup 3 --compile \
    --skip-baselines --out "$OUT/compile.json" | tee "$OUT/compile.txt"
fi
