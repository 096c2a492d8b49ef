#!/usr/bin/env bash
# The quickstart: synthetic COCO-format data -> TFRecords -> train the tiny model on CPU ->
# evaluate PQ -> export a SavedModel -> predict on validation images.
# Usage: scripts/quickstart.sh [OUTPUT_DIR (default: quickstart_output)]
# OUTPUT_DIR is relative to the directory you run it in.
# Set QUICKSTART_STEPS to change the number of training steps (default: configs/quickstart.gin).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-quickstart_output}
# ensure_venv.sh works in the repo root; the steps stay in the caller's directory.
(cd "$REPO" && source scripts/ensure_venv.sh)
MD="$REPO/.venv/bin/max-deeplab"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
step_flags=()
[ -n "${QUICKSTART_STEPS:-}" ] && step_flags=(--steps "$QUICKSTART_STEPS")
start=$(date +%s)
say() { printf '\n=== [%4ds] %s\n' $(( $(date +%s) - start )) "$*"; }

say "1/6 synthetic data set -> $OUT/data"
"$MD" synthetic --output_dir "$OUT/data" --num_images 600 --num_val_images 50 --seed 0 --overwrite

say "2/6 convert to TFRecords -> $OUT/tfrecords"
for split in train val; do
  "$MD" convert --annotations "$OUT/data/annotations/panoptic_$split.json" \
    --images "$OUT/data/$split" --panoptic "$OUT/data/panoptic_$split" \
    --output "$OUT/tfrecords/$split" --num_shards 2
done

say "3/6 train the tiny model (configs/quickstart.gin) -> $OUT/model"
"$MD" train --strategy one_device --model_dir "$OUT/model" --gin_file quickstart.gin \
  --train_data "$OUT/tfrecords/train-*" --eval_data "$OUT/tfrecords/val-*" "${step_flags[@]}"

say "4/6 evaluate PQ on the validation split -> $OUT/model/eval/metrics.json"
"$MD" evaluate --model_dir "$OUT/model" --strategy one_device

say "5/6 export a SavedModel -> $OUT/export"
rm -rf "$OUT/export"
# The model config and the data-set metadata come from the run (config.gin, run.json).
"$MD" export --checkpoint "$OUT/model" --export_dir "$OUT/export"

say "6/6 predict on the validation images -> $OUT/predictions"
"$MD" predict --saved_model "$OUT/export" --images "$OUT/data/val/*.jpg" \
  --output_dir "$OUT/predictions"

say "done. Outputs:"
cat <<TXT
  data set (COCO panoptic format)   $OUT/data
  TFRecords + metadata               $OUT/tfrecords
  checkpoints, TensorBoard, config   $OUT/model        (tensorboard --logdir $OUT/model)
  PQ metrics                         $OUT/model/eval/metrics.json
  SavedModel                         $OUT/export
  overlays (PNG)                     $OUT/predictions/overlays
  COCO panoptic predictions          $OUT/predictions/predictions.json, $OUT/predictions/panoptic
TXT
"$REPO/.venv/bin/python" -c "import json,sys; m=json.load(open(sys.argv[1]))['All']; print(f\"PQ on the synthetic validation split: {100*m['pq']:.1f} (SQ {100*m['sq']:.1f}, RQ {100*m['rq']:.1f})\")" "$OUT/model/eval/metrics.json"
