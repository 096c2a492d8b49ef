#!/usr/bin/env bash
# Trains MaX-DeepLab on a Cloud TPU (paper §4 recipe, TPUStrategy, XLA-compiled steps,
# pure-TF Hungarian matching). Run it on the TPU VM (or a VM that can reach the TPU).
#
# Usage (arguments or environment variables):
#   scripts/train_tpu.sh TPU_NAME MODEL_DIR TRAIN_DATA [GIN_FILE] [EVAL_DATA] [extra train flags...]
#   TPU_NAME=my-tpu MODEL_DIR=gs://bucket/runs/s641 TRAIN_DATA='gs://bucket/coco/train-*' \
#     EVAL_DATA='gs://bucket/coco/val-*' GIN_FILE=max_deeplab_s_coco_641.gin scripts/train_tpu.sh
# The positional arguments end at the first one starting with "-": from there on everything
# goes to `max-deeplab train` (e.g. `scripts/train_tpu.sh --steps 1000` with the variables
# set). Relative paths are taken from the directory you run it in; GIN_FILE is also looked up
# in configs/.
#
# MODEL_DIR and the data should live in a GCS bucket in the TPU's region. The run resumes
# from the latest checkpoint in MODEL_DIR (e.g. after a preemption). With EVAL_DATA set it
# runs train_and_eval; PQ lands in MODEL_DIR/eval/metrics.json and TensorBoard.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

positional=()
while [ $# -gt 0 ] && [ ${#positional[@]} -lt 5 ] && [[ "$1" != -* ]]; do
  positional+=("$1")
  shift
done
# An empty positional (e.g. '' for GIN_FILE) falls back to the variable / default.
TPU_NAME=${positional[0]:-${TPU_NAME:-}}
MODEL_DIR=${positional[1]:-${MODEL_DIR:-}}
TRAIN_DATA=${positional[2]:-${TRAIN_DATA:-}}
GIN_FILE=${positional[3]:-${GIN_FILE:-max_deeplab_s_coco_641.gin}}
EVAL_DATA=${positional[4]:-${EVAL_DATA:-}}

missing=()
[ -n "$TPU_NAME" ] || missing+=("TPU_NAME")
[ -n "$MODEL_DIR" ] || missing+=("MODEL_DIR")
[ -n "$TRAIN_DATA" ] || missing+=("TRAIN_DATA")
if [ ${#missing[@]} -gt 0 ]; then
  echo "train_tpu.sh: missing ${missing[*]} (see the usage at the top of $0)" >&2
  exit 2
fi

# ensure_venv.sh works in the repo root; the run itself stays in the caller's directory so
# relative paths mean what the caller meant.
(cd "$REPO" && source scripts/ensure_venv.sh)
mode=train
eval_flags=()
if [ -n "$EVAL_DATA" ]; then
  mode=train_and_eval
  eval_flags=(--eval_data "$EVAL_DATA")
fi
exec "$REPO/.venv/bin/max-deeplab" train \
  --tpu "$TPU_NAME" --strategy tpu --mode "$mode" \
  --model_dir "$MODEL_DIR" --train_data "$TRAIN_DATA" "${eval_flags[@]}" \
  --gin_file "$GIN_FILE" "$@"
