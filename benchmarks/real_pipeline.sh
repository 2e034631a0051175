#!/usr/bin/env bash
# Real-data numbers for the closing notes: export + gate + benchmark of the fine-tuned Lite0 student and the B4
# teacher on ../shared/data/eyepacs_full (calib split for calibration, val split for the gate, test split for bench).
set -uo pipefail
cd "$(dirname "$0")/.."
RE=.venv/bin/retinaedge
DATA=../shared/data/eyepacs_full
OUT=${OUT:-runs/real}
mkdir -p "$OUT"
for recipe in ort nncf; do
  $RE export --checkpoint runs/lite0_real/best.pt --formats onnx --precisions fp32,int8 --recipe $recipe \
      --calib $DATA --val $DATA --out "$OUT/artifacts_lite0_$recipe" --name "lite0_$recipe" > "$OUT/export_lite0_$recipe.log" 2>&1
done
$RE export --checkpoint runs/lite0_real/best.pt --formats tflite,coreml --precisions fp32,fp16,int8 \
    --calib $DATA --val $DATA --out "$OUT/artifacts_lite0_other" --name lite0 > "$OUT/export_lite0_other.log" 2>&1
$RE export --checkpoint runs/b4_teacher/best.pt --formats onnx --precisions fp32,int8 \
    --calib $DATA --val $DATA --out "$OUT/artifacts_b4" --name b4 > "$OUT/export_b4.log" 2>&1
echo done > "$OUT/exports.done"
