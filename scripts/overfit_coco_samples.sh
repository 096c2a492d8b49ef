#!/usr/bin/env bash
# Real-data sanity check: train the tiny model (configs/overfit_coco_samples.gin, 133 COCO
# classes) on the two bundled COCO val2017 photos and evaluate it on them — the classic
# end-to-end test of a set-prediction model (matching, void class, crowd, things vs stuff).
#   1. convert data/samples/coco_val2017 to TFRecords
#   2. train --mode train_and_eval (PQ at the model's input size every eval_interval steps)
#   3. export a SavedModel, predict on the photos at their real sizes
#   4. pq of the predictions against the COCO ground truth (COCO evaluator semantics), and
#      the ground truth and the predictions drawn side by side
# Prints the PQ curve and the final PQ (All / Things / Stuff).
# Usage: scripts/overfit_coco_samples.sh [OUTPUT_DIR (default: overfit_coco_output)]
# OUTPUT_DIR is relative to the directory you run it in; the outputs of an earlier run in it
# are replaced.
# Set OVERFIT_STEPS to change the number of training steps (default: the gin config's) and
# OVERFIT_SEED the run's seed (default 0: the same initialisation, data order and
# augmentation every time; `train --seed`).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-overfit_coco_output}
(cd "$REPO" && source scripts/ensure_venv.sh)
MD="$REPO/.venv/bin/max-deeplab"
SAMPLES="$REPO/data/samples/coco_val2017"
GT_JSON="$SAMPLES/panoptic_val2017_two_images.json"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
step_flags=()
[ -n "${OVERFIT_STEPS:-}" ] && step_flags=(--steps "$OVERFIT_STEPS")
# A fresh run: what an earlier run left here (a finished model would be resumed) goes.
rm -rf "$OUT/tfrecords" "$OUT/model" "$OUT/export" "$OUT/predictions" "$OUT/compare"
mkdir -p "$OUT"
start=$(date +%s)
say() { printf '\n=== [%4ds] %s\n' $(( $(date +%s) - start )) "$*"; }

say "1/4 convert the two photos -> $OUT/tfrecords"
"$MD" convert --annotations "$GT_JSON" --images "$SAMPLES/images" \
  --panoptic "$SAMPLES/panoptic" --output "$OUT/tfrecords/coco2" --num_shards 1

say "2/4 train and evaluate on them (configs/overfit_coco_samples.gin) -> $OUT/model"
train_start=$(date +%s)
"$MD" train --strategy one_device --mode train_and_eval --model_dir "$OUT/model" \
  --gin_file overfit_coco_samples.gin --train_data "$OUT/tfrecords/coco2-*" \
  --eval_data "$OUT/tfrecords/coco2-*" --seed "${OVERFIT_SEED:-0}" ${step_flags[@]+"${step_flags[@]}"} \
  2>&1 | tee "$OUT/train.log"
train_end=$(date +%s)

say "3/4 export, predict on the photos at their real sizes -> $OUT/predictions"
"$MD" export --checkpoint "$OUT/model" --export_dir "$OUT/export"
"$MD" predict --saved_model "$OUT/export" --images "$SAMPLES/images/*.jpg" \
  --images_json "$GT_JSON" --output_dir "$OUT/predictions"

say "4/4 PQ of the predictions (COCO evaluator semantics) -> $OUT/pq.json"
"$MD" pq --gt_json "$GT_JSON" --gt_dir "$SAMPLES/panoptic" \
  --pred_json "$OUT/predictions/predictions.json" --pred_dir "$OUT/predictions/panoptic" \
  --output "$OUT/pq.json"
"$MD" overlay --gt_json "$GT_JSON" --gt_dir "$SAMPLES/panoptic" --images_dir "$SAMPLES/images" \
  --pred_json "$OUT/predictions/predictions.json" --pred_dir "$OUT/predictions/panoptic" \
  --output_dir "$OUT/compare" --scale 0.5 --combined "$OUT/compare.png"

say "done in $(( $(date +%s) - start )) s (training $(( train_end - train_start )) s). Outputs:"
cat <<TXT
  training log, checkpoints         $OUT/train.log, $OUT/model
  predictions (overlays, COCO PNGs) $OUT/predictions
  PQ (COCO semantics, real size)    $OUT/pq.json
  ground truth | prediction         $OUT/compare/*.png, $OUT/compare.png
TXT
"$REPO/.venv/bin/python" - "$OUT/train.log" "$OUT/pq.json" <<'PY'
import json, re, sys
log, pq_json = sys.argv[1:3]
# train prints "eval at step N | <losses>", then a PQ table with rows "All | PQ SQ RQ N".
curve, step, values = [], None, {}
for line in open(log):
    match = re.match(r"eval at step (\d+) \|", line)
    if match:
        step, values = int(match.group(1)), {}
        continue
    match = re.match(r"(All|Things|Stuff)\s*\|\s*([0-9.]+)", line)
    if step is not None and match:
        values[match.group(1)] = float(match.group(2))
        if len(values) == 3:
            curve.append((step, values))
            step = None
print("\nPQ curve (evaluation during training, at the model's 257x385 input):")
print("   step     PQ  Things   Stuff")
for step, v in curve:
    print(f"  {step:5d}  {v['All']:5.1f}   {v['Things']:5.1f}   {v['Stuff']:5.1f}")
m = json.load(open(pq_json))
print("\nPQ of the exported model's predictions at the photos' real sizes (max-deeplab pq): "
      f"All {100 * m['All']['pq']:.1f}, Things {100 * m['Things']['pq']:.1f}, "
      f"Stuff {100 * m['Stuff']['pq']:.1f}")
PY
