#!/usr/bin/env bash
# Runs a list of gin configurations as separate training runs and prints one PQ table.
#
# Usage: scripts/sweep.sh SWEEP_FILE OUTPUT_DIR [extra train flags, e.g. --train_data ... \
#                         --eval_data ... --steps N --tpu NAME]
# SWEEP_FILE: one run per line, "name | gin files (space separated) | gin bindings (';'
# separated, optional)"; blank lines and '#' comments are skipped. Example:
#   baseline  | ablations/baseline.gin |
#   no_p2m    | ablations/no_p2m.gin   |
#   alpha_0.5 | ablations/baseline.gin | MaXDeepLabLoss.pq_alpha = 0.5
# Each run trains and evaluates in OUTPUT_DIR/<name> (resuming if it already has
# checkpoints); a failed run is reported in the table and the sweep goes on. Relative paths
# (SWEEP_FILE, OUTPUT_DIR, data, gin files) are taken from the directory you run it in; gin
# files are also looked up in configs/.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,14p "$0" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
SWEEP_FILE=$1; OUTPUT_DIR=$2; shift 2
[ -f "$SWEEP_FILE" ] || { echo "sweep.sh: no sweep file $SWEEP_FILE" >&2; exit 2; }
# ensure_venv.sh works in the repo root; the runs stay in the caller's directory.
(cd "$REPO" && source scripts/ensure_venv.sh)
mkdir -p "$OUTPUT_DIR"

# Strips leading and trailing whitespace and nothing else (quotes in bindings are gin's).
trim() {
  local text=$1
  text=${text#"${text%%[![:space:]]*}"}
  text=${text%"${text##*[![:space:]]}"}
  printf '%s' "$text"
}

names=()
while IFS='|' read -r name files bindings || [ -n "$name" ]; do
  name=$(trim "$name")
  [ -z "$name" ] || [[ "$name" == \#* ]] && continue
  args=()
  # Split on whitespace without expanding globs against the current directory.
  read -ra file_list <<< "${files:-}"
  for f in "${file_list[@]}"; do args+=(--gin_file "$f"); done
  IFS=';' read -ra binding_list <<< "${bindings:-}"
  for b in "${binding_list[@]}"; do
    b=$(trim "$b")
    [ -n "$b" ] && args+=(--gin_bindings "$b")
  done
  echo "=== [$name] max-deeplab train --mode train_and_eval ${args[*]} $*"
  # </dev/null: the loop reads the sweep file on stdin; a run must not consume its lines.
  if "$REPO/.venv/bin/max-deeplab" train --mode train_and_eval --model_dir "$OUTPUT_DIR/$name" \
      "${args[@]}" "$@" < /dev/null > "$OUTPUT_DIR/$name.log" 2>&1; then
    echo "    done (log: $OUTPUT_DIR/$name.log)"
  else
    echo "    FAILED (log: $OUTPUT_DIR/$name.log)"
  fi
  names+=("$name")
done < "$SWEEP_FILE"

"$REPO/.venv/bin/python" - "$OUTPUT_DIR" "${names[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"\n{'run':<28} {'PQ':>6} {'PQ_th':>6} {'PQ_st':>6} {'SQ':>6} {'RQ':>6}")
for name in names:
    path = os.path.join(out, name, "eval", "metrics.json")
    try:
        with open(path) as f:
            m = json.load(f)
        a, t, s = m["All"], m["Things"], m["Stuff"]
        print(f"{name:<28} {100*a['pq']:6.1f} {100*t['pq']:6.1f} {100*s['pq']:6.1f} "
              f"{100*a['sq']:6.1f} {100*a['rq']:6.1f}")
    except (OSError, KeyError, ValueError):
        print(f"{name:<28} {'(no metrics: see ' + name + '.log)':>30}")
PY
