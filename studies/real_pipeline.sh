#!/usr/bin/env bash
# Real-data numbers for the closing notes: export + gate + benchmark of the fine-tuned Lite0 student, the distilled
# student and the B4 teacher on ../shared/data/eyepacs_full (calib split for calibration, train split for QAT,
# val split for the gate, test split for the benchmark). Every INT8 recipe is exported separately so the table
# shows each one's fidelity; `--no-escalate` keeps the automatic escalation out of the single-recipe rows, and
# the `lite0_escalated` row shows where the default escalation ends.
set -uo pipefail
cd "$(dirname "$0")/.."
RE=.venv/bin/retinaedge
DATA=../shared/data/eyepacs_full
OUT=${OUT:-runs/real}
STUDENT=${STUDENT:-runs/lite0_real/best.pt}
TEACHER=${TEACHER:-runs/b4_teacher/best.pt}
mkdir -p "$OUT"
export_onnx() {  # checkpoint name precisions recipe target [extra args]
  local ckpt=$1 name=$2 precisions=$3 recipe=$4 target=$5; shift 5
  $RE export --checkpoint "$ckpt" --formats onnx --precisions "$precisions" --recipe "$recipe" --target "$target" \
      --calib $DATA --val $DATA --out "$OUT/artifacts_${name}" --name "$name" "$@" > "$OUT/export_${name}.log" 2>&1
  echo "$name: exit $?"
}
export_onnx "$STUDENT" lite0_ort_u8u8 fp32,int8 ort x86_avx2 --no-escalate
export_onnx "$STUDENT" lite0_ort_u8s8_rr int8 ort x86_avx2_fast --no-escalate
export_onnx "$STUDENT" lite0_ort_u8s8 int8 ort x86_vnni --no-escalate
export_onnx "$STUDENT" lite0_nncf int8 nncf x86_avx2 --no-escalate
export_onnx "$STUDENT" lite0_qat int8 qat x86_avx2 --qat-steps "${QAT_STEPS:-300}" --no-escalate
$RE export --checkpoint "$STUDENT" --formats tflite,coreml --precisions fp32,fp16,int8 \
    --calib $DATA --val $DATA --out "$OUT/artifacts_lite0_other" --name lite0 > "$OUT/export_lite0_other.log" 2>&1
echo "lite0 tflite/coreml: exit $?"
# TFLite/CoreML have one escalation step, PT2E QAT; --recipe qat shows that step on its own.
$RE export --checkpoint "$STUDENT" --formats tflite,coreml --precisions int8 --recipe qat --qat-steps "${QAT_STEPS:-300}" \
    --calib $DATA --val $DATA --out "$OUT/artifacts_lite0_qat_other" --name lite0_qat > "$OUT/export_lite0_qat_other.log" 2>&1
echo "lite0 tflite/coreml qat: exit $?"
# The two slowest rows (7-9 min each on 2 cores): accuracy-controlled mixed precision and the default escalation.
export_onnx "$STUDENT" lite0_nncf_ac int8 nncf_ac x86_avx2 --no-escalate
export_onnx "$STUDENT" lite0_escalated int8 ort x86_vnni
export_onnx "$TEACHER" b4_ort_u8u8 fp32,int8 ort x86_avx2 --no-escalate
export_onnx "$TEACHER" b4_ort_u8s8_rr int8 ort x86_avx2_fast --no-escalate
export_onnx "$TEACHER" b4_nncf int8 nncf x86_avx2 --no-escalate
$RE export --checkpoint "$TEACHER" --formats tflite,coreml --precisions fp32,fp16,int8 \
    --calib $DATA --val $DATA --out "$OUT/artifacts_b4_other" --name b4 > "$OUT/export_b4_other.log" 2>&1
echo "b4 tflite/coreml: exit $?"
echo done > "$OUT/exports.done"
