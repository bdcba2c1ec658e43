#!/usr/bin/env bash
# How well each `[events] transform` segments implicit play counts by taste: for generated
# realistic implicit sets (log-normal activity, Pareto session lengths, Zipf catalogue,
# planted tastes as the truth) of several seeds and shapes, `segmenter replay` under every
# transform and scikit-learn's PCA + KMeans on the same transformed matrix
# (scripts/implicit_transforms.py), each scored by its ARI against the planted tastes.
#
# Usage: scripts/implicit-transforms.sh            (SKIP_BUILD=1 to use the built binary)
# Prints one line per shape and transform, and a JSON line each (prefix "JSON ").
set -euo pipefail
cd "$(dirname "$0")/.."

# Python side, pinned, in a venv of its own (sets py).
source scripts/bench-venv.sh
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bin segmenter
seg="$PWD/target/release/segmenter"
transforms=(none binary sqrt log1p l2 binary+l2 sqrt+l2 log1p+l2)

# users items sessions tastes seed: the four shapes of tests/value_transforms.rs, then a
# sparser one with more tastes where the recipe falls short.
shapes=(
  "5000 1000 600000 8 1"
  "5000 1000 600000 8 2"
  "3000 2000 450000 6 3"
  "4000 600 500000 10 4"
  "2000 3000 300000 12 5"
)
export SEGMENTER_EVENTS__MODE=implicit SEGMENTER_EVENTS__MAX_VALUE=1000000
printf '%-40s %-10s %10s %12s\n' "shape (users items sessions tastes seed)" transform segmenter scikit-learn
for shape in "${shapes[@]}"; do
  read -r users items sessions tastes seed <<< "$shape"
  dir="target/implicit-transforms/$users-$items-$sessions-$tastes-$seed"
  mkdir -p "$dir/assignments"
  if [ ! -s "$dir/truth.csv" ]; then
    "$seg" generate --mode implicit --profile realistic --users "$users" --items "$items" \
      --events "$sessions" --segments "$tastes" --seed "$seed" \
      --out "$dir/ratings.csv" --truth-out "$dir/truth.csv" 2> /dev/null
  fi
  for t in "${transforms[@]}"; do
    rm -rf "$dir/state"
    SEGMENTER_EVENTS__TRANSFORM="$t" "$seg" replay --ratings "$dir/ratings.csv" \
      --clusters "$tastes" --state-dir "$dir/state" --no-diagnostics \
      --assignments-out "$dir/assignments/$t.csv" > /dev/null 2> "$dir/replay.err" ||
      { echo "replay failed ($shape, $t):" >&2; tail -n 5 "$dir/replay.err" >&2; exit 1; }
  done
  rm -rf "$dir/state"
  "$py" scripts/implicit_transforms.py --ratings "$dir/ratings.csv" --truth "$dir/truth.csv" \
    --assignments-dir "$dir/assignments" | while read -r line; do
    echo "JSON {\"shape\": \"$shape\", ${line#\{}"
    "$py" -c 'import json, sys; r = json.loads(sys.argv[2]); print("{:<40} {:<10} {:>10.3f} {:>12.3f}".format(sys.argv[1], r["transform"], r["segmenter_ari"], r["ari"]))' "$shape" "$line"
  done
done
