#!/usr/bin/env bash
# The referral-decision figures of a trained student on the shared photos: its operating point (chosen on the val
# splits of eyepacs_full + messidor2), test metrics with 95% intervals and ROC per folder, then every INT8 recipe
# per format exported, judged by the evidence gate on those val photos, and benchmarked on each folder's test split.
# Each recipe is reported as it is (--no-escalate): escalation is `retinaedge export` without that flag.
set -uo pipefail
cd "$(dirname "$0")/.."
RE=${RE:-.venv/bin/retinaedge}
STUDENT=${STUDENT:-runs/lite0_2f/best.pt}
OUT=${OUT:-runs/referral}
FOLDERS=(../shared/data/eyepacs_full ../shared/data/messidor2)
CALIB=(); VAL=()
for f in "${FOLDERS[@]}"; do CALIB+=(--calib "$f"); VAL+=(--val "$f"); done
mkdir -p "$OUT"

$RE operating-point --checkpoint "$STUDENT" --data "${FOLDERS[0]}" --data "${FOLDERS[1]}" | tee "$OUT/operating_point.txt"
for f in "${FOLDERS[@]}"; do
  $RE evaluate --checkpoint "$STUDENT" --data "$f" --split test --out "$OUT/eval" | tee "$OUT/eval_$(basename "$f").txt"
done

export_one() {  # name formats precisions target [extra]
  local name=$1 formats=$2 precisions=$3 target=$4; shift 4
  $RE export --checkpoint "$STUDENT" --formats "$formats" --precisions "$precisions" --target "$target" \
      "${CALIB[@]}" "${VAL[@]}" --val-limit 400 --out "$OUT/artifacts" --name "$name" --no-escalate "$@" \
      > "$OUT/export_${name}.log" 2>&1
  echo "$name: exit $? (0 passed; 1 failed or insufficient evidence)"
}
export_one lite0_onnx onnx fp32,int8 auto             # U8S8 on VNNI/ARM CPUs, U8U8 on AVX2-only ones
export_one lite0_onnx_u8u8 onnx int8 x86_avx2
export_one lite0_litert tflite fp32,int8 auto
export_one lite0_coreml coreml int8 auto               # judged on the PT2E torch graph coremltools converts

for f in "${FOLDERS[@]}"; do
  $RE bench --artifacts "$OUT/artifacts" --data "$f" --split test --torch-checkpoint "$STUDENT" --threads 2 \
      --runs 50 --min-seconds 2 --out "$OUT/bench_$(basename "$f")" > "$OUT/bench_$(basename "$f").log" 2>&1
  echo "bench $(basename "$f"): exit $?"
done
