#!/usr/bin/env bash
# Trains MaX-DeepLab on a Cloud TPU (paper §4 recipe, TPUStrategy, XLA-compiled steps,
# pure-TF Hungarian matching). Run it on the TPU VM (or a VM that can reach the TPU).
#
# Usage (arguments or environment variables):
#   scripts/train_tpu.sh TPU_NAME MODEL_DIR TRAIN_DATA [GIN_FILE] [EVAL_DATA] [extra train flags...]
#   TPU_NAME=my-tpu MODEL_DIR=gs://bucket/runs/s641 TRAIN_DATA='gs://bucket/coco/train-*' \
#     EVAL_DATA='gs://bucket/coco/val-*' GIN_FILE=max_deeplab_s_coco_641.gin scripts/train_tpu.sh
#
# MODEL_DIR and the data should live in a GCS bucket in the TPU's region. The run resumes
# from the latest checkpoint in MODEL_DIR (e.g. after a preemption). With EVAL_DATA set it
# runs train_and_eval; PQ lands in MODEL_DIR/eval/metrics.json and TensorBoard.
set -euo pipefail
cd "$(dirname "$0")/.."

TPU_NAME=${1:-${TPU_NAME:-}}
MODEL_DIR=${2:-${MODEL_DIR:-}}
TRAIN_DATA=${3:-${TRAIN_DATA:-}}
GIN_FILE=${4:-${GIN_FILE:-max_deeplab_s_coco_641.gin}}
EVAL_DATA=${5:-${EVAL_DATA:-}}
shift $(( $# > 5 ? 5 : $# ))

missing=()
[ -n "$TPU_NAME" ] || missing+=("TPU_NAME")
[ -n "$MODEL_DIR" ] || missing+=("MODEL_DIR")
[ -n "$TRAIN_DATA" ] || missing+=("TRAIN_DATA")
if [ ${#missing[@]} -gt 0 ]; then
  echo "train_tpu.sh: missing ${missing[*]} (see the usage at the top of $0)" >&2
  exit 2
fi

source scripts/ensure_venv.sh
mode=train
eval_flags=()
if [ -n "$EVAL_DATA" ]; then
  mode=train_and_eval
  eval_flags=(--eval_data "$EVAL_DATA")
fi
exec .venv/bin/max-deeplab train \
  --tpu "$TPU_NAME" --strategy tpu --mode "$mode" \
  --model_dir "$MODEL_DIR" --train_data "$TRAIN_DATA" "${eval_flags[@]}" \
  --gin_file "$GIN_FILE" "$@"
